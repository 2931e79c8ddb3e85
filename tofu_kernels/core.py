"""The one orchestration of a TOFU loss call, shared by every entry point.

``tofu_loss`` and ``vocab_parallel_tofu_loss`` (``loss.py``) run it once over a logits
tensor; the fused linear losses (``linear.py``) run it over chunks of logits they compute
themselves (a chunk at a time with the gradient in the forward, all chunks' records at
once otherwise). The steps, in order (docs/design.md sections 3 and 5):

:func:`plan`, once per call, before any kernel
    the backend; this rank's shard and the tensor-parallel group (None when there is no
    one to talk to); whether host-synchronising checks run (eager mode only, never under
    torch.compile or CUDA-graph capture); the path, gradient in the forward or two
    passes; and, where the vocabulary size is known without communication (one device),
    the label check.

gradient in the forward (a scalar upstream gradient, whole rows on one device):
    :func:`grad_in_forward`  loss and the gradient for an upstream of 1, while each row is
                          on chip, into :func:`grad_buffer` (the logits themselves in place)
    :func:`rescale`       in the backward: times the upstream gradient

two passes (any upstream gradient; the only way under tensor parallelism):
    :func:`row_stats` / :func:`chunk_stats`   one read of the logits -> partial records
    :func:`finish`        under tensor parallelism the one all-gather of the statistics
                          (where inputs are checked, after a 16-byte exchange of the
                          ranks' metadata: shard, token-count and label checks); then
                          the epilogue (loss, cross entropy, the backward's record,
                          the reduction: one kernel on the GPU backends)
    :func:`grad`          in the backward: one read of the logits, one write of the
                          gradient into :func:`grad_buffer`

Every non-tensor setting travels as the call's :class:`~tofu_kernels.params.TOFUParams`,
handed on unchanged: the backend is the first to unpack it. A reuse: anything that produces
logits chunk by chunk (a model's output layer, say) plans once, feeds :func:`chunk_stats`
or :func:`grad_in_forward` per chunk, and calls :func:`grad` per chunk with its own upstream
gradient, keeping its GEMMs and its own gradient buffers.
"""

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
    """Decide the call: ``labels`` flat int64, rows ``width`` columns wide on ``device``,
    ``tp`` the tensor-parallel options (None: one device), ``inputs`` the tensors a gradient
    may be wanted for."""
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
    """The gradient in the forward needs a scalar upstream gradient (reduction "mean" or
    "sum"), whole rows on one device, and a gradient wanted; ``grad_in_forward`` None takes
    it wherever possible, False never, True requires it."""
    possible = params.reduction != "none" and tp is None and shard == Shard(0, width) and wants_grad
    if params.grad_in_forward and not possible:
        raise ValueError(
            "tofu_loss: grad_in_forward=True needs reduction 'mean' or 'sum', whole rows on one device "
            "(not vocab-parallel) and logits that require grad (with grad mode on)"
        )
    return possible and params.grad_in_forward is not False


def refuse_double_backward(who: str) -> None:
    """A backward asked to build a graph (``create_graph=True``: a second derivative) raises:
    the gradient comes from a kernel with no derivative of its own, and a gradient that
    silently stops the second derivative would be a wrong answer."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"{who}: a second derivative (backward with create_graph=True) is not supported: the gradient "
            "is computed by a kernel that has no derivative of its own; take the gradient with "
            "create_graph=False"
        )


def training_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """The rows of flat ``labels`` that train (not ``ignore_index``), in order, for a caller
    that computes its logits itself and can leave the others out (the fused linear loss);
    None when every row trains, or where finding them would need a host sync none may run
    (torch.compile, CUDA-graph capture, fake tensors): then every row is computed. One host
    sync (the number of rows)."""
    if not host_checks_allowed(labels):
        return None
    rows = (labels != ignore_index).nonzero().squeeze(1)
    return None if rows.numel() == labels.numel() else rows


# ------------------------------------------------------------------ output buffers


def new_grad(t: torch.Tensor) -> torch.Tensor:
    """A contiguous buffer for ``t``'s gradient, whatever ``t``'s strides."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def grad_buffer(x: torch.Tensor, lay: RowLayout, inplace: bool) -> tuple[torch.Tensor, RowLayout]:
    """Where the gradient of ``x`` is written, and its row layout: ``x`` itself (in place,
    ``x`` must be dead after the loss), else a new contiguous buffer walked with ``x``'s
    row grouping."""
    if inplace:
        return x, lay
    return new_grad(x), dense_layout(lay)


