"""Autograd function, functional API and nn.Module for the TOFU loss.

One ``autograd.Function`` serves the single-device and the vocab-parallel paths:

    forward:  backend.row_stats      one read of the logits -> [N, len(Stat)] fp32
              all_gather_stats       only under tensor parallelism: the one collective
              host checks            only in eager mode, decided once per call in _tofu
              backend.finalize       loss, focal weight, the backward's scalars (O(N))
    backward: tofu_math.grad_params  upstream * g folded in fp32 -> [N, len(GradParam)]
              backend.grad           one read of the logits, one write of the gradient

Only O(N) fp32 values are saved. Every non-tensor argument travels as one
:class:`~tofu_kernels.params.TOFUParams`.
"""

from __future__ import annotations

import torch

from ._inputs import (
    Shard,
    check_label_range,
    check_tensors,
    dense_layout,
    host_checks_allowed,
    row_layout,
)
from .backends import Backend, get_backend
from .params import DEFAULT_BETA, DEFAULT_GAMMA, DEFAULT_IGNORE_INDEX, TOFUParams
from .tofu_math import Stat, grad_params
from .vocab_parallel import TensorParallel, all_gather_stats, check_shards


class _TOFUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, params: TOFUParams, backend: Backend, shard: Shard,
                tp: TensorParallel | None, check: bool):
        x, lay = row_layout(logits)
        flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
        if lay.n_rows:
            stats = backend.row_stats(x, lay, flat_labels, shard, params.beta, params.ignore_index)
        else:
            stats = torch.zeros(0, len(Stat), dtype=torch.float32, device=logits.device)
        if tp is None:
            vocab_size = shard.vocab_end
        else:
            stats, vocab_size, metas = all_gather_stats(stats, shard, lay.width, tp, params.beta)
            if check:
                check_shards(metas, tp.explicit)
        if check:
            check_label_range(flat_labels, params.ignore_index, int(vocab_size))
        res = backend.finalize(stats, flat_labels, params, vocab_size)
        ctx.save_for_backward(x, flat_labels, res.g, res.m, res.log_sb, res.qt_m1)
        ctx.lay, ctx.shape, ctx.params, ctx.backend, ctx.shard = lay, logits.shape, params, backend, shard
        ce = res.ce.view(labels.shape)
        ctx.mark_non_differentiable(ce)
        return res.loss.view(labels.shape), ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        n_inputs = 7
        if grad_loss is None:
            return (None,) * n_inputs
        x, flat_labels, g, m, log_sb, qt_m1 = ctx.saved_tensors
        lay, params = ctx.lay, ctx.params
        gp = grad_params(grad_loss, g, m, log_sb, qt_m1)
        if params.inplace_backward:
            out, out_lay = x, lay
        else:
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            out_lay = dense_layout(lay)
        if lay.n_rows:
            ctx.backend.grad(x, lay, out, out_lay, flat_labels, gp, ctx.shard, params.beta)
        if params.inplace_backward:
            # The logits now hold the gradient: make a second backward through the
            # same graph fail loudly instead of reading the overwritten values.
            torch.autograd.graph.increment_version(x)
        return (out.view(ctx.shape),) + (None,) * (n_inputs - 1)


def _reduce(per_token: torch.Tensor, labels: torch.Tensor, params: TOFUParams) -> torch.Tensor:
    if params.reduction == "none":
        return per_token
    total = per_token.sum()
    if params.reduction == "sum":
        return total
    # Counted on the device: no host sync; all ignored -> 0 / 1 = 0 with zero gradient.
    count = (labels != params.ignore_index).sum().clamp(min=1)
    return total / count


def _tofu(logits: torch.Tensor, labels: torch.Tensor, params: TOFUParams, tp: TensorParallel | None):
    """Shared body of tofu_loss and vocab_parallel_tofu_loss."""
    check_tensors(logits, labels)
    backend = get_backend(params.backend, logits.device)
    width = logits.shape[-1]
    if tp is None:
        shard = Shard(0, width)
    else:
        world, rank = tp.world_and_rank()
        shard = tp.local_shard(width, rank)
        if world == 1:
            tp = None  # nothing to merge: no communication at all
    # The one place that decides whether host-synchronising checks run for this call.
    check = params.check_inputs and host_checks_allowed(labels)
    per_token, ce = _TOFUFunction.apply(logits, labels, params, backend, shard, tp, check)
    loss = _reduce(per_token, labels, params)
    if params.return_ce:
        return loss, _reduce(ce, labels, params)
    return loss


