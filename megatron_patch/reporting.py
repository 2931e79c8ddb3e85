"""``lm cross entropy`` beside ``lm loss`` in Megatron's own reports (docs/megatron.md, "What
you see in Megatron's log").

The patched loss attaches each call's per-token cross entropy to the loss tensor it returns;
``forward_step_calc_loss`` (every schedule calls the script's ``loss_func`` through it) is
wrapped so that the ``loss_func``'s report gains the masked cross-entropy sum with the same
token count as ``lm loss``, which Megatron then reduces and logs like every entry. The loss
mask is the first argument of the script's ``partial(loss_func, loss_mask, ...)``; where it
cannot be found nothing is reported and one warning says why.
"""

from __future__ import annotations

import functools

import torch

from tofu_kernels.patching import replace, restore

from .once import warn_once

CE_KEY = "lm cross entropy"
LOSS_KEY = "lm loss"
_ATTR = "_tofu_cross_entropy"
_SCHEDULES = "megatron.core.pipeline_parallel.schedules"


def attach_cross_entropy(loss: torch.Tensor, ce: torch.Tensor) -> None:
    """Remember the per-token cross entropy ``ce`` (detached) of the per-token ``loss``."""
    setattr(loss, _ATTR, ce)


def cross_entropy_of(output_tensor: torch.Tensor) -> torch.Tensor | None:
    """The per-token plain cross entropy ``[b, s]`` of a per-token loss the patched
    Megatron loss returned (None for any other tensor). For custom ``loss_func``s: mask and
    reduce it like the loss."""
    return getattr(output_tensor, _ATTR, None)


def _warn_once(key: str, message: str) -> None:
    warn_once(f"megatron_patch: {message}", key=f"reporting:{key}")


def _loss_mask(loss_func, ce: torch.Tensor) -> torch.Tensor | None:
    """The loss mask bound as the first argument of a ``partial(loss_func, loss_mask, ...)``,
    also where a schedule wraps that partial (the combined 1F1B schedule of
    ``--overlap-moe-expert-parallel-comm`` hands over a ``ScheduleNode``'s ``forward``,
    whose ``forward_func`` is the script's partial)."""
    fn = loss_func
    while True:
        if isinstance(fn, functools.partial):
            if (
                fn.args
                and isinstance(fn.args[0], torch.Tensor)
                and fn.args[0].numel() == ce.numel()
            ):
                return fn.args[0]
            fn = fn.func
        elif callable(getattr(getattr(fn, "__self__", None), "forward_func", None)):
            fn = fn.__self__.forward_func
        else:
            return None


def _with_cross_entropy(outputs, loss_func, ce: torch.Tensor):
    """``outputs`` of the script's loss_func with the CE entry added to its report dict."""
    report = outputs[-1] if isinstance(outputs, tuple) and outputs else None
    if not isinstance(report, dict) or LOSS_KEY not in report:
        _warn_once(
            "no-lm-loss",
            f"the loss_func's report has no {LOSS_KEY!r} entry; {CE_KEY!r} is not reported",
        )
        return outputs
    mask = _loss_mask(loss_func, ce)
    if mask is None:
        _warn_once(
            "no-mask",
            f"cannot find the loss mask of {loss_func!r} (expected "
            f"partial(loss_func, loss_mask, ...)); {CE_KEY!r} is not reported",
        )
        return outputs
    lm = report[LOSS_KEY]
    mask = mask.reshape(-1).float()
    ce_sum = (ce.reshape(-1).float() * mask).sum()
    if lm.numel() == 2:  # [sum, count]: the same count as lm loss, so the same reduction
        report[CE_KEY] = torch.stack([ce_sum.to(lm.dtype), lm.reshape(-1)[1]])
    else:  # legacy reports: a per-micro-batch mean
        report[CE_KEY] = (ce_sum / mask.sum().clamp(min=1)).to(lm.dtype).reshape(lm.shape)
    return outputs


def _make_forward_step_calc_loss(original):
    @functools.wraps(original)
    def forward_step_calc_loss(model, output_tensor, loss_func, *args, **kwargs):
        ce = cross_entropy_of(output_tensor) if isinstance(output_tensor, torch.Tensor) else None
        if ce is not None and loss_func is not None:
            inner = loss_func

            def loss_func(output, *a, **k):
                outputs = inner(output, *a, **k)
                if k.get("non_loss_data"):
                    return outputs
                return _with_cross_entropy(outputs, inner, ce)

        return original(model, output_tensor, loss_func, *args, **kwargs)

    return forward_step_calc_loss


def install() -> bool:
    """Wrap Megatron's ``forward_step_calc_loss`` (once). False if this Megatron has none."""
    import importlib

    try:
        schedules = importlib.import_module(_SCHEDULES)
    except ImportError:
        return False
    if replace(schedules, "forward_step_calc_loss", _make_forward_step_calc_loss) is None:
        _warn_once(
            "no-hook", f"{_SCHEDULES}.forward_step_calc_loss not found; {CE_KEY!r} is not reported"
        )
        return False
    return True


def uninstall() -> None:
    """Restore Megatron's own ``forward_step_calc_loss``."""
    import sys

    schedules = sys.modules.get(_SCHEDULES)
    if schedules is not None:
        restore(schedules, "forward_step_calc_loss")
