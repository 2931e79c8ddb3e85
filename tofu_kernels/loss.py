"""Autograd function, functional API and nn.Module for the TOFU loss.

One ``autograd.Function`` serves the single-device and the vocab-parallel paths. Two
ways through it (docs/design.md section 3):

two-pass (any upstream gradient; the only way under tensor parallelism):
    forward:  backend.row_stats     one read of the logits -> partial Stat records
              all_gather_stats      only under tensor parallelism: the one collective
              host checks           only in eager mode, decided once per call in _tofu
              backend.epilogue      merge, loss, focal weight, the backward's record and
                                    the reduction: one O(N) kernel on the GPU backends
    backward: backend.grad          one read of the logits, one write of the gradient,
                                    coef = upstream * scale * g folded in the kernel

gradient in the forward (a scalar upstream: reduction "mean"/"sum", whole rows on one
device, a gradient is wanted; ``grad_in_forward=False`` turns it off):
    forward:  backend.fused         loss and the gradient for an upstream of 1, while the
                                    row is still on chip (into the logits with
                                    inplace_backward, else a new buffer)
    backward: backend.rescale       times the upstream gradient, skipped on the device
                                    when it is 1

Every non-tensor argument travels as one :class:`~tofu_kernels.params.TOFUParams`.
"""

from __future__ import annotations

import torch

from ._inputs import (
    Shard,
    check_label_range,
    check_tensors,
    dense_layout,
    flat_labels,
    host_checks_allowed,
    row_layout,
)
from .backends import Backend, get_backend
from .params import DEFAULT_BETA, DEFAULT_GAMMA, DEFAULT_IGNORE_INDEX, TOFUParams
from .tofu_math import Reduction
from .vocab_parallel import TensorParallel, all_gather_stats, check_shards, resolve

_N_INPUTS = 8  # arguments of _TOFUFunction.forward after ctx


class _TOFUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, params: TOFUParams, backend: Backend, shard: Shard,
                tp: TensorParallel | None, check: bool, fused: bool):
        x, lay = row_layout(logits)
        flat = flat_labels(labels)
        reduction = Reduction[params.reduction.upper()]
        ctx.lay, ctx.shape, ctx.params, ctx.backend, ctx.shard = lay, logits.shape, params, backend, shard
        ctx.fused = fused
        if fused:
            if check:
                check_label_range(flat, params.ignore_index, shard.vocab_end)
            if params.inplace_backward:
                out, out_lay = x, lay
            else:
                out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
                out_lay = dense_layout(lay)
            epi = backend.fused(x, lay, out, out_lay, flat, params, reduction)
            if params.inplace_backward:
                # The logits now hold the gradient: any later use of them through
                # autograd fails loudly instead of reading the overwritten values.
                torch.autograd.graph.increment_version(x)
            ctx.grad_buf, ctx.out_lay = out, out_lay
        else:
            parts = backend.row_stats(x, lay, flat, shard, params.beta, params.ignore_index, tp is not None)
            vocab_size = shard.vocab_end
            if tp is not None:
                parts, vocab_size = all_gather_stats(parts, tp), None  # the epilogue reads V from the ranks
            if check:
                global_v = shard.vocab_end if tp is None else check_shards(parts, tp.explicit)
                check_label_range(flat, params.ignore_index, global_v)
            epi = backend.epilogue(parts, flat, params, vocab_size, reduction)
            ctx.save_for_backward(x, flat, epi.grad_rec, epi.scale)
        if reduction == Reduction.NONE:
            loss, ce = epi.loss.view(labels.shape), epi.ce.view(labels.shape)
        else:
            loss, ce = epi.loss_red, epi.ce_red
        ctx.mark_non_differentiable(ce)
        ctx.set_materialize_grads(False)  # no zeros kernel for the cross entropy's (absent) gradient
        return loss, ce

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce):
        if grad_loss is None:
            return (None,) * _N_INPUTS
        params, lay = ctx.params, ctx.lay
        if ctx.fused:
            out = ctx.grad_buf
            if out is None:
                raise RuntimeError(
                    "tofu_loss: the gradient was computed in the forward and has been handed out "
                    "already; to backward through this graph twice, call the loss with "
                    "grad_in_forward=False"
                )
            ctx.grad_buf = None
            ctx.backend.rescale(out, ctx.out_lay, grad_loss)
            return (out.view(ctx.shape),) + (None,) * (_N_INPUTS - 1)
        x, flat, grad_rec, scale = ctx.saved_tensors
        if params.inplace_backward:
            out, out_lay = x, lay
        else:
            out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
            out_lay = dense_layout(lay)
        ctx.backend.grad(x, lay, out, out_lay, flat, grad_rec, grad_loss, scale, ctx.shard, params.beta)
        if params.inplace_backward:
            # The logits now hold the gradient: make a second backward through the
            # same graph fail loudly instead of reading the overwritten values.
            torch.autograd.graph.increment_version(x)
        return (out.view(ctx.shape),) + (None,) * (_N_INPUTS - 1)


