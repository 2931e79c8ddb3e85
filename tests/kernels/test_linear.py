"""linear_tofu_loss: TOFU of hidden @ weight.T without the N x V logits.

Oracle: float64 autograd through the materialised logits of the same (rounded) inputs.
Yardstick: the materialised path in the inputs' dtype (F.linear, then tofu_loss), whose
only extra error is the rounding of the logits and gradients to that dtype; ours must be
as close to the oracle as it is, within the extra roundings chunking adds to dW.
"""

from __future__ import annotations

import math

import pytest
import torch

import tofu_kernels as tk
from tests.support.helpers import (
    assert_grad_close,
    assert_loss_close,
    gpu_backends,
    make_logits,
    reference,
)
from tests.support.spies import DispatchSpy, GemmFlops, count_collectives, gathers
from tofu_kernels.linear import default_chunk_size

BACKENDS = ["torch", "triton"]


def _inputs(n, d, v, dtype, seed=0, ignored=(3, 10, 11)):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, d, generator=g, dtype=torch.float64)).to(dtype)
    w = (torch.randn(v, d, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(d))).to(dtype)
    labels = torch.randint(0, v, (n,), generator=g)
    for i in ignored:
        if i < n:
            labels[i] = -100
    return h, w, labels


def _oracle(h, w, labels, reduction, upstream, normalizer=None, **kw):
    """fp64 (loss, dh, dw) through the materialised logits of the rounded inputs."""
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    per_token, _ = tk.tofu_loss_reference(h64 @ w64.t(), labels, **kw)
    valid = (labels != kw.get("ignore_index", -100)).sum().clamp(min=1)
    if reduction == "none":
        loss = per_token
    elif reduction == "sum":
        loss = per_token.sum()
    else:
        loss = per_token.sum() / (normalizer if normalizer is not None else valid)
    (loss * upstream.double()).sum().backward()
    return loss.detach(), h64.grad, w64.grad


def _materialised(h, w, labels, reduction, upstream, backend, **kw):
    hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = tk.tofu_loss(
        torch.nn.functional.linear(hx, wx), labels, reduction=reduction, backend=backend, **kw
    )
    (loss * upstream).sum().backward()
    return loss.detach(), hx.grad, wx.grad


def _ours(h, w, labels, reduction, upstream, backend, **kw):
    hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
    loss = tk.linear_tofu_loss(hx, wx, labels, reduction=reduction, backend=backend, **kw)
    (loss * upstream).sum().backward()
    return loss.detach(), hx.grad, wx.grad


