"""The optional metrics (``return_metrics=True``): per-token entropy of the untempered
softmax and top-1, made by the loss's own statistics pass, against float64.

Oracle: fp64 ``log_softmax`` of the same (already rounded) logits: entropy
``-sum p log p``, top-1 ``argmax z == t`` (the first maximum, as greedy decoding and TRL's
``mean_token_accuracy`` count ties). Every backend that runs here (torch; Triton in
its CPU interpreter, with tilings that split rows), both paths (two passes; gradient in the
forward), the fused linear loss, and the vocab-parallel combine on gloo. The CUDA kernels
run the same math (``tests/kernels/test_cuda_ext.py``: the host-compiled header, meta tracing) and
the GPU twin below.

Tolerance: entropy ``|ours - ref| <= 2e-5 |ref| + 2e-5 * (1 + |m|)``: E accumulates
``exp(z - m)(z - m)`` in fp32 over the row (each term rounded, relative 1e-7 x |z - m| up to
~100), the loss's own bound scaled by the logits' range. Top-1 exactly, with rows whose
maximum is tied at the target and at a column half a vocabulary away (another tile, split
or tensor-parallel shard), before or after the target.
"""

from __future__ import annotations

import math

import pytest
import torch

import tofu_kernels as tk
from tests.support.dist_utils import run_distributed
from tests.support.helpers import DTYPES, gpu_backends, make_logits

BACKENDS = ["torch", "triton"]


def reference_metrics(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100):
    """fp64 (entropy, top1) per token, 0 at ignored tokens."""
    z = logits.double()
    lp = torch.log_softmax(z, dim=-1)
    entropy = -(lp.exp() * torch.where(torch.isinf(lp), 0.0, lp)).sum(-1)
    t = labels.clamp(min=0).unsqueeze(-1)
    top1 = (z.argmax(-1) == t.squeeze(-1)).double()  # the first maximum
    keep = labels != ignore_index
    return torch.where(keep, entropy, 0.0), torch.where(keep, top1, 0.0)


def assert_metrics_close(
    metrics: tk.TokenMetrics, logits: torch.Tensor, labels: torch.Tensor
) -> None:
    entropy, top1 = reference_metrics(logits, labels)
    assert metrics.entropy.dtype == metrics.top1.dtype == torch.float32
    assert metrics.entropy.shape == metrics.top1.shape == labels.shape
    assert not metrics.entropy.requires_grad
    scale = 1 + logits.double().amax(-1).abs()
    err = (metrics.entropy.double() - entropy).abs()
    bound = 2e-5 * entropy.abs() + 2e-5 * scale
    assert (err <= bound).all(), (
        f"entropy error {err.max().item():.3e} ({(err / bound).max().item():.2f}x)"
    )
    assert torch.equal(metrics.top1.double(), top1), (metrics.top1, top1)


