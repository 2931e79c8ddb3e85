"""The one orchestration of a TOFU loss call, shared by every entry point: the steps in
order, the path and the gradient buffers (docs/design.md section 5, "One call"; the paths:
section 3). Only this module calls a backend."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from .backends import Backend, get_backend
from .checks import check_label_range, host_checks_allowed
from .layout import RowLayout, Shard, dense_layout
from .params import TOFUParams
from .records import Epilogue, Metric, Partials, Reduction, Stat, TokenMetrics, meta_record
from .tofu_math import combine_stats
from .vocab_parallel import TensorParallel, all_gather_stats, check_shards, exchange_meta, resolve

__all__ = [
    "LossModule",
    "Plan",
    "chunk_stats",
    "empty_loss",
    "finish",
    "grad",
    "grad_buffer",
    "grad_in_forward",
    "new_grad",
    "outputs",
    "plan",
    "refuse_double_backward",
    "rescale",
    "results",
    "row_stats",
    "training_rows",
]


@dataclass(frozen=True)
class Plan:
    """Everything decided once per call (by :func:`plan`); the steps below only follow it."""

    params: TOFUParams
    reduction: Reduction
    backend: Backend
    width: int  # columns per row (the shard's, padding included)
    shard: Shard  # the global columns this rank's rows hold
    tp: TensorParallel | None  # None: nothing to merge across ranks
    check: bool  # host-synchronising checks run in this call
    grad_in_forward: bool  # the path: gradient in the forward, else two passes


def plan(
    params: TOFUParams,
    labels: torch.Tensor,
    width: int,
    device: torch.device,
    tp: TensorParallel | None,
    inputs: Iterable[torch.Tensor],
) -> Plan:
    """Decide the call: ``labels`` flat int64, rows ``width`` wide on ``device``, ``tp``
    None on one device, ``inputs`` the tensors a gradient may be wanted for."""
    backend = get_backend(params.backend, device)
    shard, tp = resolve(tp, width)
    check = params.check_inputs and host_checks_allowed(labels)
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
    path = _grad_in_forward(params, shard, tp, width, wants_grad)
    if check and tp is None:
        check_label_range(labels, params.ignore_index, shard.vocab_end)
    return Plan(params, Reduction[params.reduction.upper()], backend, width, shard, tp, check, path)


def _grad_in_forward(
    params: TOFUParams, shard: Shard, tp: TensorParallel | None, width: int, wants_grad: bool
) -> bool:
    """The path: gradient in the forward where possible (reduction "mean"/"sum", whole rows
    on one device, a gradient wanted); ``grad_in_forward`` None: where possible, False:
    never, True: required."""
    possible = params.reduction != "none" and tp is None and shard == Shard(0, width) and wants_grad
    if params.grad_in_forward and not possible:
        raise ValueError(
            "tofu_loss: grad_in_forward=True needs reduction 'mean' or 'sum', whole rows on one device "
            "(not vocab-parallel) and logits that require grad (with grad mode on)"
        )
    return possible and params.grad_in_forward is not False


def refuse_double_backward(who: str) -> None:
    """Raise in a backward asked for a second derivative (``create_graph=True``): the
    kernels' gradient has no derivative, and silently dropping it would be a wrong answer."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{who}: a second derivative (backward with create_graph=True) is not supported: the gradient "
            "is computed by a kernel that has no derivative of its own; take the gradient with "
            "create_graph=False"
        )


def training_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """The rows of flat ``labels`` that train, in order (one host sync); None when every
    row trains or no host sync may run (torch.compile, CUDA-graph capture, fake tensors)."""
    if not host_checks_allowed(labels):
        return None
    rows = (labels != ignore_index).nonzero().squeeze(1)
    return None if rows.numel() == labels.numel() else rows


# ------------------------------------------------------------------ output buffers


def new_grad(t: torch.Tensor) -> torch.Tensor:
    """A contiguous buffer for ``t``'s gradient, whatever ``t``'s strides."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def grad_buffer(x: torch.Tensor, lay: RowLayout, inplace: bool) -> tuple[torch.Tensor, RowLayout]:
    """Where ``x``'s gradient goes, and its layout: ``x`` itself when ``inplace`` (``x``
    must be dead after the loss), else a new contiguous buffer with ``x``'s row grouping."""
    if inplace:
        return x, lay
    return new_grad(x), dense_layout(lay)


def _overwritten(x: torch.Tensor, out: torch.Tensor) -> None:
    if out is x:
        # the logits now hold the gradient: a later use through autograd fails loudly
        torch.autograd.graph.increment_version(x)


# ------------------------------------------------------------------ gradient in the forward


def grad_in_forward(
    p: Plan,
    x: torch.Tensor,
    lay: RowLayout,
    out: torch.Tensor,
    out_lay: RowLayout,
    labels: torch.Tensor,
    reduction: Reduction,
) -> Epilogue:
    """Loss, cross entropy and, into ``out``, the gradient for an upstream gradient of 1."""
    epi = p.backend.grad_in_forward(x, lay, out, out_lay, labels, p.params, reduction)
    _overwritten(x, out)
    return epi


def rescale(p: Plan, out: torch.Tensor, out_lay: RowLayout, grad_out: torch.Tensor) -> None:
    """``out *= grad_out`` (one element), on the device; nothing to do when it is 1."""
    p.backend.rescale(out, out_lay, grad_out)


# ------------------------------------------------------------------ two passes


def row_stats(p: Plan, x: torch.Tensor, lay: RowLayout, labels: torch.Tensor) -> Partials:
    """Every row's partial statistics (and this rank's metadata record under TP)."""
    return p.backend.row_stats(x, lay, labels, p.shard, p.params, p.tp is not None)


