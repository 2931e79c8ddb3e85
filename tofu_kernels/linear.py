"""Fused linear + TOFU: the loss of ``hidden @ weight.T`` with at most one ``[C, V]`` logits
chunk alive, each chunk through the core's steps (docs/design.md section 8: the GEMMs of each
path, memory, time, precision, the rows that train, vocabulary parallelism)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import core
from .checks import check_linear_tensors, flat_labels
from .layout import row_layout
from .params import DEFAULT_BETA, DEFAULT_GAMMA, DEFAULT_IGNORE_INDEX, TOFUParams, check_flag
from .records import Reduction
from .vocab_parallel import TensorParallel

__all__ = [
    "LinearTOFULoss",
    "WeightGradSink",
    "default_chunk_size",
    "linear_tofu_loss",
    "logit_chunks",
    "loss_of_hidden",
    "vocab_parallel_linear_tofu_loss",
]

# The logits chunk's budget, e.g. 512 rows of a 128256-column bf16 vocabulary.
CHUNK_BYTES = 128 << 20
_N_INPUTS = 8  # arguments of _LinearTOFUFunction.forward after ctx


@dataclass(frozen=True)
class WeightGradSink:
    """Where the weight's gradient goes instead of autograd (two-pass path only): the
    backward calls ``add(dlogits, hidden)`` per chunk (``grad += dlogits.T @ hidden`` into the
    caller's buffer, e.g. Megatron's fp32 ``main_grad``) and hands autograd ``returned()``
    (None, or a placeholder the caller's hooks expect)."""

    add: Callable[[torch.Tensor, torch.Tensor], None]
    returned: Callable[[], torch.Tensor | None]


def default_chunk_size(n_rows: int, vocab: int, element_size: int) -> int:
    """Rows per chunk: as many as fit ``CHUNK_BYTES`` of logits, a multiple of 64 (whole
    GEMM tiles), at least 64, at most ``n_rows``."""
    rows = CHUNK_BYTES // max(vocab * element_size, 1)
    rows = max(64, rows // 64 * 64)
    return max(1, min(rows, n_rows))


def logit_chunks(hidden: torch.Tensor, weight: torch.Tensor, chunk: int):
    """Yield ``(i, r0, r1, z, lay)``: each chunk's logits ``z = hidden[r0:r1] @ weight.T``
    (GEMM 1) in one reused ``[chunk, V]`` buffer, and their row layout."""
    n = hidden.shape[0]
    buf = torch.empty(min(chunk, n), weight.shape[0], dtype=hidden.dtype, device=hidden.device)
    for i, r0 in enumerate(range(0, n, chunk)):
        r1 = min(r0 + chunk, n)
        z = torch.mm(hidden[r0:r1], weight.t(), out=buf[: r1 - r0])
        yield (i, r0, r1) + row_layout(z)


class _LinearTOFUFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden,
        weight,
        labels,
        plan: core.Plan,
        chunk: int,
        normalizer: float | None,
        reduce_dh: bool,
        sink: WeightGradSink | None,
    ):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        params, reduction = plan.params, plan.reduction
        ctx.plan, ctx.chunk, ctx.reduce_dh, ctx.sink = plan, chunk, reduce_dh, sink
        ctx.set_materialize_grads(False)
        if plan.grad_in_forward:
            # the loss and both gradients now, chunk by chunk
            if reduction != Reduction.MEAN:
                alpha = 1.0
            elif normalizer is not None:
                alpha = 1.0 / normalizer
            else:  # one host sync, for alpha
                alpha = 1.0 / max(int((labels != params.ignore_index).sum()), 1)
            dh = core.new_grad(hidden) if need_h else None
            dw = core.new_grad(weight) if need_w else None
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            ce = torch.zeros((), dtype=torch.float32, device=hidden.device)
            metrics = []
            for i, r0, r1, z, lay in logit_chunks(hidden, weight, chunk):
                epi = core.grad_in_forward(plan, z, lay, z, lay, labels[r0:r1], Reduction.SUM)
                loss += epi.loss_red
                ce += epi.ce_red
                metrics.append(epi.metrics)
                if dh is not None:
                    dh[r0:r1].addmm_(z, weight, beta=0.0, alpha=alpha)
                if dw is not None:
                    dw.addmm_(z.t(), hidden[r0:r1], beta=0.0 if i == 0 else 1.0, alpha=alpha)
            ctx.grads = [dh, dw]
            ce = ce * alpha
            met = (
                None
                if metrics[0] is None
                else metrics[0]
                if len(metrics) == 1
                else torch.cat(metrics)
            )
            return core.outputs(ctx, loss * alpha, ce, met)
        # two passes: every chunk's statistics into one buffer, then one epilogue
        chunks = (c[1:] for c in logit_chunks(hidden, weight, chunk))
        parts = core.chunk_stats(plan, chunks, labels, hidden.shape[0])
        if normalizer is None:
            epi = core.finish(plan, parts, labels, reduction)
            scale = epi.scale
            loss, ce = (
                (epi.loss, epi.ce) if reduction == Reduction.NONE else (epi.loss_red, epi.ce_red)
            )
        else:
            epi = core.finish(plan, parts, labels, Reduction.SUM)
            scale = torch.full((), 1.0 / normalizer, dtype=torch.float32, device=hidden.device)
            loss, ce = epi.loss_red * scale, epi.ce_red * scale
        if need_h or need_w:
            ctx.save_for_backward(hidden, weight, labels, epi.grad_rec, scale)
        return core.outputs(ctx, loss, ce, epi.metrics)

    @staticmethod
    def backward(ctx, grad_loss, *_):  # the cross entropy and the metrics have no gradient
        if grad_loss is None:
            return (None,) * _N_INPUTS
        core.refuse_double_backward("linear_tofu_loss")
        plan = ctx.plan
        if plan.grad_in_forward:
            if ctx.grads is None:
                raise RuntimeError(
                    "linear_tofu_loss: the gradients were computed in the forward and have been handed out "
                    "already; to backward through this graph twice, use reduction='none'"
                )
            grads, ctx.grads = ctx.grads, None
            for g in grads:
                if g is not None:
                    core.rescale(plan, *row_layout(g), grad_loss)
            return (grads[0], grads[1]) + (None,) * (_N_INPUTS - 2)
        hidden, weight, labels, grad_rec, scale = ctx.saved_tensors
        need_h, need_w, sink = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.sink
        dh = core.new_grad(hidden) if need_h else None
        dw = core.new_grad(weight) if need_w and sink is None else None
        upstream = grad_loss.reshape(-1).float()
        for i, r0, r1, z, lay in logit_chunks(hidden, weight, ctx.chunk):
            up = upstream if upstream.numel() == 1 else upstream[r0:r1]
            core.grad(plan, z, lay, z, lay, labels[r0:r1], grad_rec[r0:r1], up, scale)
            if dh is not None:
                torch.mm(z, weight, out=dh[r0:r1])
            if dw is not None:
                dw.addmm_(z.t(), hidden[r0:r1], beta=0.0 if i == 0 else 1.0)
            elif need_w:
                sink.add(z, hidden[r0:r1])
        if dh is not None and plan.tp is not None and ctx.reduce_dh:
            dist.all_reduce(dh, group=plan.tp.group)  # every rank's shard contributes to dhidden
        if need_w and sink is not None:
            dw = sink.returned()
        return (dh, dw) + (None,) * (_N_INPUTS - 2)


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
    return_metrics: bool = False,
    check_inputs: bool = True,
    chunk_size: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    skip_ignored: bool = True,
):
    """TOFU loss of ``hidden @ weight.T`` without materialising the logits (docs/api.md).

    Args:
        hidden: ``[..., D]`` fp32/bf16/fp16 (the last hidden states).
        weight: ``[V, D]`` the output layer's weight, same dtype (no bias).
        labels: ``[...]`` (``hidden``'s leading shape) target ids or ``ignore_index``.
        gamma, beta, ignore_index, reduction, backend, return_ce, return_metrics,
            check_inputs: as in :func:`tofu_kernels.tofu_loss`.
        chunk_size: tokens per chunk (default :func:`default_chunk_size`). Extra memory:
            one ``[chunk, V]`` logits chunk, plus both gradients for "mean"/"sum".
        normalizer: with ``reduction="mean"``, divide the summed loss by this positive
            number instead of the non-ignored token count (Hugging Face's
            ``num_items_in_batch``).
        skip_ignored: compute only the rows that train (one host sync, eager mode); the
            others get loss 0, metrics 0 and zero gradients, as computing them would.

    Returns:
        As :func:`tofu_kernels.tofu_loss`. Gradients flow into ``hidden`` and ``weight`` in
        their dtype; under autocast both are cast first, as ``nn.Linear`` would. Eager mode
        only (a Python loop over chunks).
    """
    params = TOFUParams(
        gamma=gamma,
        beta=beta,
        ignore_index=ignore_index,
        reduction=reduction,
        backend=backend,
        return_ce=return_ce,
        return_metrics=return_metrics,
        check_inputs=check_inputs,
    )
    return loss_of_hidden(
        hidden,
        weight,
        labels,
        params,
        chunk_size=chunk_size,
        normalizer=normalizer,
        skip_ignored=skip_ignored,
    )


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
    return_metrics: bool = False,
    check_inputs: bool = True,
    chunk_size: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    skip_ignored: bool = True,
    group=None,
    vocab_start: int | None = None,
    vocab_end: int | None = None,
    reduce_hidden_grad: bool = True,
):
    """:func:`linear_tofu_loss` with the output layer's weight sharded over the vocabulary
    (its GEMMs and collectives: docs/design.md section 8).

    Args:
        hidden: ``[..., D]``, identical on every rank of ``group``.
        weight_shard: ``[Vr, D]`` this rank's rows of the weight, same dtype as ``hidden``.
        labels: ``[...]`` global ids (identical on all ranks) or ``ignore_index``.
        gamma ... skip_ignored: as in :func:`linear_tofu_loss`.
        group, vocab_start, vocab_end: as in :func:`tofu_kernels.vocab_parallel_tofu_loss`
            (rows ``[vocab_end - vocab_start, Vr)`` of the shard are padding).
        reduce_hidden_grad: all-reduce ``hidden``'s gradient over ``group`` in the backward;
            False when the caller does (Megatron's copy-to-tensor-parallel region).

    The loss is identical on every rank; ``weight_shard`` gets its rows' gradient (0 in
    padding rows).
    """
    params = TOFUParams(
        gamma=gamma,
        beta=beta,
        ignore_index=ignore_index,
        reduction=reduction,
        backend=backend,
        return_ce=return_ce,
        return_metrics=return_metrics,
        check_inputs=check_inputs,
    )
    return loss_of_hidden(
        hidden,
        weight_shard,
        labels,
        params,
        chunk_size=chunk_size,
        normalizer=normalizer,
        skip_ignored=skip_ignored,
        tp=TensorParallel(group, vocab_start, vocab_end),
        reduce_hidden_grad=reduce_hidden_grad,
    )


