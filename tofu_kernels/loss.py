"""Autograd function, functional API and nn.Module for the TOFU loss over logits.

One ``autograd.Function`` serves the single-device and the vocab-parallel paths; the
order of the steps, the path (gradient in the forward or two passes) and the host checks
are the core's (``core.py``, docs/design.md section 3). :func:`loss_of_logits` is the entry
for a ready :class:`~tofu_kernels.params.TOFUParams` (the Megatron patch and the Hugging
Face entry points build theirs once); the public functions build one per call from their
keywords.
"""

from __future__ import annotations

import torch

from . import core
from .checks import check_tensors, flat_labels
from .layout import row_layout
from .params import DEFAULT_BETA, DEFAULT_GAMMA, DEFAULT_IGNORE_INDEX, TOFUParams
from .records import Reduction
from .vocab_parallel import TensorParallel

_N_INPUTS = 4  # arguments of _TOFUFunction.forward after ctx


class _TOFUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, flat, shape: torch.Size, plan: core.Plan):
        """``flat``: the labels as the kernels read them; ``shape``: the labels' own."""
        x, lay = row_layout(logits)
        ctx.lay, ctx.shape, ctx.plan = lay, logits.shape, plan
        if plan.grad_in_forward:
            out, out_lay = core.grad_buffer(x, lay, plan.params.inplace_backward)
            epi = core.grad_in_forward(plan, x, lay, out, out_lay, flat, plan.reduction)
            ctx.grad_buf, ctx.out_lay = out, out_lay
        else:
            epi = core.finish(plan, core.row_stats(plan, x, lay, flat), flat, plan.reduction)
            ctx.save_for_backward(x, flat, epi.grad_rec, epi.scale)
        if plan.reduction == Reduction.NONE:
            loss, ce = epi.loss.view(shape), epi.ce.view(shape)
        else:
            loss, ce = epi.loss_red, epi.ce_red
        ctx.set_materialize_grads(
            False
        )  # no zeros kernel for the cross entropy's (absent) gradient
        return core.outputs(ctx, loss, ce, epi.metrics)

    @staticmethod
    def backward(ctx, grad_loss, *_):  # the cross entropy and the metrics have no gradient
        if grad_loss is None:
            return (None,) * _N_INPUTS
        core.refuse_double_backward("tofu_loss")
        plan, lay = ctx.plan, ctx.lay
        if plan.grad_in_forward:
            out = ctx.grad_buf
            if out is None:
                raise RuntimeError(
                    "tofu_loss: the gradient was computed in the forward and has been handed out "
                    "already; to backward through this graph twice, call the loss with "
                    "grad_in_forward=False"
                )
            ctx.grad_buf = None
            core.rescale(plan, out, ctx.out_lay, grad_loss)
        else:
            x, flat, grad_rec, scale = ctx.saved_tensors
            out, out_lay = core.grad_buffer(x, lay, plan.params.inplace_backward)
            core.grad(plan, x, lay, out, out_lay, flat, grad_rec, grad_loss, scale)
        return (out.view(ctx.shape),) + (None,) * (_N_INPUTS - 1)


def loss_of_logits(
    logits: torch.Tensor, labels: torch.Tensor, params: TOFUParams, tp: TensorParallel | None = None
):
    """The TOFU loss of ``logits`` ``[..., V]`` (``[..., V/tp]`` with ``tp``) under
    ``params``: what :func:`tofu_loss` and :func:`vocab_parallel_tofu_loss` return."""
    check_tensors(logits, labels)
    if params.inplace_backward and logits.is_leaf and logits.requires_grad:
        raise ValueError(
            "tofu_loss: inplace_backward=True would overwrite the values of `logits`, a leaf tensor that "
            "requires grad (a parameter or an input you hold); pass inplace_backward=False, or logits "
            "computed by the model (dead after the loss)"
        )
    flat = flat_labels(labels)
    plan = core.plan(params, flat, logits.shape[-1], logits.device, tp, (logits,))
    if labels.numel() == 0:
        return core.empty_loss(labels, params, logits)
    loss, ce, *metrics = _TOFUFunction.apply(logits, flat, labels.shape, plan)
    return core.results(params, loss, ce, metrics, labels.shape)


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
    return_metrics: bool = False,
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
        return_metrics: also return a :class:`~tofu_kernels.records.TokenMetrics` per token
            (``labels``' shape, fp32, detached, 0 at ignored tokens): ``entropy`` of the
            untempered softmax and ``top1`` (1.0 where the target is the row's first maximum,
            ``argmax == target``), made in the same pass (two more fp32 accumulators per
            row, no more exponentials).
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
        fp32 loss (scalar, or ``labels``' shape for ``"none"``), followed by ``ce`` with
        ``return_ce`` and the metrics with ``return_metrics`` (a tuple when either is asked).
        The gradient has the logits' dtype.
    """
    params = TOFUParams(
        gamma=gamma,
        beta=beta,
        ignore_index=ignore_index,
        reduction=reduction,
        backend=backend,
        inplace_backward=inplace_backward,
        return_ce=return_ce,
        return_metrics=return_metrics,
        check_inputs=check_inputs,
        grad_in_forward=grad_in_forward,
    )
    return loss_of_logits(logits, labels, params)


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
    return_metrics: bool = False,
    check_inputs: bool = True,
    group=None,
    vocab_start: int | None = None,
    vocab_end: int | None = None,
):
    """TOFU loss over logits whose vocab dim is sharded across ``group``.

    Args:
        logits_shard: ``[..., Vr]`` this rank's columns (fp32/bf16/fp16, strided views ok).
        labels: ``[...]`` global ids (identical on all ranks) or ``ignore_index``.
        gamma, beta, ignore_index, reduction, backend, inplace_backward, return_ce,
            return_metrics: as in :func:`tofu_loss` (the same keywords in the same order);
            ``reduction`` defaults to ``"none"``, what Megatron's loss entry returns; the
            metrics' two accumulators travel in the same all-gather (8 B more per token).
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
    params = TOFUParams(
        gamma=gamma,
        beta=beta,
        ignore_index=ignore_index,
        reduction=reduction,
        backend=backend,
        inplace_backward=inplace_backward,
        return_ce=return_ce,
        return_metrics=return_metrics,
        check_inputs=check_inputs,
    )
    return loss_of_logits(
        logits_shard, labels, params, TensorParallel(group, vocab_start, vocab_end)
    )


class TOFULoss(core.LossModule):
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
        super().__init__(
            TOFUParams(
                gamma=gamma,
                beta=beta,
                ignore_index=ignore_index,
                reduction=reduction,
                backend=backend,
                inplace_backward=inplace_backward,
            )
        )

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return loss_of_logits(logits, labels, self.params)