def chunk_stats(
    p: Plan,
    chunks: Iterable[tuple[int, int, torch.Tensor, RowLayout]],
    labels: torch.Tensor,
    n_rows: int,
) -> Partials:
    """:func:`row_stats` of logits that arrive in chunks ``(r0, r1, z, lay)`` (rows
    ``[r0, r1)``; a chunk's buffer may be reused once the next is asked for), merged into
    one :class:`Partials` for one :func:`finish`."""
    out = Partials(labels, n_rows, 1, has_meta=p.tp is not None, metrics=p.params.return_metrics)
    out = out._replace(data=torch.empty(out.per_rank(), dtype=torch.float32, device=labels.device))
    data = out.data[: (n_rows + int(out.has_meta)) * len(Stat)].view(-1, len(Stat))
    accs = out.metric_accs()[0, :, 0] if out.metrics else None
    for r0, r1, z, lay in chunks:
        parts = p.backend.row_stats(z, lay, labels[r0:r1], p.shard, p.params, False)
        rec = parts.records()[0]
        if rec.shape[1] == 1:
            data[r0:r1] = rec[:, 0]
            if accs is not None:
                accs[r0:r1] = parts.metric_accs()[0, :, 0]
        elif accs is None:
            data[r0:r1] = combine_stats(rec, p.params.beta, dim=1)
        else:
            data[r0:r1], accs[r0:r1] = combine_stats(rec, p.params.beta, 1, parts.metric_accs()[0])
    if p.tp is not None:
        data[n_rows] = meta_record(
            p.shard.vocab_start, p.shard.vocab_end, p.width, n_rows, labels.device
        )
    return out


def finish(p: Plan, parts: Partials, labels: torch.Tensor, reduction: Reduction) -> Epilogue:
    """From this rank's partial records to the loss: under TP the checks and the all-gather
    (docs/design.md section 4), then the epilogue."""
    vocab_size = p.shard.vocab_end
    if p.tp is not None:
        if p.check:  # the ranks' records first: a mismatch is the same error on every rank
            check_label_range(
                labels,
                p.params.ignore_index,
                check_shards(exchange_meta(parts, p.tp), p.tp.explicit),
            )
        parts = all_gather_stats(parts, p.tp)
        vocab_size = None  # the epilogue reads V from the ranks
    return p.backend.epilogue(parts, labels, p.params, vocab_size, reduction)


def grad(
    p: Plan,
    x: torch.Tensor,
    lay: RowLayout,
    out: torch.Tensor,
    out_lay: RowLayout,
    labels: torch.Tensor,
    grad_rec: torch.Tensor,
    upstream: torch.Tensor,
    scale: torch.Tensor,
) -> None:
    """Write ``upstream_i * scale * g_i * (softmax(z / beta) - onehot)`` into ``out``
    (``upstream`` a scalar or one value per row); 0 in padding columns."""
    p.backend.grad(x, lay, out, out_lay, labels, grad_rec, upstream, scale, p.shard, p.params)
    _overwritten(x, out)


# ------------------------------------------------------------------ what every entry point shares


def outputs(ctx, loss: torch.Tensor, ce: torch.Tensor, metrics: torch.Tensor | None) -> tuple:
    """An autograd Function's outputs, all but the loss non-differentiable; the metrics only
    where asked for (no ``None`` output: torch.compile traces a fixed tuple of tensors)."""
    out = (loss, ce) if metrics is None else (loss, ce, metrics)
    ctx.mark_non_differentiable(*out[1:])
    return out


def results(params: TOFUParams, loss: torch.Tensor, ce: torch.Tensor, metrics, shape):
    """What a loss call returns: ``loss``, then ``ce`` and :class:`TokenMetrics` where asked
    for (a tuple when more than the loss). ``metrics``: ``[N, len(Metric)]``, or a list
    holding it (a Function's trailing outputs)."""
    out = (loss,) + ((ce,) if params.return_ce else ())
    if params.return_metrics:
        out += (TokenMetrics.of(metrics[0] if isinstance(metrics, list) else metrics, shape),)
    return out if len(out) > 1 else loss


def empty_loss(labels: torch.Tensor, params: TOFUParams, *inputs: torch.Tensor):
    """The result for no token that trains, nothing launched: fp32 zeros of the right
    shapes, and a zero gradient for every input that requires one."""
    zero = sum(t.sum() for t in inputs) * 0.0
    per_token = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    loss = per_token + zero if params.reduction == "none" else zero.float()
    ce = per_token if params.reduction == "none" else zero.detach().float()
    metrics = torch.zeros(labels.numel(), len(Metric), dtype=torch.float32, device=labels.device)
    return results(params, loss, ce, metrics, labels.shape)


class LossModule(torch.nn.Module):
    """Base of the loss modules: :class:`TOFUParams` fixed at construction, extra settings
    (``chunk_size``) as attributes, one repr."""

    def __init__(self, params: TOFUParams, **extra):
        super().__init__()
        self.params = params
        self._extra = tuple(extra)
        for name, value in extra.items():
            setattr(self, name, value)

    def extra_repr(self) -> str:
        p = self.params
        fields = [
            f"gamma={p.gamma}",
            f"beta={p.beta}",
            f"ignore_index={p.ignore_index}",
            f"reduction={p.reduction!r}",
            f"backend={p.backend!r}",
        ]
        return ", ".join(fields + [f"{k}={getattr(self, k)!r}" for k in self._extra])