def _rel(a, ref):
    return ((a.double() - ref).norm() / ref.norm().clamp(min=1e-300)).item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_matches_materialised_logits(dtype, reduction, backend):
    # ragged: 37 tokens in chunks of 8 (last chunk 5), D = 24, V = 101
    h, w, labels = _inputs(37, 24, 101, dtype)
    upstream = torch.randn(37) if reduction == "none" else torch.tensor(1.7)
    ref_loss, ref_dh, ref_dw = _oracle(h, w, labels, reduction, upstream)
    mat = _materialised(h, w, labels, reduction, upstream, backend)
    ours = _ours(h, w, labels, reduction, upstream, backend, chunk_size=8)
    chunks = math.ceil(37 / 8)
    eps = torch.finfo(dtype).eps
    # loss: fp32 statistics of logits rounded to the dtype, as the materialised path
    loss_err, mat_loss_err = _rel(ours[0], ref_loss), _rel(mat[0], ref_loss)
    assert loss_err <= 2 * mat_loss_err + 1e-6, (loss_err, mat_loss_err)
    # dhidden: one GEMM per row with fp32 accumulation, like the materialised path
    dh_err, mat_dh_err = _rel(ours[1], ref_dh), _rel(mat[1], ref_dh)
    assert dh_err <= 2 * mat_dh_err + 4 * eps, (dh_err, mat_dh_err)
    # dweight: one rounding per chunk instead of one
    dw_err, mat_dw_err = _rel(ours[2], ref_dw), _rel(mat[2], ref_dw)
    assert dw_err <= 2 * math.sqrt(chunks) * mat_dw_err + 4 * eps, (dw_err, mat_dw_err)
    assert ours[1].dtype == ours[2].dtype == dtype


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("regime", ["confident", "near_one", "hopeless", "tiny"])
def test_regimes_through_an_identity_head(regime, backend):
    # weight = I (D = V) makes the logits exactly the hidden states, so the kernels'
    # per-element tolerance of test_loss applies to dhidden at confident and hopeless tokens
    v = 67
    for dtype in (torch.float32, torch.bfloat16):
        z, labels = make_logits((19,), v, dtype, regime=regime)
        labels[5] = -100
        upstream = torch.randn(19)
        ref_loss, ref_grad, _ = reference(z, labels, upstream, gamma=3.0, beta=0.8)
        _, torch_fp32, _ = reference(
            z, labels, upstream, compute_dtype=torch.float32
        )  # what fp32 resolves
        hx = z.clone().requires_grad_()
        eye = torch.eye(v, dtype=dtype)
        loss = tk.linear_tofu_loss(hx, eye, labels, reduction="none", backend=backend, chunk_size=7)
        (loss * upstream).sum().backward()
        assert_loss_close(loss.detach(), ref_loss)
        assert_grad_close(hx.grad, ref_grad, dtype, torch_fp32=torch_fp32)
        # the mean path (gradient in the forward) on the same rows
        hm = z.clone().requires_grad_()
        lm = tk.linear_tofu_loss(hm, eye, labels, backend=backend, chunk_size=7)
        lm.backward()
        count = (labels != -100).sum()
        assert_loss_close(lm.detach(), ref_loss.sum() / count)
        mean_up = torch.full((19,), 1.0 / count.item())
        _, ref_mean_grad, _ = reference(z, labels, mean_up)
        _, fp32_mean_grad, _ = reference(z, labels, mean_up, compute_dtype=torch.float32)
        assert_grad_close(hm.grad, ref_mean_grad, dtype, torch_fp32=fp32_mean_grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_shape_ignored_and_empty(backend):
    h, w, labels = _inputs(3 * 13, 16, 50, torch.float32)
    h3, l3 = h.view(3, 13, 16), labels.view(3, 13)
    per_token = tk.linear_tofu_loss(h3, w, l3, reduction="none", backend=backend, chunk_size=5)
    assert per_token.shape == (3, 13)
    ref, _, _ = _oracle(h, w, labels, "none", torch.ones(39))
    assert_loss_close(per_token.detach().reshape(-1), ref)
    assert (per_token.view(-1)[labels == -100] == 0).all()
    # all ignored: mean is 0 with zero gradients (both paths)
    hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
    none = torch.full_like(labels, -100)
    loss = tk.linear_tofu_loss(hx, wx, none, backend=backend, chunk_size=8)
    loss.backward()
    assert loss.item() == 0.0 and (hx.grad == 0).all() and (wx.grad == 0).all()
    # zero tokens
    h0 = torch.zeros(0, 16, requires_grad=True)
    w0 = w.clone().requires_grad_()
    loss0 = tk.linear_tofu_loss(h0, w0, torch.zeros(0, dtype=torch.long), backend=backend)
    loss0.backward()
    assert loss0.item() == 0.0 and (w0.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalizer_and_accumulation(backend):
    # two micro-batches normalised by the whole batch's token count equal one batch
    h, w, labels = _inputs(30, 16, 60, torch.float32)
    total = (labels != -100).sum().item()
    whole = _ours(h, w, labels, "mean", torch.tensor(1.0), backend, chunk_size=8)
    wx = w.clone().requires_grad_()
    dh = []
    for sl in (slice(0, 13), slice(13, 30)):
        hx = h[sl].clone().requires_grad_()
        tk.linear_tofu_loss(
            hx, wx, labels[sl], normalizer=torch.tensor(total), backend=backend, chunk_size=8
        ).backward()
        dh.append(hx.grad)
    torch.testing.assert_close(torch.cat(dh), whole[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(wx.grad, whole[2], rtol=1e-5, atol=1e-7)
    # the oracle with that normaliser, and the two-pass path (no gradient wanted) agrees
    ref_loss, _, _ = _oracle(h, w, labels, "mean", torch.tensor(1.0), normalizer=7.5)
    with torch.no_grad():
        got = tk.linear_tofu_loss(h, w, labels, normalizer=7.5, backend=backend, chunk_size=8)
    assert_loss_close(got, ref_loss)
    with pytest.raises(ValueError, match="normalizer goes with reduction='mean'"):
        tk.linear_tofu_loss(h, w, labels, reduction="sum", normalizer=3)
    with pytest.raises(ValueError, match="positive finite"):
        tk.linear_tofu_loss(h, w, labels, normalizer=0)


def test_upstream_gradient_and_partial_requires_grad():
    h, w, labels = _inputs(21, 12, 40, torch.float32)
    ref_loss, ref_dh, ref_dw = _oracle(h, w, labels, "mean", torch.tensor(-2.5))
    # upstream -2.5: the gradients made in the forward are rescaled in the backward
    _, dh, dw = _ours(h, w, labels, "mean", torch.tensor(-2.5), "torch", chunk_size=4)
    torch.testing.assert_close(dh.double(), ref_dh, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(dw.double(), ref_dw, rtol=1e-5, atol=1e-8)
    # only one of the two wants a gradient
    hx = h.clone().requires_grad_()
    tk.linear_tofu_loss(hx, w, labels, chunk_size=4).backward()
    torch.testing.assert_close(hx.grad.double(), ref_dh / -2.5, rtol=1e-5, atol=1e-8)
    wx = w.clone().requires_grad_()
    tk.linear_tofu_loss(h, wx, labels, chunk_size=4).backward()
    torch.testing.assert_close(wx.grad.double(), ref_dw / -2.5, rtol=1e-5, atol=1e-8)


def test_strided_weight_and_hidden():
    # a weight stored transposed (a tied embedding seen as [V, D]) and a strided hidden view:
    # the same result as contiguous inputs, upstream gradient != 1 (the backward rescales)
    h, w, labels = _inputs(20, 12, 33, torch.float32)
    want = _ours(h, w, labels, "mean", torch.tensor(0.7), "torch", chunk_size=6)
    wt = w.t().contiguous().t().requires_grad_()  # [V, D] with strides (1, V)
    hs = torch.cat([h, h], dim=1)[:, :12].detach().requires_grad_()  # rows 24 apart
    assert not wt.is_contiguous() and not hs.is_contiguous()
    loss = tk.linear_tofu_loss(hs, wt, labels, chunk_size=6)
    (loss * 0.7).backward()
    torch.testing.assert_close(loss.detach(), want[0])
    torch.testing.assert_close(hs.grad, want[1])
    torch.testing.assert_close(wt.grad, want[2])


def test_deterministic_and_module():
    h, w, labels = _inputs(33, 16, 70, torch.bfloat16)
    a = _ours(h, w, labels, "mean", torch.tensor(1.0), "torch")
    b = _ours(h, w, labels, "mean", torch.tensor(1.0), "torch")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    mod = tk.LinearTOFULoss(gamma=2.0, beta=0.9, chunk_size=16)
    assert "chunk_size=16" in repr(mod)
    got = mod(h, w, labels)
    want = tk.linear_tofu_loss(h, w, labels, gamma=2.0, beta=0.9, chunk_size=16)
    assert torch.equal(got, want)
    _, ce = tk.linear_tofu_loss(h, w, labels, gamma=0.0, beta=1.0, return_ce=True)
    ce_ref = torch.nn.functional.cross_entropy(
        (h.double() @ w.double().t()), labels, ignore_index=-100
    )
    assert abs(ce.item() - ce_ref.item()) < 1e-2  # bf16 logits


def test_autocast_runs_the_gemms_in_the_autocast_dtype():
    # as nn.Linear under autocast: the result of the bf16-cast inputs, gradients in fp32
    h, w, labels = _inputs(19, 16, 45, torch.float32)
    want = _ours(
        h.bfloat16(), w.bfloat16(), labels, "mean", torch.tensor(1.0), "torch", chunk_size=8
    )
    hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = tk.linear_tofu_loss(hx, wx, labels, chunk_size=8)
    loss.backward()
    assert torch.equal(loss.detach(), want[0])
    assert hx.grad.dtype == wx.grad.dtype == torch.float32
    assert torch.equal(hx.grad, want[1].float()) and torch.equal(wx.grad, want[2].float())


def test_second_backward_raises_and_errors():
    h, w, labels = _inputs(9, 8, 20, torch.float32)
    hx = h.clone().requires_grad_()
    loss = tk.linear_tofu_loss(hx, w, labels)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="handed out already"):
        loss.backward()
    with pytest.raises(TypeError, match="one dtype"):
        tk.linear_tofu_loss(h, w.double(), labels)
    with pytest.raises(ValueError, match="D = weight.shape"):
        tk.linear_tofu_loss(h[:, :5], w, labels)
    with pytest.raises(ValueError, match="labels must have the shape"):
        tk.linear_tofu_loss(h, w, labels[:4])
    with pytest.raises(ValueError, match="chunk_size"):
        tk.linear_tofu_loss(h, w, labels, chunk_size=0)
    bad = labels.clone()
    bad[2] = 20
    with pytest.raises(ValueError, match="outside"):
        tk.linear_tofu_loss(h, w, bad)
    with pytest.raises(ValueError, match="gamma"):
        tk.linear_tofu_loss(h, w, labels, gamma=-1.0)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_n_by_v_temporaries(reduction):
    # N x V = 96 x 200 = 19200 elements; one chunk 16 x 200 = 3200; W is 200 x 24 = 4800
    n, d, v, chunk = 96, 24, 200, 16
    h, w, labels = _inputs(n, d, v, torch.float32)
    hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_()
    up = torch.randn(n) if reduction == "none" else torch.tensor(1.0)
    with DispatchSpy() as mode:
        loss = tk.linear_tofu_loss(
            hx, wx, labels, reduction=reduction, chunk_size=chunk, backend="torch"
        )
        (loss * up).sum().backward()
    assert mode.largest <= max(chunk * v, v * d, n * d), mode.largest
    # the materialised path does build one (the check can fail)
    with DispatchSpy() as mode:
        tk.tofu_loss(torch.nn.functional.linear(h, w), labels, backend="torch")
    assert mode.largest >= n * v


def test_default_chunk_size():
    # 128 MiB of logits: 512 rows of a 128256-column bf16 vocabulary
    assert default_chunk_size(8192, 128256, 2) == 512
    assert default_chunk_size(100, 128256, 2) == 100
    assert default_chunk_size(10**6, 10**7, 4) == 64
    assert default_chunk_size(8192, 32000, 4) % 64 == 0


@pytest.mark.gpu
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_matches_materialised_and_stays_small(reduction):
    # a ragged chunking over a vocabulary that crosses the CUDA kernels' 4096-column tile
    n, d, v, chunk = 300, 64, 5003, 128
    for backend in gpu_backends():
        for dtype in (torch.bfloat16, torch.float32):
            h, w, labels = _inputs(n, d, v, dtype)
            h, w, labels = h.cuda(), w.cuda(), labels.cuda()
            up = (
                torch.randn(n, device="cuda")
                if reduction == "none"
                else torch.tensor(1.0, device="cuda")
            )
            ref = _oracle(h.cpu(), w.cpu(), labels.cpu(), reduction, up.cpu())
            mat = _materialised(h, w, labels, reduction, up, backend)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            ours = _ours(h, w, labels, reduction, up, backend, chunk_size=chunk)
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            eps = torch.finfo(dtype).eps
            for i, extra in ((0, 1e-6), (1, 4 * eps), (2, 4 * eps)):
                sqrt_k = math.sqrt(math.ceil(n / chunk)) if i == 2 else 1.0
                err, mat_err = _rel(ours[i].cpu(), ref[i]), _rel(mat[i].cpu(), ref[i])
                assert err <= 2 * sqrt_k * mat_err + extra, (backend, dtype, i, err, mat_err)
            # the gradients, one logits chunk and its records; never N x V
            elt = h.element_size()
            allowed = (n * d + v * d) * elt * 2 + chunk * v * elt + (4 << 20)
            assert peak <= allowed and peak < n * v * elt + (n * d + v * d) * elt, (peak, allowed)


# ---------------------------------------------------------------- vocabulary parallel


def vocab_parallel_linear_cases(
    rank: int, world: int, device: str = "cpu", backends: tuple = tuple(BACKENDS)
) -> None:
    """Each rank holds rows [rank * Vr, (rank + 1) * Vr) of the weight; against the fp64
    oracle on the full weight: the loss (identical on every rank), dhidden (all-reduced),
    this rank's dweight rows; one collective each way. ``device="cuda"``: every process on
    the one GPU (tests/support/dist_utils.py stages gloo's all-gather if it must)."""
    import torch.distributed as dist

    from tests.support.dist_utils import (
        assert_same_on_all_ranks,
        shared_device,
        stage_all_gather_through_host_if_needed,
    )

    if device == "cuda":
        stage_all_gather_through_host_if_needed(shared_device(device))
    dev = torch.device(device)
    vr = 23 if device == "cpu" else 4099  # on the GPU a shard crosses a 4096-column tile
    for backend in backends:
        for dtype, reduction in (
            (torch.float32, "none"),
            (torch.float32, "mean"),
            (torch.bfloat16, "mean"),
            (torch.float32, "sum"),
        ):
            h, w, labels = _inputs(29, 16, vr * world, dtype, seed=5)
            for r in range(world):  # targets on every shard's first and last row
                labels[2 * r], labels[2 * r + 1] = r * vr, (r + 1) * vr - 1
            upstream = (
                torch.randn(29, generator=torch.Generator().manual_seed(9))
                if reduction == "none"
                else torch.tensor(1.3)
            )
            ref_loss, ref_dh, ref_dw = _oracle(h, w, labels, reduction, upstream)
            rows = slice(rank * vr, (rank + 1) * vr)
            hx, wx = (
                h.to(dev, copy=True).requires_grad_(),
                w[rows].to(dev, copy=True).requires_grad_(),
            )
            with count_collectives() as calls:
                loss = tk.vocab_parallel_linear_tofu_loss(
                    hx, wx, labels.to(dev), reduction=reduction, backend=backend, chunk_size=8
                )
                (loss * upstream.to(dev)).sum().backward()
            # the statistics' all-gather, after the checked call's metadata exchange; dhidden's
            # all-reduce; nothing else
            assert (gathers(calls), calls["all_reduce"], calls.total()) == (2, 1, 3), calls
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            loss = loss.detach().cpu()
            assert _rel(loss, ref_loss) <= tol
            assert _rel(hx.grad.cpu(), ref_dh) <= tol, _rel(hx.grad.cpu(), ref_dh)
            assert _rel(wx.grad.cpu(), ref_dw[rows]) <= tol, _rel(wx.grad.cpu(), ref_dw[rows])
            assert_same_on_all_ranks(loss)
    if device != "cpu":
        return

    # uneven shards with padding rows: rank 0 holds 40 real rows, the others 17; every
    # local shard is 48 rows, padded with large weights that must not contribute
    sizes = [40] + [17] * (world - 1)
    starts = [sum(sizes[:r]) for r in range(world)]
    v = sum(sizes)
    h, w, labels = _inputs(21, 12, v, torch.float32, seed=6)
    labels[0], labels[1] = v - 1, starts[-1]
    ref_loss, ref_dh, ref_dw = _oracle(h, w, labels, "mean", torch.tensor(1.0))
    local = torch.full((48, 12), 30.0)
    local[: sizes[rank]] = w[starts[rank] : starts[rank] + sizes[rank]]
    hx, wx = h.clone().requires_grad_(), local.requires_grad_()
    loss = tk.vocab_parallel_linear_tofu_loss(
        hx,
        wx,
        labels,
        backend="torch",
        chunk_size=5,
        vocab_start=starts[rank],
        vocab_end=starts[rank] + sizes[rank],
    )
    loss.backward()
    assert _rel(loss.detach(), ref_loss) <= 1e-5
    assert _rel(hx.grad, ref_dh) <= 1e-5
    assert _rel(wx.grad[: sizes[rank]], ref_dw[starts[rank] : starts[rank] + sizes[rank]]) <= 1e-5
    assert (wx.grad[sizes[rank] :] == 0).all(), "padding rows got gradient"
    # reduce_hidden_grad=False: each rank's part; their sum is dhidden
    hx = h.clone().requires_grad_()
    tk.vocab_parallel_linear_tofu_loss(
        hx,
        local,
        labels,
        backend="torch",
        vocab_start=starts[rank],
        vocab_end=starts[rank] + sizes[rank],
        reduce_hidden_grad=False,
    ).backward()
    part = hx.grad.clone()
    dist.all_reduce(part)
    assert _rel(part, ref_dh) <= 1e-5
    # a label outside the global vocabulary is caught (the shard ranges tile [0, v))
    bad = labels.clone()
    bad[3] = v
    with pytest.raises(ValueError, match="outside"):
        tk.vocab_parallel_linear_tofu_loss(
            h, local, bad, vocab_start=starts[rank], vocab_end=starts[rank] + sizes[rank]
        )


@pytest.mark.slow  # 2 and 4 processes: 12-23 s
@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_linear(world):
    from tests.support.dist_utils import run_distributed

    run_distributed(world, vocab_parallel_linear_cases)


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
def test_gpu_vocab_parallel_linear(world):
    from tests.support.dist_utils import run_distributed

    run_distributed(world, vocab_parallel_linear_cases, device="cuda", backends=gpu_backends())


def test_vocab_parallel_linear_world_one_is_linear():
    # no process group: the single-device function, bitwise
    h, w, labels = _inputs(17, 8, 31, torch.float32)
    a = tk.vocab_parallel_linear_tofu_loss(h, w, labels, reduction="none", chunk_size=4)
    b = tk.linear_tofu_loss(h, w, labels, reduction="none", chunk_size=4)
    assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_cuda_ops_through_the_linear_path_on_meta(reduction):
    # the CUDA backend's ops, as linear_tofu_loss calls them, traced on meta tensors (their
    # fakes check arity and types): per chunk one grad_in_forward op, or row_stats then grad; one
    # epilogue for all rows; the backward's rescales
    if not tk.extension_loaded():
        pytest.skip("CUDA extension not built (no nvcc / CPU-only torch)")
    h = torch.empty(10, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    w = torch.empty(5000, 16, device="meta", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.empty(10, device="meta", dtype=torch.long)
    seed = torch.ones(10, device="meta") if reduction == "none" else torch.ones((), device="meta")
    with DispatchSpy() as ops:
        loss = tk.linear_tofu_loss(
            h, w, labels, reduction=reduction, backend="cuda", check_inputs=False, chunk_size=4
        )
        loss.backward(seed)
    if reduction == "sum":
        assert ops.ours == ["grad_in_forward_inplace"] * 3 + ["rescale"] * 2, ops.ours
    else:
        assert ops.ours == ["row_stats"] * 3 + ["epilogue"] + ["grad_inplace"] * 3, ops.ours
    assert h.grad.shape == h.shape and w.grad.shape == w.shape


# ---------------------------------------------------------------- only the rows that train


def _run(h, w, labels, upstream, frozen_weight=False, **kw):
    """loss (and ce, metrics where asked for), dh, dw of one call."""
    hx, wx = h.clone().requires_grad_(), w.clone().requires_grad_(not frozen_weight)
    out = tk.linear_tofu_loss(hx, wx, labels, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    (loss * upstream).sum().backward()
    return out, hx.grad, wx.grad


def _assert_skip_parity(h, w, labels, reduction, upstream, backend, frozen_weight=False, **kw):
    """The call that skips the ignored rows against the one that computes every row and the
    fp64 oracle: the same loss, cross entropy, metrics and gradients, zeros on ignored rows."""
    common = dict(
        reduction=reduction,
        backend=backend,
        return_ce=True,
        return_metrics=True,
        chunk_size=8,
        **kw,
    )
    (loss, ce, met), dh, dw = _run(
        h, w, labels, upstream, frozen_weight, skip_ignored=True, **common
    )
    (loss0, ce0, met0), dh0, dw0 = _run(
        h, w, labels, upstream, frozen_weight, skip_ignored=False, **common
    )
    ref_loss, ref_dh, ref_dw = _oracle(
        h, w, labels, reduction, upstream, normalizer=kw.get("normalizer")
    )
    eps = torch.finfo(h.dtype).eps
    tol = 4 * eps if h.dtype == torch.float32 else 8 * eps
    for a, b in ((loss, loss0), (ce, ce0), (met.entropy, met0.entropy), (met.top1, met0.top1)):
        assert torch.allclose(a.detach().double(), b.detach().double(), rtol=tol, atol=tol), (a, b)
    assert _rel(loss.detach(), ref_loss) <= max(tol, 1e-5), _rel(loss.detach(), ref_loss)
    assert _rel(dh, ref_dh) <= 2 * _rel(dh0, ref_dh) + tol, (_rel(dh, ref_dh), _rel(dh0, ref_dh))
    ignored = labels.reshape(-1) == -100
    assert (dh.reshape(-1, dh.shape[-1])[ignored] == 0).all(), "an ignored row got a gradient"
    if frozen_weight:
        assert dw is None and dw0 is None
    else:
        assert _rel(dw, ref_dw) <= 2 * _rel(dw0, ref_dw) + tol, (
            _rel(dw, ref_dw),
            _rel(dw0, ref_dw),
        )
    if reduction == "none":
        assert (loss.detach().reshape(-1)[ignored] == 0).all() and (
            ce.reshape(-1)[ignored] == 0
        ).all()
    assert (met.entropy.reshape(-1)[ignored] == 0).all() and (
        met.top1.reshape(-1)[ignored] == 0
    ).all()


@pytest.mark.parametrize(
    ("backend", "reduction", "dtype"),
    [
        *(
            ("torch", r, dt)
            for r in ("mean", "sum", "none")
            for dt in (torch.float32, torch.bfloat16)
        ),
        pytest.param(
            "triton", "mean", torch.bfloat16, marks=pytest.mark.slow
        ),  # both paths of the kernels
        pytest.param("triton", "none", torch.float32, marks=pytest.mark.slow),
    ],
)
def test_skipping_ignored_rows_changes_nothing(dtype, reduction, backend):
    # 45 tokens, every other one and a run of 9 ignored: chunks of 8 over the 16 that train
    ignored = tuple(range(0, 45, 2)) + tuple(range(30, 39))
    h, w, labels = _inputs(45, 16, 67, dtype, seed=3, ignored=ignored)
    upstream = torch.randn(45) if reduction == "none" else torch.tensor(1.7)
    _assert_skip_parity(h, w, labels, reduction, upstream, backend)


def test_skipping_with_a_normalizer_a_frozen_weight_and_a_leading_shape():
    backend = "torch"
    h, w, labels = _inputs(40, 16, 53, torch.float32, seed=4, ignored=tuple(range(0, 40, 3)))
    _assert_skip_parity(h, w, labels, "mean", torch.tensor(0.7), backend, normalizer=31.0)
    _assert_skip_parity(h, w, labels, "sum", torch.tensor(1.0), backend, frozen_weight=True)
    _assert_skip_parity(
        h.view(4, 10, 16), w, labels.view(4, 10), "none", torch.randn(4, 10), backend
    )


def test_all_ignored_and_nothing_ignored():
    h, w, labels = _inputs(20, 8, 31, torch.float32, ignored=())
    # nothing to skip: the path of every row, bitwise
    upstream = torch.randn(20)
    a = _run(h, w, labels, upstream, reduction="none", chunk_size=8)
    b = _run(h, w, labels, upstream, reduction="none", chunk_size=8, skip_ignored=False)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    # every row ignored: zeros, no gradient anywhere, nothing computed
    none = torch.full_like(labels, -100)
    for reduction in ("mean", "sum", "none"):
        with GemmFlops() as f:
            (out, ce, met), dh, dw = _run(
                h,
                w,
                none,
                torch.tensor(1.0),
                reduction=reduction,
                return_ce=True,
                return_metrics=True,
            )
        assert (
            (out == 0).all()
            and (ce == 0).all()
            and (dh == 0).all()
            and (dw == 0).all()
            and f.flops == 0
        )
        assert (
            met.entropy.shape == met.top1.shape == none.shape
            and not met.entropy.any()
            and not met.top1.any()
        )


def test_a_wrong_selection_fails_the_parity(monkeypatch):
    """The parity check can fail: rows shifted by one (a row that trains computed from its
    neighbour's hidden state) are caught."""
    from tofu_kernels import core

    h, w, labels = _inputs(30, 16, 41, torch.float32, seed=8, ignored=tuple(range(0, 30, 3)))
    right = core.training_rows
    monkeypatch.setattr(
        core, "training_rows", lambda flat, ii: (right(flat, ii) + 1).clamp(max=flat.numel() - 1)
    )
    for reduction in ("mean", "none"):
        upstream = torch.randn(30) if reduction == "none" else torch.tensor(1.0)
        with pytest.raises(AssertionError):
            _assert_skip_parity(h, w, labels, reduction, upstream, "torch")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gemm_flops_scale_with_the_rows_that_train(reduction):
    """Every matrix product of a step (the forward's and the backward's GEMMs), counted at 0,
    50 and 90 % of the rows ignored: they scale with the rows that train, to within one chunk."""
    n, d, v, chunk = 256, 32, 96, 32
    per_row = (
        {"mean": 3, "none": 4}[reduction] * 2 * d * v
    )  # 3 GEMMs with the gradient in the forward, else 4
    for frac in (0.0, 0.5, 0.9):
        kept = n - int(n * frac)
        h, w, labels = _inputs(n, d, v, torch.float32, ignored=range(kept, n))
        upstream = torch.randn(n) if reduction == "none" else torch.tensor(1.0)
        with GemmFlops() as f:
            _run(h, w, labels, upstream, reduction=reduction, chunk_size=chunk)
        with GemmFlops() as every:
            _run(h, w, labels, upstream, reduction=reduction, chunk_size=chunk, skip_ignored=False)
        assert every.flops == n * per_row
        assert kept * per_row <= f.flops <= (kept + chunk) * per_row, (
            frac,
            f.flops,
            kept * per_row,
        )


def test_nothing_is_skipped_where_no_host_sync_may_run(monkeypatch):
    """Under torch.compile or CUDA-graph capture (no host sync: checks.host_checks_allowed is
    False) every row is computed, and the result is the same."""
    from tofu_kernels import checks, core

    h, w, labels = _inputs(30, 16, 41, torch.float32, seed=2, ignored=tuple(range(0, 30, 2)))
    upstream = torch.randn(30)
    skipped = _run(h, w, labels, upstream, reduction="none", check_inputs=False, chunk_size=8)
    monkeypatch.setattr(core, "host_checks_allowed", lambda t: False)
    monkeypatch.setattr(checks, "host_checks_allowed", lambda t: False)
    assert core.training_rows(labels, -100) is None
    with GemmFlops() as f:
        every = _run(h, w, labels, upstream, reduction="none", check_inputs=False, chunk_size=8)
    assert f.flops == 30 * 4 * 2 * 16 * 41
    for a, b in zip(skipped, every):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
