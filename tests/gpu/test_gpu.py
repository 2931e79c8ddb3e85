"""GPU tests: kernel execution on a CUDA device (run by tools/gpu/gpu_check.sh).

Skipped without a GPU (conftest). Their CPU twins: the same grids run for the torch
backend and for the Triton kernels in the interpreter (kernels/test_loss.py,
distributed/test_vocab_parallel.py); the CUDA kernels' math is checked on the host by the
header harness and their tracing by the meta tests (kernels/test_cuda_ext.py).
"""

from __future__ import annotations

import pytest
import torch

import tofu_kernels as tk
from tests.support.helpers import (
    DTYPES,
    assert_grad_close,
    assert_loss_close,
    gpu_backends,
    make_logits,
    reference,
    run,
)

pytestmark = pytest.mark.gpu


def test_cuda_extension_loaded_on_gpu_machine():
    assert tk.extension_loaded(), "gpu_check.sh builds the extension; it must load here"
    from tofu_kernels.backends import get_backend

    assert get_backend("auto", torch.device("cuda")).name == "cuda"


# Shapes: one row; odd vocab (rows not 16-byte aligned: scalar path); vocab above one
# 4096 tile with a partial last tile; few rows x long vocab (split rows); many rows; 256
# rows of an odd 5-tile vocab (4 splits of 2 tiles: the last split starts past the end).
SHAPES = [
    ((1,), 17),
    ((13,), 257),
    ((7,), 32001),
    ((3,), 128256),
    ((300,), 4096 + 100),
    ((256,), 18993),
]


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,vocab", SHAPES)
@pytest.mark.parametrize("gamma,beta", [(0.0, 1.0), (3.0, 0.8), (0.5, 1.5), (4.5, 0.5), (1.0, 1.0)])
def test_matches_reference(backend, dtype, shape, vocab, gamma, beta):
    if backend not in gpu_backends():
        pytest.fail("CUDA extension not loaded on this GPU")
    logits, labels = make_logits(shape, vocab, dtype)
    labels[0] = vocab - 1
    if labels.numel() > 2:
        labels[1] = -100
    logits, labels = logits.cuda(), labels.cuda()
    w = torch.randn(labels.shape, device="cuda")
    loss, grad = run(logits, labels, backend, upstream=w, gamma=gamma, beta=beta)
    ref_loss, ref_grad, _ = reference(logits, labels, upstream=w, gamma=gamma, beta=beta)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("regime", ["confident", "near_one", "half", "hopeless", "tiny"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 3.0])