def _overwritten(x: torch.Tensor, out: torch.Tensor) -> None:
    if out is x:
        # The logits now hold the gradient: any later use of them through autograd (a
        # second backward included) fails loudly instead of reading the overwritten values.
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
    """Every row's partial statistics, as the backend leaves them (with this rank's metadata
    record under tensor parallelism)."""
    return p.backend.row_stats(x, lay, labels, p.shard, p.params, p.tp is not None)


def chunk_stats(
    p: Plan,
    chunks: Iterable[tuple[int, int, torch.Tensor, RowLayout]],
    labels: torch.Tensor,
    n_rows: int,
) -> Partials:
    """The statistics of logits that arrive in chunks ``(r0, r1, z, lay)`` (rows
    ``[r0, r1)``, each chunk's buffer free for reuse once the next is asked for): every
    chunk's records merged into one ``[n_rows, len(Stat)]`` buffer, followed under tensor
    parallelism by this rank's metadata record (and by the metric accumulators with metrics), for
    one :func:`finish`."""
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
    """From this rank's partial records to the loss: under tensor parallelism, where inputs
    are checked, the ranks' metadata records gathered and checked first (shards, token
    counts; the label check then uses the global vocabulary), then the one all-gather of the
    statistics; then the epilogue."""
    vocab_size = p.shard.vocab_end
    if p.tp is not None:
        if p.check:  # the ranks' records first: a mismatch is the same error on every rank
            check_label_range(
                labels,
                p.params.ignore_index,
                check_shards(exchange_meta(parts, p.tp), p.tp.explicit),
            )
        parts, vocab_size = (
            all_gather_stats(parts, p.tp),
            None,
        )  # the epilogue reads V from the ranks
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
    """An autograd Function's outputs: the loss, the cross entropy and, only where asked
    for, the metrics (no ``None`` output: torch.compile traces a fixed tuple of tensors);
    all but the loss non-differentiable."""
    out = (loss, ce) if metrics is None else (loss, ce, metrics)
    ctx.mark_non_differentiable(*out[1:])
    return out


def results(params: TOFUParams, loss: torch.Tensor, ce: torch.Tensor, metrics, shape):
    """What a loss call returns: ``loss``, then ``ce`` with ``return_ce``, then the
    :class:`TokenMetrics` (per token, in ``shape``) with ``return_metrics``; a tuple when
    more than the loss. ``metrics``: the ``[N, len(Metric)]`` records, or a list holding
    them (a Function's trailing outputs)."""
    out = (loss,) + ((ce,) if params.return_ce else ())
    if params.return_metrics:
        out += (TokenMetrics.of(metrics[0] if isinstance(metrics, list) else metrics, shape),)
    return out if len(out) > 1 else loss


def empty_loss(labels: torch.Tensor, params: TOFUParams, *inputs: torch.Tensor):
    """The result for zero tokens, or none that trains, nothing launched: zeros of the right
    shapes (fp32), and a zero gradient for every input that requires one."""
    zero = sum(t.sum() for t in inputs) * 0.0
    per_token = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    loss = per_token + zero if params.reduction == "none" else zero.float()
    ce = per_token if params.reduction == "none" else zero.detach().float()
    metrics = torch.zeros(labels.numel(), len(Metric), dtype=torch.float32, device=labels.device)
    return results(params, loss, ce, metrics, labels.shape)


class LossModule(torch.nn.Module):
    """Base of the loss modules: the :class:`TOFUParams` fixed at construction (and any
    extra setting, e.g. ``chunk_size``, as an attribute), one repr."""

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
