"""Autograd function, functional API and nn.Module for the TOFU loss.

One ``autograd.Function`` serves the single-device and the vocab-parallel paths: the
backend computes the local row statistics, an optional ``reduce_stats`` hook merges
them across tensor-parallel ranks (one collective, see ``vocab_parallel.py``),
``finalize_stats`` (reference.py) computes loss and focal weight, and the backward
calls the backend's fused gradient kernel. Only O(N) fp32 values are saved.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._inputs import check_labels as check_label_range
from ._inputs import (
    check_hyperparameters,
    check_tensors,
    dense_layout,
    host_checks_allowed,
    row_layout,
)
from .backends import get_backend
from .reference import finalize_stats


@dataclass(frozen=True)
class Shard:
    """Which global vocab columns the local logits hold.

    Local column ``j < n_valid`` is global column ``vocab_start + j``; columns
    ``[n_valid, width)`` are padding and never contribute. ``reduce_stats`` merges the
    local [N, 4] statistics across ranks and returns them with the global vocab size
    (None on a single device).
    """

    vocab_start: int
    n_valid: int
    vocab_size: int
    reduce_stats: Callable[[torch.Tensor], tuple[torch.Tensor, int | torch.Tensor]] | None = None


class _TOFUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, gamma, beta, ignore_index, backend, inplace_backward, shard):
        x, lay = row_layout(logits)
        flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
        if lay.n_rows:
            stats = backend.row_stats(
                x, lay, flat_labels, shard.vocab_start, shard.n_valid, beta, ignore_index
            )
        else:
            stats = torch.zeros(0, 4, dtype=torch.float32, device=logits.device)
        vocab_size = shard.vocab_size
        if shard.reduce_stats is not None:
            stats, vocab_size = shard.reduce_stats(stats)
        finalize = getattr(backend, "finalize", finalize_stats)
        res = finalize(stats, flat_labels, gamma, beta, ignore_index, vocab_size)
        ctx.save_for_backward(x, flat_labels, res.g, res.m, res.log_sb, res.qt_m1)
        ctx.lay, ctx.shape = lay, logits.shape
        ctx.beta, ctx.backend, ctx.inplace, ctx.shard = beta, backend, inplace_backward, shard
        ce = res.ce.view(labels.shape)
        ctx.mark_non_differentiable(ce)
        return res.loss.view(labels.shape), ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        x, flat_labels, g, m, log_sb, qt_m1 = ctx.saved_tensors
        lay, shard = ctx.lay, ctx.shard
        if grad_loss is None:
            return (None,) * 8
        # Every per-token factor (upstream incl. 1/N of the mean, g) folded in fp32.
        coef = grad_loss.reshape(-1).float() * g
        params = torch.stack([coef, m, log_sb, qt_m1], dim=1)
        if ctx.inplace:
            out, out_lay = x, lay
        else:
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            out_lay = dense_layout(lay)
        if lay.n_rows:
            ctx.backend.grad(
                x, lay, out, out_lay, flat_labels, params, shard.vocab_start, shard.n_valid, ctx.beta
            )
        if ctx.inplace:
            # The logits now hold the gradient: make a second backward through the
            # same graph fail loudly instead of reading the overwritten values.
            torch.autograd.graph.increment_version(x)
        return out.view(ctx.shape), None, None, None, None, None, None, None


def _reduce(per_token: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str):
    if reduction == "none":
        return per_token
    total = per_token.sum()
    if reduction == "sum":
        return total
    # Counted on the device: no host sync; all ignored -> 0 / 1 = 0 with zero gradient.
    count = (labels != ignore_index).sum().clamp(min=1)
    return total / count


def _tofu(
    logits, labels, gamma, beta, ignore_index, reduction, backend, inplace_backward,
    return_ce, check, shard_fn,
):
    """Shared body of tofu_loss and vocab_parallel_tofu_loss (validation, apply, reduce)."""
    check_hyperparameters(gamma, beta)
    check_tensors(logits, labels, reduction)
    mod = get_backend(backend, logits.device)
    shard = shard_fn(logits, check)
    if check and host_checks_allowed(labels) and shard.reduce_stats is None:
        check_label_range(labels, ignore_index, shard.vocab_size)
    per_token, ce = _TOFUFunction.apply(
        logits, labels, float(gamma), float(beta), int(ignore_index), mod,
        bool(inplace_backward), shard,
    )
    loss = _reduce(per_token, labels, ignore_index, reduction)
    if return_ce:
        return loss, _reduce(ce, labels, ignore_index, reduction)
    return loss


def tofu_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gamma: float = 3.0,
    beta: float = 0.8,
    ignore_index: int = -100,
    reduction: str = "mean",
    backend: str = "auto",
    inplace_backward: bool = False,
    return_ce: bool = False,
    check_labels: bool = True,
):
    """Tempered Focal loss over full-vocab logits.

    Args:
        logits: ``[..., V]`` float32/bfloat16/float16, any leading shape; strided views
            (e.g. ``[s, b, V].transpose(0, 1)``) are read without a copy when the vocab
            dim has stride 1.
        labels: ``[...]`` int64/int32 target ids in ``[0, V)`` or ``ignore_index``.
        gamma: focal exponent >= 0 (0 with beta = 1 is cross entropy).
        beta: softmax temperature > 0.
        reduction: ``"mean"`` over non-ignored tokens (0.0 with zero gradient when all
            are ignored), ``"sum"`` or ``"none"`` (fp32, shape of ``labels``).
        backend: ``"auto"`` (CUDA extension, else Triton on a GPU; torch on CPU),
            ``"cuda"``, ``"triton"`` or ``"torch"``.
        inplace_backward: write the gradient into ``logits``' storage (they must be dead
            after the loss). Off by default: inputs are never modified otherwise.
        return_ce: also return the plain cross entropy ``LSE(z) - z_t``, reduced the same
            way and detached, for logging perplexity next to the TOFU loss.
        check_labels: raise on labels outside ``[0, V)`` (one host sync, eager mode
            only). Without the check, or under torch.compile / CUDA-graph capture, such
            tokens get a NaN loss and gradient.

    Returns:
        fp32 loss (scalar, or ``labels``' shape for ``"none"``), or ``(loss, ce)``.
        The gradient has the logits' dtype.
    """

    def single_device(x: torch.Tensor, _check: bool) -> Shard:
        return Shard(vocab_start=0, n_valid=x.shape[-1], vocab_size=x.shape[-1])

    return _tofu(
        logits, labels, gamma, beta, ignore_index, reduction, backend, inplace_backward,
        return_ce, check_labels, single_device,
    )


class TOFULoss(torch.nn.Module):
    """``nn.Module`` wrapper of :func:`tofu_loss`; same arguments, fixed at construction."""

    def __init__(
        self,
        gamma: float = 3.0,
        beta: float = 0.8,
        ignore_index: int = -100,
        reduction: str = "mean",
        backend: str = "auto",
        inplace_backward: bool = False,
    ):
        super().__init__()
        check_hyperparameters(gamma, beta)
        self.gamma, self.beta = float(gamma), float(beta)
        self.ignore_index, self.reduction = ignore_index, reduction
        self.backend, self.inplace_backward = backend, inplace_backward

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return tofu_loss(
            logits, labels, self.gamma, self.beta, self.ignore_index, self.reduction,
            self.backend, self.inplace_backward,
        )

    def extra_repr(self) -> str:
        return (
            f"gamma={self.gamma}, beta={self.beta}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, backend={self.backend!r}"
        )