def _tofu(logits: torch.Tensor, labels: torch.Tensor, params: TOFUParams, tp: TensorParallel | None):
    """Shared body of tofu_loss and vocab_parallel_tofu_loss."""
    check_tensors(logits, labels)
    backend = get_backend(params.backend, logits.device)
    shard, tp = resolve(tp, logits.shape[-1])
    # The one place that decides whether host-synchronising checks run for this call.
    check = params.check_inputs and host_checks_allowed(labels)
    fused = _grad_in_forward(logits, params, shard, tp)
    if labels.numel() == 0:
        return empty_loss(labels, params, logits)
    loss, ce = _TOFUFunction.apply(logits, labels, params, backend, shard, tp, check, fused)
    return (loss, ce) if params.return_ce else loss


def empty_loss(labels: torch.Tensor, params: TOFUParams, *inputs: torch.Tensor):
    """The result for zero tokens, nothing launched: zeros of the right shapes (fp32), and
    a zero gradient for every input that requires one."""
    zero = sum(t.sum() for t in inputs) * 0.0
    per_token = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    loss = per_token + zero if params.reduction == "none" else zero.float()
    ce = per_token if params.reduction == "none" else zero.detach().float()
    return (loss, ce) if params.return_ce else loss


def _grad_in_forward(logits: torch.Tensor, params: TOFUParams, shard: Shard, tp: TensorParallel | None) -> bool:
    """Whether this call computes its gradient in the forward (see the module docstring)."""
    possible = (
        params.reduction != "none" and tp is None and shard == Shard(0, logits.shape[-1])
        and torch.is_grad_enabled() and logits.requires_grad
    )
    if params.grad_in_forward and not possible:
        raise ValueError(
            "tofu_loss: grad_in_forward=True needs reduction 'mean' or 'sum', whole rows on one device "
            "(not vocab-parallel) and logits that require grad (with grad mode on)"
        )
    return possible and params.grad_in_forward is not False


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
    grad_in_forward: bool | None = None,
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
        grad_in_forward: with ``reduction="mean"/"sum"`` the upstream gradient is one
            scalar, so the gradient is computed in the forward while each row is still on
            chip (2 + 2 bytes per bf16 element instead of 2 + 2 + 2) and the backward only
            multiplies it by the upstream gradient, on the device and not at all when that
            is 1 (the usual ``loss.backward()``). None (default): whenever possible;
            False: the two-pass path (backward through the graph more than once needs it);
            True: required, an error where impossible.

    Returns:
        fp32 loss (scalar, or ``labels``' shape for ``"none"``), or ``(loss, ce)``.
        The gradient has the logits' dtype.
    """
    params = TOFUParams(gamma, beta, ignore_index, reduction, backend, inplace_backward, return_ce, check_inputs,
                        grad_in_forward)
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


class _LossModule(torch.nn.Module):
    """Shared by the loss modules: the keywords fixed at construction, one repr."""

    def __init__(self, params: TOFUParams, **extra):
        super().__init__()
        self.params = params
        self._extra = tuple(extra)
        for name, value in extra.items():  # e.g. chunk_size: an attribute, shown in the repr
            setattr(self, name, value)

    def extra_repr(self) -> str:
        p = self.params
        fields = [f"gamma={p.gamma}", f"beta={p.beta}", f"ignore_index={p.ignore_index}",
                  f"reduction={p.reduction!r}", f"backend={p.backend!r}"]
        return ", ".join(fields + [f"{k}={getattr(self, k)!r}" for k in self._extra])


class TOFULoss(_LossModule):
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
        super().__init__(TOFUParams(gamma, beta, ignore_index, reduction, backend, inplace_backward))

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return _tofu(logits, labels, self.params, None)