def test_confidence_regimes(backend, dtype, regime, gamma):
    logits, labels = make_logits((64,), 5000, dtype, regime=regime)
    logits, labels = logits.cuda(), labels.cuda()
    loss, grad = run(logits, labels, backend, gamma=gamma)
    ref_loss, ref_grad, _ = reference(logits, labels, gamma=gamma)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(
        grad,
        ref_grad,
        dtype,
        torch_fp32=reference(logits, labels, gamma=gamma, compute_dtype=torch.float32)[1],
    )


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("inplace", [False, True])
def test_sbv_view_and_inplace(backend, inplace):
    s, b, v = 33, 4, 50304
    base, _ = make_logits((s, b), v, torch.bfloat16)
    base = base.cuda()
    labels = torch.randint(0, v, (b, s), device="cuda")
    leaf = base.clone().requires_grad_()
    logits = (leaf * 1).transpose(0, 1)  # [b, s, v] view of [s, b, v]
    w = torch.rand(b, s, device="cuda")
    loss = tk.tofu_loss(logits, labels, reduction="none", backend=backend, inplace_backward=inplace)
    (loss * w).sum().backward()
    ref_loss, ref_grad, _ = reference(base.transpose(0, 1), labels, upstream=w)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(leaf.grad.transpose(0, 1), ref_grad, torch.bfloat16)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_int64_offsets_beyond_2_31(backend):
    """N x V > 2^31 elements (4.3 GB bf16): rows past the int32 range are right."""
    v = 65536
    n = (1 << 31) // v + 8
    torch.manual_seed(0)
    x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, v, (n,), device="cuda")
    loss = tk.tofu_loss(x, labels, reduction="none", backend=backend)
    loss.sum().backward()
    rows = torch.tensor([0, n // 2, n - 2, n - 1], device="cuda")
    ref_loss, ref_grad, _ = reference(x.detach()[rows], labels[rows])
    assert_loss_close(loss.detach()[rows], ref_loss)
    assert_grad_close(x.grad[rows], ref_grad, torch.bfloat16)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_deterministic_bitwise(backend):
    logits, labels = make_logits((512,), 32064, torch.bfloat16)
    logits, labels = logits.cuda(), labels.cuda()
    a_loss, a_grad = run(logits, labels, backend)
    b_loss, b_grad = run(logits, labels, backend)
    assert torch.equal(a_loss, b_loss) and torch.equal(a_grad, b_grad)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("grad_in_forward", [None, False])
def test_cuda_graph_capture_and_replay(backend, grad_in_forward):
    n, v = 256, 32064
    static_x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    static_y = torch.randint(0, v, (n,), device="cuda")
    kw = dict(backend=backend, check_inputs=False, grad_in_forward=grad_in_forward)

    def step():
        static_x.grad = None
        loss = tk.tofu_loss(static_x, static_y, **kw)
        loss.backward()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm up (Triton compiles, allocator settles) off the capture
            step()
    torch.cuda.current_stream().wait_stream(s)
    static_x.grad = None
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_loss = tk.tofu_loss(static_x, static_y, **kw)
        static_loss.backward()
    new_x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16)
    new_y = torch.randint(0, v, (n,), device="cuda")
    with torch.no_grad():
        static_x.copy_(new_x)
    static_y.copy_(new_y)
    g.replay()
    torch.cuda.synchronize()
    x = new_x.clone().requires_grad_()
    eager = tk.tofu_loss(x, new_y, **kw)
    eager.backward()
    assert torch.equal(static_loss, eager) and torch.equal(static_x.grad, x.grad)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_peak_memory_is_lean(backend):
    """Forward + backward allocate the gradient and O(N) floats, nothing N x V else."""
    n, v = 4096, 128256
    x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = torch.randint(0, v, (n,), device="cuda")
    tk.tofu_loss(x, y, backend=backend).backward()  # warm-up (compilation, caches)
    x.grad = None
    _assert_lean(lambda: tk.tofu_loss(x, y, backend=backend).backward(), x)


def _assert_lean(step, x) -> None:
    """One forward + backward allocates the gradient and O(N) floats, nothing N x V else."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - x.numel() * x.element_size()
    assert extra <= 0.01 * x.numel() * x.element_size(), (
        f"{extra / 2**20:.1f} MiB beyond the gradient"
    )


def test_backends_agree_closely():
    """CUDA and Triton compute the same fp32 statistics: losses agree to fp32 rounding."""
    if "cuda" not in gpu_backends():
        pytest.fail("CUDA extension not loaded on this GPU")
    logits, labels = make_logits((1024,), 151936, torch.bfloat16)
    logits, labels = logits.cuda(), labels.cuda()
    lt, gt = run(logits, labels, "triton")
    lc, gc = run(logits, labels, "cuda")
    torch.testing.assert_close(lc, lt, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gc.float(), gt.float(), rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,vocab", [((1,), 17), ((37,), 32001), ((8,), 128256), ((300,), 4096 + 100)]
)
@pytest.mark.parametrize("reduction,upstream", [("mean", 1.0), ("mean", 0.37), ("sum", 1.0)])
@pytest.mark.parametrize("inplace", [False, True])
def test_grad_in_forward_matches_reference(
    backend, dtype, shape, vocab, reduction, upstream, inplace
):
    """The gradient made in the forward (one block per row, reverse second pass) and the
    backward's rescale (skipped on the device when the upstream gradient is 1)."""
    logits, labels = make_logits(shape, vocab, dtype)
    labels[0] = vocab - 1
    if labels.numel() > 2:
        labels[1] = -100
    logits, labels = logits.cuda(), labels.cuda()
    leaf = logits.clone().requires_grad_()
    x = leaf * 1 if inplace else leaf
    loss = tk.tofu_loss(
        x,
        labels,
        backend=backend,
        reduction=reduction,
        inplace_backward=inplace,
        grad_in_forward=True,
    )
    (loss * upstream).backward()
    xr = logits.double().requires_grad_()
    per_token, _ = tk.tofu_loss_reference(xr, labels)
    n_valid = max(int((labels != -100).sum()), 1)
    ref = per_token.sum() / (n_valid if reduction == "mean" else 1)
    (ref * upstream).backward()
    assert_loss_close(loss, ref)
    assert_grad_close(leaf.grad, xr.grad, dtype, roundings=1 if upstream == 1.0 else 2)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize(
    "grad_in_forward,reduction", [(None, "mean"), (False, "mean"), (False, "none")]
)
def test_torch_compile_fullgraph_numerics(backend, grad_in_forward, reduction):
    """torch.compile(fullgraph=True) runs our ops (Triton through triton_op) and gives the
    eager results."""
    logits, labels = make_logits((64,), 5000, torch.bfloat16)
    logits, labels = logits.cuda(), labels.cuda()
    w = torch.rand(64, device="cuda")

    def step(x, y):
        loss = tk.tofu_loss(
            x,
            y,
            backend=backend,
            reduction=reduction,
            grad_in_forward=grad_in_forward,
            check_inputs=False,
        )
        return (loss * w).sum() if reduction == "none" else loss

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True)
    xa = logits.clone().requires_grad_()
    xb = logits.clone().requires_grad_()
    la, lb = compiled(xa, labels), step(xb, labels)
    la.backward()
    lb.backward()
    torch.testing.assert_close(la, lb, rtol=1e-6, atol=0)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_grad_in_forward_deterministic_and_lean(backend):
    logits, labels = make_logits((512,), 32064, torch.bfloat16)
    x = logits.cuda().requires_grad_()
    labels = labels.cuda()
    grads = []
    for _ in range(2):
        x.grad = None
        tk.tofu_loss(x, labels, backend=backend).backward()
        grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])
    x.grad = None
    _assert_lean(lambda: tk.tofu_loss(x, labels, backend=backend).backward(), x)