def tofu_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    reduction: str = "mean",
    backend: str = "auto",
    inplace_backward: bool = False,
    return_ce: bool = False,
    check_inputs: bool = True,
):
    """Tempered Focal loss over full-vocab logits.

    Args:
        logits: ``[..., V]`` float32/bfloat16/float16, any leading shape; strided views
            (e.g. ``[s, b, V].transpose(0, 1)``) are read without a copy when the vocab
            dim has stride 1.
        labels: ``[...]`` int64/int32 target ids in ``[0, V)`` or ``ignore_index``.
        gamma: focal exponent >= 0 (0 with beta = 1 is cross entropy).
        beta: softmax temperature > 0.
        ignore_index: label of tokens that carry no loss and get a zero gradient.
        reduction: ``"mean"`` over non-ignored tokens (0.0 with zero gradient when all
            are ignored), ``"sum"`` or ``"none"`` (fp32, shape of ``labels``).
        backend: ``"auto"`` (CUDA extension, else Triton on a GPU; torch on CPU),
            ``"cuda"``, ``"triton"`` or ``"torch"``.
        inplace_backward: write the gradient into ``logits``' storage (they must be dead
            after the loss). Off by default: inputs are never modified otherwise.
        return_ce: also return the plain cross entropy ``LSE(z) - z_t``, reduced the same
            way and detached, for logging perplexity next to the TOFU loss.
        check_inputs: raise on labels outside ``[0, V)`` (one host sync, eager mode
            only). Without the check, or under torch.compile / CUDA-graph capture, such
            tokens get a NaN loss and gradient.

    Returns:
        fp32 loss (scalar, or ``labels``' shape for ``"none"``), or ``(loss, ce)``.
        The gradient has the logits' dtype.
    """
    params = TOFUParams(gamma, beta, ignore_index, reduction, backend, inplace_backward, return_ce, check_inputs)
    return _tofu(logits, labels, params, None)


def vocab_parallel_tofu_loss(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    *,
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    reduction: str = "none",
    backend: str = "auto",
    inplace_backward: bool = False,
    return_ce: bool = False,
    check_inputs: bool = True,
    group=None,
    vocab_start: int | None = None,
    vocab_end: int | None = None,
):
    """TOFU loss over logits whose vocab dim is sharded across ``group``.

    Args:
        logits_shard: ``[..., Vr]`` this rank's columns (fp32/bf16/fp16, strided views ok).
        labels: ``[...]`` global ids (identical on all ranks) or ``ignore_index``.
        gamma, beta, ignore_index, reduction, backend, inplace_backward, return_ce: as in
            :func:`tofu_loss` (the same keywords in the same order); ``reduction``
            defaults to ``"none"``, what Megatron's loss entry returns.
        check_inputs: host checks in eager mode (labels in ``[0, V)``, shard ranges
            tiling ``[0, V)``, equal widths and token counts); without them invalid
            labels give NaN.
        group: the tensor-parallel process group (None: the default group; no
            communication at all when torch.distributed is not initialized or the
            world size is 1).
        vocab_start, vocab_end: the global columns this rank holds as its first
            ``vocab_end - vocab_start`` local columns (default ``rank * Vr`` and
            ``+ Vr``); the rest of the row is padding and never contributes.

    Returns:
        fp32 per-token loss of ``labels``' shape (for ``reduction="none"``), identical
        on every rank; the gradient flows into this rank's shard only.
    """
    params = TOFUParams(gamma, beta, ignore_index, reduction, backend, inplace_backward, return_ce, check_inputs)
    return _tofu(logits_shard, labels, params, TensorParallel(group, vocab_start, vocab_end))


class TOFULoss(torch.nn.Module):
    """``nn.Module`` wrapper of :func:`tofu_loss`; same keywords, fixed at construction."""

    def __init__(
        self,
        *,
        gamma: float = DEFAULT_GAMMA,
        beta: float = DEFAULT_BETA,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        reduction: str = "mean",
        backend: str = "auto",
        inplace_backward: bool = False,
    ):
        super().__init__()
        self.params = TOFUParams(gamma, beta, ignore_index, reduction, backend, inplace_backward)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _tofu(logits, labels, self.params, None)

    def extra_repr(self) -> str:
        p = self.params
        return (
            f"gamma={p.gamma}, beta={p.beta}, ignore_index={p.ignore_index}, "
            f"reduction={p.reduction!r}, backend={p.backend!r}"
        )