def loss_of_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    params: TOFUParams,
    *,
    chunk_size: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    skip_ignored: bool = True,
    tp: TensorParallel | None = None,
    reduce_hidden_grad: bool = True,
    weight_grad: WeightGradSink | None = None,
):
    """What :func:`linear_tofu_loss` and :func:`vocab_parallel_linear_tofu_loss` return,
    under a ready ``params`` (``weight`` this rank's rows with ``tp``); ``weight_grad``: a
    :class:`WeightGradSink` (reduction "none" only)."""
    dev = hidden.device.type if isinstance(hidden, torch.Tensor) else None
    if dev is not None and torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
        # as nn.Linear: GEMMs in the autocast dtype (differentiable casts: gradients come
        # back in the inputs' dtypes)
        dt = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(dt), weight.to(dt)
        with torch.autocast(dev, enabled=False):
            return loss_of_hidden(
                hidden,
                weight,
                labels,
                params,
                chunk_size=chunk_size,
                normalizer=normalizer,
                skip_ignored=skip_ignored,
                tp=tp,
                reduce_hidden_grad=reduce_hidden_grad,
                weight_grad=weight_grad,
            )
    check_linear_tensors(hidden, weight, labels)
    check_flag(reduce_hidden_grad, "reduce_hidden_grad", "linear_tofu_loss")
    check_flag(skip_ignored, "skip_ignored", "linear_tofu_loss")
    width = weight.shape[0]
    h = hidden.reshape(-1, hidden.shape[-1])
    if not h.is_contiguous():
        h = h.contiguous()
    n = h.shape[0]
    if normalizer is not None:
        if params.reduction != "mean":
            raise ValueError(
                f"linear_tofu_loss: normalizer goes with reduction='mean', got {params.reduction!r}"
            )
        normalizer = float(normalizer.item() if torch.is_tensor(normalizer) else normalizer)
        if not (math.isfinite(normalizer) and normalizer > 0):
            raise ValueError(
                f"linear_tofu_loss: normalizer must be a positive finite number, got {normalizer}"
            )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"linear_tofu_loss: chunk_size must be a positive int, got {chunk_size!r}")
    if weight_grad is not None and params.reduction != "none":
        raise ValueError(
            "linear_tofu_loss: weight_grad goes with reduction='none' (the two-pass path)"
        )
    flat = flat_labels(labels)
    plan = core.plan(params, flat, width, hidden.device, tp, (hidden, weight))
    rows = core.training_rows(flat, params.ignore_index) if skip_ignored and n else None
    if n == 0 or (rows is not None and rows.numel() == 0):
        return core.empty_loss(labels, params, hidden, weight)
    h_run, flat_run = h, flat
    if rows is not None:  # the rows that train, gathered once (docs/design.md section 8)
        h_run, flat_run = h.index_select(0, rows), flat.index_select(0, rows)
        if params.reduction == "mean" and normalizer is None:
            normalizer = float(rows.numel())  # the mean's count: this sync's, not a second one
    chunk = chunk_size or default_chunk_size(h_run.shape[0], width, weight.element_size())
    loss, ce, *metrics = _LinearTOFUFunction.apply(
        h_run, weight, flat_run, plan, chunk, normalizer, reduce_hidden_grad, weight_grad
    )
    if rows is not None and plan.reduction == Reduction.NONE:
        loss, ce = _spread(loss, rows, n), _spread(ce, rows, n)
    if rows is not None and metrics:
        metrics = [_spread(metrics[0], rows, n)]
    if plan.reduction == Reduction.NONE:
        loss, ce = loss.view(labels.shape), ce.view(labels.shape)
    return core.results(params, loss, ce, metrics, labels.shape)


def _spread(values: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Per-row ``values`` of ``rows`` put back among ``n`` rows, 0 elsewhere (differentiable)."""
    return values.new_zeros((n, *values.shape[1:])).index_copy(0, rows, values)


class LinearTOFULoss(core.LossModule):
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
        skip_ignored: bool = True,
    ):
        check_flag(skip_ignored, "skip_ignored", "LinearTOFULoss")
        super().__init__(
            TOFUParams(
                gamma=gamma,
                beta=beta,
                ignore_index=ignore_index,
                reduction=reduction,
                backend=backend,
            ),
            chunk_size=chunk_size,
            skip_ignored=skip_ignored,
        )

    def forward(
        self, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        return loss_of_hidden(
            hidden,
            weight,
            labels,
            self.params,
            chunk_size=self.chunk_size,
            skip_ignored=self.skip_ignored,
        )
