"""The TOFU loss over logits: one autograd Function over the core (``core.py``) for the
single-device and vocab-parallel paths, the public functions and :class:`TOFULoss`."""

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
        # no zeros kernel for the cross entropy's (absent) gradient
        ctx.set_materialize_grads(False)
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
    """The loss of ``logits`` ``[..., V]`` (``[..., V/tp]`` with ``tp``) under a ready
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
    """Tempered Focal loss over full-vocab logits (every argument in full: docs/api.md).

    Args:
        logits: ``[..., V]`` fp32/bf16/fp16; strided views with a stride-1 vocab dim are
            read without a copy.
        labels: ``[...]`` int64/int32 ids in ``[0, V)`` or ``ignore_index``.
        gamma: focal exponent >= 0 (0 with beta = 1 is cross entropy).
        beta: softmax temperature > 0.
        ignore_index: label of tokens with no loss and a zero gradient.
        reduction: ``"mean"`` over non-ignored tokens (0.0 when all are ignored), ``"sum"``
            or ``"none"``.
        backend: ``"auto"``, ``"cuda"``, ``"triton"`` or ``"torch"``.
        inplace_backward: write the gradient into ``logits`` (dead after the loss).
        return_ce: also return the plain cross entropy, reduced the same way, detached.
        return_metrics: also return :class:`~tofu_kernels.records.TokenMetrics` per token.
        check_inputs: raise on labels outside ``[0, V)`` (one host sync, eager only);
            unchecked, they give NaN.
        grad_in_forward: None: the gradient in the forward where possible; False: two
            passes (needed to backward twice); True: required.

    Returns:
        fp32 loss (scalar, or ``labels``' shape for ``"none"``), then ``ce`` and the metrics
        where asked for (a tuple then). The gradient has the logits' dtype.
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
    """TOFU loss over logits whose vocab dim is sharded across ``group`` (docs/api.md).

    Args:
        logits_shard: ``[..., Vr]`` this rank's columns (fp32/bf16/fp16, strided views ok).
        labels: ``[...]`` global ids (identical on all ranks) or ``ignore_index``.
        gamma, beta, ignore_index, reduction, backend, inplace_backward, return_ce,
            return_metrics: as in :func:`tofu_loss`; ``reduction`` defaults to ``"none"``.
        check_inputs: eager host checks: labels in ``[0, V)``, shard ranges tiling
            ``[0, V)``, equal widths and token counts; unchecked, invalid labels give NaN.
        group: the tensor-parallel group (None: the default group; no communication
            without an initialized process group or at world size 1).
        vocab_start, vocab_end: the global columns held in the first ``vocab_end -
            vocab_start`` local columns (default ``rank * Vr`` and ``+ Vr``); the rest is
            padding.

    Returns:
        fp32 loss as :func:`tofu_loss`, identical on every rank; the gradient flows into
        this rank's shard only.
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