def _hard_rows(shape, vocab, dtype, seed=0):
    """Random rows, then a confident row (p = 1 in fp32), a hopeless one (target 40 below
    the max), a row with a -inf column (masked vocabulary), ignored tokens, and two rows
    whose maximum is tied at the target and at a column half a vocabulary away (the
    target first in one row, second in the other)."""
    torch.manual_seed(seed)
    logits, labels = make_logits(shape, vocab, dtype)
    flat, lab = logits.view(-1, vocab), labels.view(-1)
    n = lab.numel()
    if n > 1:
        flat[1, lab[1]] = flat[1].float().amax() + 40  # confident: top-1, entropy ~ 0
    if n > 2:
        flat[2, lab[2]] = flat[2].float().amax() - 40  # hopeless
    if n > 3:
        flat[3, (lab[3] + 1) % vocab] = -math.inf
    if n > 4:
        lab[4] = -100
    lab[-1] = -100 if n > 5 else lab[-1]
    for r in (0, 5) if n > 6 else ():
        t = int(lab[r])
        other = (t + vocab // 2) % vocab
        if (other > t) != (r == 0):  # row 0: the target first; row 5: the target second
            t, other = other, t
            lab[r] = t
        flat[r, t] = flat[r, other] = flat[r].float().amax() + 1
    return logits, labels


# One row; an odd vocabulary just above a power of two; rows the tilings (the ``tiling`` fixture) cut into
# several tiles and splits; a [b, s, V] batch.
SHAPES = [((1,), 17), ((13,), 257), ((7,), 300), ((2, 5), 131)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,vocab", SHAPES)
@pytest.mark.parametrize("grad_in_forward,reduction", [(None, "mean"), (False, "none")])
def test_metrics_match_fp64(backend, shape, vocab, grad_in_forward, reduction):
    logits, labels = _hard_rows(shape, vocab, torch.float32)
    if labels.numel() > 6:  # the tied rows: the first maximum only
        assert metrics_top1(logits, labels, backend)[[0, 5]].tolist() == [1.0, 0.0]
    x = logits.clone().requires_grad_()
    loss, ce, metrics = tk.tofu_loss(
        x,
        labels,
        backend=backend,
        reduction=reduction,
        return_ce=True,
        return_metrics=True,
        grad_in_forward=grad_in_forward,
    )
    assert_metrics_close(metrics, logits, labels)
    # the loss and its gradient are the plain path's, bit for bit
    (loss.sum() if reduction == "none" else loss).backward()
    y = logits.clone().requires_grad_()
    plain, plain_ce = tk.tofu_loss(
        y,
        labels,
        backend=backend,
        reduction=reduction,
        return_ce=True,
        grad_in_forward=grad_in_forward,
    )
    (plain.sum() if reduction == "none" else plain).backward()
    assert (
        torch.equal(loss.detach(), plain.detach())
        and torch.equal(ce, plain_ce)
        and torch.equal(x.grad, y.grad)
    )


def metrics_top1(logits, labels, backend):
    _, m = tk.tofu_loss(logits, labels, backend=backend, reduction="none", return_metrics=True)
    return m.top1.view(-1)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("grad_in_forward", [None, False])
def test_triton_metrics_tilings_and_dtypes(dtype, grad_in_forward, tiling):
    logits, labels = _hard_rows((7,), 300, dtype, seed=1)
    labels[0] = 299  # target in the last (partial) tile
    _, metrics = tk.tofu_loss(
        logits.clone().requires_grad_(),
        labels,
        backend="triton",
        return_metrics=True,
        grad_in_forward=grad_in_forward,
    )
    assert_metrics_close(metrics, logits, labels)


def test_metrics_edge_cases():
    """All ignored, no tokens, invalid labels without the host check (NaN, never a number),
    and the metrics alone (no return_ce)."""
    for backend in BACKENDS:
        logits, labels = make_logits((4,), 50, torch.float32)
        _, m = tk.tofu_loss(logits, torch.full((4,), -100), backend=backend, return_metrics=True)
        assert m.entropy.abs().sum() == 0 and m.top1.sum() == 0
        _, m = tk.tofu_loss(
            torch.randn(0, 50),
            torch.zeros(0, dtype=torch.long),
            backend=backend,
            return_metrics=True,
        )
        assert m.entropy.shape == m.top1.shape == (0,)
        bad = labels.clone()
        bad[2] = 50
        _, m = tk.tofu_loss(
            logits, bad, backend=backend, return_metrics=True, check_inputs=False, reduction="none"
        )
        assert (
            math.isnan(m.entropy[2])
            and math.isnan(m.top1[2])
            and not torch.isnan(m.entropy[[0, 1, 3]]).any()
        )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction,normalizer", [("mean", None), ("mean", 7.0), ("none", None)])
def test_linear_metrics(backend, reduction, normalizer):
    """The fused linear loss: the metrics of ``hidden @ weight.T`` from the same chunks
    (gradient in the forward for "mean"; two passes with a normalizer or "none"; no
    gradient: two passes too)."""
    torch.manual_seed(2)
    h = torch.randn(2, 9, 16) * 2
    w = torch.randn(83, 16)
    labels = torch.randint(0, 83, (2, 9))
    labels[0, :3] = -100
    logits = h @ w.T
    labels[1, 4] = int(logits[1, 4].argmax())  # one top-1 hit at least
    for grad in (True, False):
        hh = h.clone().requires_grad_(grad)
        loss, metrics = tk.linear_tofu_loss(
            hh,
            w,
            labels,
            backend=backend,
            reduction=reduction,
            normalizer=normalizer,
            return_metrics=True,
            chunk_size=5,
        )
        assert_metrics_close(metrics, logits, labels)
        assert metrics.top1.sum() >= 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_metrics_equal_trls_fused_head_with_ties(backend):
    """bf16, two identical rows of the LM head (an exact tie at most tokens' maximum), the
    target the first of the two at even tokens and the second at odd ones: top-1 equal to
    TRL's own fused head token for token (its first-maximum rule), entropy to fp32
    rounding."""
    chunked = pytest.importorskip(
        "trl.kernels.chunked_logprob", reason="TRL is installed by make test"
    )
    torch.manual_seed(0)
    h = torch.randn(24, 32).bfloat16()
    w = torch.randn(97, 32)
    w[60] = w[7] = h.float().mean(0) * 8
    w = w.bfloat16()
    t = torch.where(torch.arange(24) % 2 == 0, 7, 60)
    z = (h @ w.T).float()
    assert torch.equal(z[:, 7], z[:, 60]) and (z.argmax(1) == 7).sum() >= 4  # the ties are there
    _, entropy, _, _, top1 = chunked.ChunkedLogProbFunction.apply(
        h, w, None, t, 1.0, 32, None, 1.0, ("entropy", "is_top1")
    )
    _, m = tk.linear_tofu_loss(
        h, w, t, backend=backend, reduction="none", return_metrics=True, chunk_size=5
    )
    assert torch.equal(m.top1, top1.float()) and m.top1[1::2].sum() == 0
    torch.testing.assert_close(m.entropy, entropy, rtol=1e-5, atol=1e-5)


def vocab_parallel_metrics_cases(rank: int, world: int) -> None:
    """The entropy plane travels in the one all-gather: every rank's metrics equal the
    single-device ones (and fp64)."""
    for backend in BACKENDS:
        logits, labels = _hard_rows((2, 7), 40 * world, torch.float32, seed=3)
        shard = logits[..., rank * 40 : (rank + 1) * 40].clone().requires_grad_()
        loss, metrics = tk.vocab_parallel_tofu_loss(
            shard, labels, backend=backend, return_metrics=True
        )
        assert_metrics_close(metrics, logits, labels)
        assert metrics.top1.view(-1)[[0, 5]].tolist() == [1.0, 0.0]  # ties across the shards
        _, single = tk.tofu_loss(
            logits, labels, backend=backend, reduction="none", return_metrics=True
        )
        torch.testing.assert_close(metrics.entropy, single.entropy, rtol=1e-6, atol=1e-6)
        assert torch.equal(metrics.top1, single.top1)
        loss.sum().backward()


@pytest.mark.slow  # 2 processes: ~15 s
def test_vocab_parallel_metrics():
    run_distributed(2, vocab_parallel_metrics_cases)


def test_cuda_ops_with_metrics_on_meta():
    """The CUDA ops' metrics outputs through their fakes (shape-only, no GPU): both paths."""
    if not tk.extension_loaded():
        pytest.skip("CUDA extension not built (no nvcc / CPU-only torch)")
    x = torch.empty(3, 5, 1000, device="meta", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.empty(3, 5, device="meta", dtype=torch.long)
    for gif, reduction in ((None, "mean"), (False, "none")):
        loss, m = tk.tofu_loss(
            x, labels, backend="cuda", reduction=reduction, grad_in_forward=gif, return_metrics=True
        )
        assert m.entropy.shape == m.top1.shape == (3, 5) and m.entropy.device.type == "meta"
        (loss.sum() if reduction == "none" else loss).backward()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape,vocab", [((1,), 17), ((37,), 32001), ((8,), 128256), ((300,), 4096 + 100)]
)
@pytest.mark.parametrize("grad_in_forward,reduction", [(None, "mean"), (False, "none")])
def test_gpu_metrics_match_fp64(dtype, shape, vocab, grad_in_forward, reduction):
    """The GPU twin: CUDA and Triton kernels, vocabularies across tiles and splits."""
    logits, labels = _hard_rows(shape, vocab, dtype)
    logits, labels = logits.cuda(), labels.cuda()
    for backend in gpu_backends():
        loss, metrics = tk.tofu_loss(
            logits.clone().requires_grad_(),
            labels,
            backend=backend,
            reduction=reduction,
            return_metrics=True,
            grad_in_forward=grad_in_forward,
        )
        assert_metrics_close(
            tk.TokenMetrics(metrics.entropy.cpu(), metrics.top1.cpu()), logits.cpu(), labels.cpu()
        )
