"""Fused linear + TOFU: the loss of ``hidden @ weight.T`` without the N x V logits.

For a model's last layer the logits are the memory: 8192 tokens x 128256 columns in bf16
are 2 GB, their gradient another 2 GB. Here the rows go through in chunks of ``C`` tokens;
only one ``[C, V]`` logits chunk exists at a time (docs/design.md section 8). Two ways
through, both with the backends of :mod:`tofu_kernels.loss`:

gradient in the forward (reduction "mean"/"sum" and a gradient wanted; 3 GEMMs):
    per chunk:  z = h_c @ W.T                       GEMM 1, into one reused buffer
                backend.fused(z -> z)               loss and dL/dz, in place, while each
                                                    row is on chip (upstream gradient 1)
                dh_c = alpha * z @ W                GEMM 2, straight into dhidden
                dW  += alpha * z.T @ h_c            GEMM 3, accumulated in dW's dtype
    backward:   backend.rescale(dh, dW)             times the upstream gradient; nothing
                                                    on the device when it is 1
    ``alpha`` is the mean's 1 / (non-ignored tokens), folded into the GEMMs (counted once,
    with the label check, on the host).

two passes (reduction "none", or no gradient wanted; 4 GEMMs when a gradient is wanted):
    forward:    z = h_c @ W.T; backend.row_stats + backend.epilogue per chunk; the
                logits chunk is dropped, the backward keeps one fp32 record per row
    backward:   z = h_c @ W.T again; backend.grad(z -> z) with the per-token upstream
                gradient; GEMMs 2 and 3 as above

Precision: GEMMs accumulate in fp32 (cuBLAS / CPU BLAS) and round once to the inputs'
dtype; the TOFU statistics are fp32 in the kernels. dW is the sum over chunks of one GEMM
each, accumulated in dW's dtype: ceil(N / C) roundings instead of one (bf16: a relative
error ~ sqrt(N / C) * 2^-9; tested against fp64). ``chunk_size`` trades memory for fewer
roundings and larger GEMMs.
"""

from __future__ import annotations

import math

import torch

from ._inputs import Shard, check_label_range, host_checks_allowed, row_layout
from .backends import Backend, get_backend
from .loss import _LossModule, empty_loss
from .params import DEFAULT_BETA, DEFAULT_GAMMA, DEFAULT_IGNORE_INDEX, TOFUParams
from .tofu_math import Reduction, reduce_rows

__all__ = ["LinearTOFULoss", "linear_tofu_loss", "default_chunk_size"]

# The logits chunk's budget: 128 MiB, e.g. 512 rows of a 128256-column bf16 vocabulary.
CHUNK_BYTES = 128 << 20
_N_INPUTS = 8  # arguments of _LinearTOFUFunction.forward after ctx


