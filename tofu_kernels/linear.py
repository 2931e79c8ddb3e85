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
    ``alpha`` is the mean's 1 / (non-ignored tokens), folded into the GEMMs (counted on
    the host: one sync per call, beside the label check's).

two passes (reduction "none", or no gradient wanted; 4 GEMMs when a gradient is wanted):
    forward:    z = h_c @ W.T and backend.row_stats per chunk, the splits merged into one
                [N, 4] buffer; one backend.epilogue for all rows; the logits chunk is
                dropped, the backward keeps one fp32 record per row
    backward:   z = h_c @ W.T again; backend.grad(z -> z) with the per-token upstream
                gradient; GEMMs 2 and 3 as above

vocabulary parallel (:func:`vocab_parallel_linear_tofu_loss`, weight sharded ``[V/tp, D]``):
    the two-pass way on this rank's shard, with the tensor-parallel protocol of
    :mod:`tofu_kernels.vocab_parallel`: every chunk's statistics records land in one
    ``[N, 4]`` buffer, ONE all-gather for all of them, one epilogue; the backward
    recomputes the shard's logits per chunk and all-reduces dhidden (the one collective
    of a column-parallel linear's backward; ``reduce_hidden_grad=False`` leaves it to the
    caller, e.g. Megatron's copy-to-tensor-parallel region).

Precision: GEMMs accumulate in fp32 (cuBLAS / CPU BLAS) and round once to the inputs'
dtype; the TOFU statistics are fp32 in the kernels. dW is the sum over chunks of one GEMM
each, accumulated in dW's dtype: ceil(N / C) roundings instead of one (bf16: a relative
error ~ sqrt(N / C) * 2^-9; tested against fp64). ``chunk_size`` trades memory for fewer
roundings and larger GEMMs.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ._inputs import Shard, check_label_range, flat_labels, host_checks_allowed, row_layout
from .backends import Backend, get_backend
from .loss import _LossModule, empty_loss
from .params import DEFAULT_BETA, DEFAULT_GAMMA, DEFAULT_IGNORE_INDEX, TOFUParams
from .tofu_math import Partials, Reduction, Stat, combine_stats, meta_record
from .vocab_parallel import TensorParallel, all_gather_stats, check_shards, resolve

__all__ = ["LinearTOFULoss", "default_chunk_size", "linear_tofu_loss", "vocab_parallel_linear_tofu_loss"]

# The logits chunk's budget: 128 MiB, e.g. 512 rows of a 128256-column bf16 vocabulary.
CHUNK_BYTES = 128 << 20
_N_INPUTS = 11  # arguments of _LinearTOFUFunction.forward after ctx