def default_chunk_size(n_rows: int, vocab: int, element_size: int) -> int:
    """Rows per chunk: as many as fit ``CHUNK_BYTES`` of logits, a multiple of 64 (whole
    GEMM tiles), at least 64, at most ``n_rows``."""
    rows = CHUNK_BYTES // max(vocab * element_size, 1)
    rows = max(64, rows // 64 * 64)
    return max(1, min(rows, n_rows))


def _chunks(n: int, c: int):
    for r0 in range(0, n, c):
        yield r0, min(r0 + c, n)


class _LinearTOFUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, params: TOFUParams, backend: Backend, chunk: int, fused: bool,
                normalizer: float | None):
        n, v = hidden.shape[0], weight.shape[0]
        shard = Shard(0, v)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        reduction = Reduction[params.reduction.upper()]
        count = None
        if params.check_inputs and host_checks_allowed(labels):
            check_label_range(labels, params.ignore_index, v)
            count = int((labels != params.ignore_index).sum())  # the same host sync
        zbuf = torch.empty(min(chunk, n), v, dtype=hidden.dtype, device=hidden.device)
        ctx.params, ctx.backend, ctx.chunk, ctx.fused, ctx.shard = params, backend, chunk, fused, shard
        if fused:
            # reduction mean/sum, a gradient wanted: loss and both gradients now
            if reduction == Reduction.MEAN and normalizer is None and count is None:
                count = int((labels != params.ignore_index).sum())
            if reduction != Reduction.MEAN:
                alpha = 1.0
            else:
                alpha = 1.0 / (normalizer if normalizer is not None else max(count, 1))
            dh = torch.empty_like(hidden) if need_h else None
            dw = torch.empty_like(weight) if need_w else None
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            ce = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for i, (r0, r1) in enumerate(_chunks(n, chunk)):
                z = torch.mm(hidden[r0:r1], weight.t(), out=zbuf[: r1 - r0])
                x, lay = row_layout(z)
                epi = backend.fused(x, lay, x, lay, labels[r0:r1], params, Reduction.SUM)
                loss += epi.loss_red
                ce += epi.ce_red
                if dh is not None:
                    dh[r0:r1].addmm_(z, weight, beta=0.0, alpha=alpha)
                if dw is not None:
                    dw.addmm_(z.t(), hidden[r0:r1], beta=0.0 if i == 0 else 1.0, alpha=alpha)
            ctx.grads = [dh, dw]
            ce = ce * alpha
            ctx.mark_non_differentiable(ce)
            ctx.set_materialize_grads(False)
            return loss * alpha, ce
        # two passes: per-token loss now, the gradient (if any) recomputed in the backward
        losses, ces, recs = [], [], []
        for r0, r1 in _chunks(n, chunk):
            z = torch.mm(hidden[r0:r1], weight.t(), out=zbuf[: r1 - r0])
            x, lay = row_layout(z)
            parts = backend.row_stats(x, lay, labels[r0:r1], shard, params.beta, params.ignore_index, False)
            epi = backend.epilogue(parts, labels[r0:r1], params, v, Reduction.NONE)
            losses.append(epi.loss)
            ces.append(epi.ce)
            recs.append(epi.grad_rec)
        del zbuf
        per_token, per_token_ce = torch.cat(losses), torch.cat(ces)
        if reduction == Reduction.NONE:
            loss, ce = per_token, per_token_ce
            scale = torch.ones((), dtype=torch.float32, device=hidden.device)
        elif normalizer is not None:
            scale = torch.full((), 1.0 / normalizer, dtype=torch.float32, device=hidden.device)
            loss, ce = per_token.sum() * scale, per_token_ce.sum() * scale
        else:
            loss, ce, scale = reduce_rows(per_token, per_token_ce, labels, params.ignore_index, reduction)
        if need_h or need_w:
            ctx.save_for_backward(hidden, weight, labels, torch.cat(recs), scale)
        ctx.mark_non_differentiable(ce)
        ctx.set_materialize_grads(False)
        return loss, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        if grad_loss is None:
            return (None,) * _N_INPUTS
        if ctx.fused:
            if ctx.grads is None:
                raise RuntimeError(
                    "linear_tofu_loss: the gradients were computed in the forward and have been handed out "
                    "already; to backward through this graph twice, use reduction='none'"
                )
            grads, ctx.grads = ctx.grads, None
            for g in grads:
                if g is not None:
                    g2, lay = row_layout(g)
                    ctx.backend.rescale(g2, lay, grad_loss)
            return (grads[0], grads[1]) + (None,) * (_N_INPUTS - 2)
        hidden, weight, labels, grad_rec, scale = ctx.saved_tensors
        params, backend, chunk, shard = ctx.params, ctx.backend, ctx.chunk, ctx.shard
        n, v = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.empty_like(weight) if need_w else None
        upstream = grad_loss.reshape(-1).float()
        zbuf = torch.empty(min(chunk, n), v, dtype=hidden.dtype, device=hidden.device)
        for i, (r0, r1) in enumerate(_chunks(n, chunk)):
            z = torch.mm(hidden[r0:r1], weight.t(), out=zbuf[: r1 - r0])
            x, lay = row_layout(z)
            up = upstream if upstream.numel() == 1 else upstream[r0:r1]
            backend.grad(x, lay, x, lay, labels[r0:r1], grad_rec[r0:r1], up, scale, shard, params.beta)
            if dh is not None:
                torch.mm(z, weight, out=dh[r0:r1])
            if dw is not None:
                dw.addmm_(z.t(), hidden[r0:r1], beta=0.0 if i == 0 else 1.0)
        return (dh, dw) + (None,) * (_N_INPUTS - 2)