def default_chunk_size(n_rows: int, vocab: int, element_size: int) -> int:
    """Rows per chunk: as many as fit ``CHUNK_BYTES`` of logits, a multiple of 64 (whole
    GEMM tiles), at least 64, at most ``n_rows``."""
    rows = CHUNK_BYTES // max(vocab * element_size, 1)
    rows = max(64, rows // 64 * 64)
    return max(1, min(rows, n_rows))


def _dense_like(t: torch.Tensor) -> torch.Tensor:
    """A contiguous buffer for ``t``'s gradient, whatever ``t``'s strides (e.g. a transposed,
    tied weight): the GEMMs write it and the backend's rescale walks it row by row."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _logit_chunks(hidden: torch.Tensor, weight: torch.Tensor, chunk: int):
    """Yield ``(i, r0, r1, z, lay)``: the logits ``z = hidden[r0:r1] @ weight.T`` of each
    chunk of rows, all in one reused ``[chunk, V]`` buffer (GEMM 1), and their row layout."""
    n = hidden.shape[0]
    buf = torch.empty(min(chunk, n), weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    for i, r0 in enumerate(range(0, n, chunk)):
        r1 = min(r0 + chunk, n)
        z = torch.mm(hidden[r0:r1], weight.t(), out=buf[: r1 - r0])
        yield (i, r0, r1) + row_layout(z)


class _LinearTOFUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, params: TOFUParams, backend: Backend, chunk: int, fused: bool,
                normalizer: float | None, shard: Shard, tp: TensorParallel | None, reduce_dh: bool):
        n, width = hidden.shape[0], weight.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        reduction = Reduction[params.reduction.upper()]
        check = params.check_inputs and host_checks_allowed(labels)
        ctx.params, ctx.backend, ctx.chunk, ctx.fused, ctx.shard = params, backend, chunk, fused, shard
        ctx.tp, ctx.reduce_dh = tp, reduce_dh
        ctx.set_materialize_grads(False)
        if fused:
            # whole rows on one device, reduction mean/sum, a gradient wanted: the loss and
            # both gradients now
            count = None
            if check:
                check_label_range(labels, params.ignore_index, width)
            if reduction == Reduction.MEAN and normalizer is None:
                count = int((labels != params.ignore_index).sum())  # one host sync, for alpha
            if reduction != Reduction.MEAN:
                alpha = 1.0
            else:
                alpha = 1.0 / (normalizer if normalizer is not None else max(count, 1))
            dh = _dense_like(hidden) if need_h else None
            dw = _dense_like(weight) if need_w else None
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            ce = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for i, r0, r1, z, lay in _logit_chunks(hidden, weight, chunk):
                epi = backend.fused(z, lay, z, lay, labels[r0:r1], params, Reduction.SUM)
                loss += epi.loss_red
                ce += epi.ce_red
                if dh is not None:
                    dh[r0:r1].addmm_(z, weight, beta=0.0, alpha=alpha)
                if dw is not None:
                    dw.addmm_(z.t(), hidden[r0:r1], beta=0.0 if i == 0 else 1.0, alpha=alpha)
            ctx.grads = [dh, dw]
            ce = ce * alpha
            ctx.mark_non_differentiable(ce)
            return loss * alpha, ce
        # two passes: every chunk's statistics into one [N, len(Stat)] buffer (and this
        # rank's metadata record under tensor parallelism), then one epilogue
        data = torch.empty(n + int(tp is not None), len(Stat), dtype=torch.float32, device=hidden.device)
        for _, r0, r1, z, lay in _logit_chunks(hidden, weight, chunk):
            rec = backend.row_stats(z, lay, labels[r0:r1], shard, params.beta, params.ignore_index, False).records()[0]
            data[r0:r1] = rec[:, 0] if rec.shape[1] == 1 else combine_stats(rec, params.beta, dim=1)
        vocab_size = shard.vocab_end
        parts = Partials(data, n, 1, has_meta=tp is not None)
        if tp is not None:
            data[n] = meta_record(shard.vocab_start, shard.vocab_end, width, n, data.device)
            parts, vocab_size = all_gather_stats(parts, tp), None  # the one collective
        if check:
            global_v = shard.vocab_end if tp is None else check_shards(parts, tp.explicit)
            check_label_range(labels, params.ignore_index, global_v)
        if normalizer is None:
            epi = backend.epilogue(parts, labels, params, vocab_size, reduction)
            scale = epi.scale
            loss, ce = (epi.loss, epi.ce) if reduction == Reduction.NONE else (epi.loss_red, epi.ce_red)
        else:
            epi = backend.epilogue(parts, labels, params, vocab_size, Reduction.SUM)
            scale = torch.full((), 1.0 / normalizer, dtype=torch.float32, device=hidden.device)
            loss, ce = epi.loss_red * scale, epi.ce_red * scale
        if need_h or need_w:
            ctx.save_for_backward(hidden, weight, labels, epi.grad_rec, scale)
        ctx.mark_non_differentiable(ce)
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
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = _dense_like(hidden) if need_h else None
        dw = _dense_like(weight) if need_w else None
        upstream = grad_loss.reshape(-1).float()
        for i, r0, r1, z, lay in _logit_chunks(hidden, weight, chunk):
            up = upstream if upstream.numel() == 1 else upstream[r0:r1]
            backend.grad(z, lay, z, lay, labels[r0:r1], grad_rec[r0:r1], up, scale, shard, params.beta)
            if dh is not None:
                torch.mm(z, weight, out=dh[r0:r1])
            if dw is not None:
                dw.addmm_(z.t(), hidden[r0:r1], beta=0.0 if i == 0 else 1.0)
        if dh is not None and ctx.tp is not None and ctx.reduce_dh:
            dist.all_reduce(dh, group=ctx.tp.group)  # every rank's shard contributes to dhidden
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
        Gradients flow into ``hidden`` and ``weight`` in their dtype. Under autocast both
        are cast to the autocast dtype first, as ``nn.Linear`` would. Eager mode only (a
        Python loop over chunks).
    """
    params = TOFUParams(gamma, beta, ignore_index, reduction, backend, False, return_ce, check_inputs)
    return _linear(hidden, weight, labels, params, chunk_size, normalizer, None, True)


def vocab_parallel_linear_tofu_loss(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
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
    group=None,
    vocab_start: int | None = None,
    vocab_end: int | None = None,
    reduce_hidden_grad: bool = True,
):
    """:func:`linear_tofu_loss` with the output layer's weight sharded over the vocabulary.

    Args:
        hidden: ``[..., D]``, identical on every rank of ``group``.
        weight_shard: ``[Vr, D]`` this rank's rows of the weight (Megatron's
            column-parallel output layer), same dtype as ``hidden``.
        labels: ``[...]`` global ids (identical on all ranks) or ``ignore_index``.
        gamma ... normalizer: as in :func:`linear_tofu_loss`.
        group, vocab_start, vocab_end: as in :func:`tofu_kernels.vocab_parallel_tofu_loss`
            (rows ``[vocab_end - vocab_start, Vr)`` of the shard are padding).
        reduce_hidden_grad: all-reduce ``hidden``'s gradient over ``group`` in the backward
            (each rank's shard contributes a part). False when the caller reduces it, as
            Megatron's copy-to-tensor-parallel region does.

    One all-gather in the forward (4 fp32 per token and a metadata record), the logits of
    the shard recomputed in the backward (4 GEMMs on the shard), one all-reduce of
    ``hidden``'s gradient. The loss is identical on every rank; ``weight_shard`` gets its
    rows' gradient (0 in padding rows).
    """
    params = TOFUParams(gamma, beta, ignore_index, reduction, backend, False, return_ce, check_inputs)
    return _linear(hidden, weight_shard, labels, params, chunk_size, normalizer,
                   TensorParallel(group, vocab_start, vocab_end), reduce_hidden_grad)


def _linear(hidden, weight, labels, params: TOFUParams, chunk_size, normalizer, tp: TensorParallel | None,
            reduce_dh: bool):
    """Shared body of linear_tofu_loss and vocab_parallel_linear_tofu_loss."""
    dev = hidden.device.type if isinstance(hidden, torch.Tensor) else None
    if dev is not None and torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        # what nn.Linear does under autocast: the GEMMs in the autocast dtype (the casts are
        # differentiable: gradients come back in the inputs' own dtypes)
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
        with torch.autocast(dev, enabled=False):
            return _linear(hidden, weight, labels, params, chunk_size, normalizer, tp, reduce_dh)
    _check_linear(hidden, weight, labels)
    be = get_backend(params.backend, hidden.device)
    width = weight.shape[0]
    shard, tp = resolve(tp, width)
    d = hidden.shape[-1]
    h = hidden.reshape(-1, d)
    if not h.is_contiguous():
        h = h.contiguous()
    flat = flat_labels(labels)
    n = h.shape[0]
    if normalizer is not None:
        if params.reduction != "mean":
            raise ValueError(f"linear_tofu_loss: normalizer goes with reduction='mean', got {params.reduction!r}")
        normalizer = float(normalizer.item() if torch.is_tensor(normalizer) else normalizer)
        if not (math.isfinite(normalizer) and normalizer > 0):
            raise ValueError(f"linear_tofu_loss: normalizer must be a positive finite number, got {normalizer}")
    if chunk_size is None:
        chunk = default_chunk_size(n, width, weight.element_size())
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"linear_tofu_loss: chunk_size must be a positive int, got {chunk_size!r}")
    else:
        chunk = chunk_size
    if n == 0:
        return empty_loss(labels, params, hidden, weight)
    wants_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    fused = wants_grad and params.reduction != "none" and tp is None and shard == Shard(0, width)
    loss, ce = _LinearTOFUFunction.apply(h, weight, flat, params, be, chunk, fused, normalizer, shard, tp, reduce_dh)
    if params.reduction == "none":
        loss, ce = loss.view(labels.shape), ce.view(labels.shape)
    return (loss, ce) if params.return_ce else loss


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

    def forward(self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        p = self.params
        return linear_tofu_loss(hidden, weight, labels, gamma=p.gamma, beta=p.beta, ignore_index=p.ignore_index,
                                reduction=p.reduction, backend=p.backend, chunk_size=self.chunk_size)