def _check_linear(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> None:
    if not all(isinstance(t, torch.Tensor) for t in (hidden, weight, labels)):
        raise TypeError("linear_tofu_loss: hidden, weight and labels must be torch.Tensor")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"linear_tofu_loss: hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(
            f"linear_tofu_loss: weight ({weight.dtype}) and hidden ({hidden.dtype}) must have one dtype "
            "(nothing is cast silently)"
        )
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"linear_tofu_loss: labels must be int64 or int32, got {labels.dtype}")
    if weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"linear_tofu_loss: weight must be [V, D] with V > 0, got {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear_tofu_loss: hidden must be [..., D] with D = weight.shape[1] = {weight.shape[1]}, "
            f"got {tuple(hidden.shape)}"
        )
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            "linear_tofu_loss: labels must have the shape of hidden without its last dim: "
            f"hidden {tuple(hidden.shape)} vs labels {tuple(labels.shape)}"
        )
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(
            f"linear_tofu_loss: hidden ({hidden.device}), weight ({weight.device}) and labels "
            f"({labels.device}) must be on one device"
        )


def linear_tofu_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    reduction: str = "mean",
    backend: str = "auto",
    return_ce: bool = False,
    check_inputs: bool = True,
    chunk_size: int | None = None,
    normalizer: float | torch.Tensor | None = None,
):
    """TOFU loss of ``hidden @ weight.T`` without materialising the logits.

    Args:
        hidden: ``[..., D]`` float32/bfloat16/float16 (the last hidden states).
        weight: ``[V, D]`` the output layer's weight, same dtype (no bias).
        labels: ``[...]`` (``hidden``'s leading shape) target ids or ``ignore_index``.
        gamma, beta, ignore_index, reduction, backend, return_ce, check_inputs: as in
            :func:`tofu_kernels.tofu_loss`.
        chunk_size: tokens per chunk (default :func:`default_chunk_size`: a 128 MiB
            logits chunk). Extra memory is one ``[chunk, V]`` logits chunk, plus, for
            reduction "mean"/"sum", the two gradients (computed in the forward).
        normalizer: with ``reduction="mean"``, divide the summed loss by this positive
            number instead of the count of non-ignored tokens (e.g. Hugging Face's
            ``num_items_in_batch``, the count over all micro-batches); folded into the
            GEMMs, so the backward has nothing to rescale.

    Returns:
        fp32 loss (scalar, or ``labels``' shape for ``"none"``), or ``(loss, ce)``.
        Gradients flow into ``hidden`` and ``weight`` in their dtype. Eager mode only
        (a Python loop over chunks).
    """
    params = TOFUParams(gamma, beta, ignore_index, reduction, backend, False, return_ce, check_inputs)
    _check_linear(hidden, weight, labels)
    be = get_backend(params.backend, hidden.device)
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    if not h.is_contiguous():
        h = h.contiguous()
    flat = labels.reshape(-1)
    if flat.dtype != torch.int64 or not flat.is_contiguous():
        flat = flat.to(torch.int64).contiguous()
    n = h.shape[0]
    if normalizer is not None:
        if reduction != "mean":
            raise ValueError(f"linear_tofu_loss: normalizer goes with reduction='mean', got {reduction!r}")
        normalizer = float(normalizer.item() if torch.is_tensor(normalizer) else normalizer)
        if not (math.isfinite(normalizer) and normalizer > 0):
            raise ValueError(f"linear_tofu_loss: normalizer must be a positive finite number, got {normalizer}")
    if chunk_size is None:
        chunk = default_chunk_size(n, weight.shape[0], weight.element_size())
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"linear_tofu_loss: chunk_size must be a positive int, got {chunk_size!r}")
    else:
        chunk = chunk_size
    if n == 0:
        return empty_loss(labels, params, hidden, weight)
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    fused = wants_grad and reduction != "none"
    loss, ce = _LinearTOFUFunction.apply(h, weight, flat, params, be, chunk, fused, normalizer)
    if reduction == "none":
        loss, ce = loss.view(labels.shape), ce.view(labels.shape)
    return (loss, ce) if return_ce else loss


class LinearTOFULoss(_LossModule):
    """``nn.Module`` wrapper of :func:`linear_tofu_loss`: ``forward(hidden, weight, labels)``."""

    def __init__(
        self,
        *,
        gamma: float = DEFAULT_GAMMA,
        beta: float = DEFAULT_BETA,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        reduction: str = "mean",
        backend: str = "auto",
        chunk_size: int | None = None,
    ):
        super().__init__(TOFUParams(gamma, beta, ignore_index, reduction, backend), chunk_size=chunk_size)
        self.chunk_size = chunk_size

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p = self.params
        return linear_tofu_loss(hidden, weight, labels, gamma=p.gamma, beta=p.beta, ignore_index=p.ignore_index,
                                reduction=p.reduction, backend=p.backend, chunk_size=self.chunk_size)
