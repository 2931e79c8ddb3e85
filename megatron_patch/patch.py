"""Replace Megatron-Core's language-model loss with the vocab-parallel TOFU loss.

``LanguageModule.compute_language_model_loss(self, labels, logits)`` is the single loss
entry of GPTModel, HybridModel (Mamba), MTP heads and T5/BERT in megatron-core 0.16
through 0.19 (same signature in all; the TP group moved from ``pg_collection.tp`` to
``tp_group``, both handled). It receives labels ``[b, s]`` and logits ``[s, b, V/tp]`` in
the model dtype and returns the unreduced fp32 loss ``[b, s]``; masking and averaging
happen downstream in the training script's ``loss_func``. We patch the class attribute
(where every caller looks it up), keep the original, and restore it on ``revert()``.
With ``fused_output=True`` the output layer and the loss of GPTModel and HybridModel run
as one step without the logits (``fused_output.py``).
"""

from __future__ import annotations

import dataclasses
import threading

import torch

from tofu_kernels.loss import loss_of_logits
from tofu_kernels.params import DEFAULT_BETA, DEFAULT_GAMMA, TOFUParams, check_flag
from tofu_kernels.vocab_parallel import TensorParallel

from . import fused_output as _fused
from . import reporting

LOSS_TYPES = ("cross_entropy", "tofu")
_TARGET = "megatron.core.models.common.language_module.language_module.LanguageModule"


class _State:
    lock = threading.Lock()
    original = None  # Megatron's own function object, while patched
    # The loss's settings, made once by apply(): the first call's runs the host-side input
    # checks, every later call's does not (no per-step host sync).
    params: TOFUParams | None = None
    unchecked: TOFUParams | None = None
    checked = False


def _language_module():
    try:
        from megatron.core.models.common.language_module.language_module import LanguageModule
    except ImportError as e:
        raise ImportError(f"megatron_patch needs {_TARGET} (megatron-core 0.16-0.19): {e}") from e
    if "compute_language_model_loss" not in LanguageModule.__dict__:
        raise ImportError(
            f"megatron_patch: {_TARGET}.compute_language_model_loss not found; this "
            "megatron-core version is not supported (0.16-0.19 are)"
        )
    return LanguageModule


def _tp_group(module):
    group = getattr(module, "tp_group", None)
    if group is None:
        pgc = getattr(module, "pg_collection", None)
        group = getattr(pgc, "tp", None)
    if group is None:
        from megatron.core import parallel_state

        group = parallel_state.get_tensor_model_parallel_group()
    return group


def tofu_compute_language_model_loss(
    self, labels: torch.Tensor, logits: torch.Tensor
) -> torch.Tensor:
    """TOFU replacement: labels ``[b, s]``, logits ``[s, b, V/tp]`` -> fp32 loss ``[b, s]``.

    Reads the model-dtype logits directly (no fp32 copy), one all-gather of the per-token
    statistics over the model's TP group (docs/design.md section 4), and writes the gradient into
    the logits' storage in the
    backward (the logits are dead after the loss, as in Megatron's own CE). The per-token
    cross entropy rides on the returned tensor (``reporting.cross_entropy_of``).
    """
    if isinstance(logits, _fused.DeferredLogits):  # HybridModel's output step, fused
        return _fused.fused_loss_of_deferred(logits, labels, self.config)
    params = _call_params()
    if params is None:  # reverted while something still holds this function: Megatron's loss
        return _language_module().__dict__["compute_language_model_loss"](self, labels, logits)
    # The one call into tofu_kernels per loss: [s, b, V/tp] seen as [b, s, V/tp] (a strided
    # view, read without a copy) against labels [b, s], over the model's TP group.
    loss, ce = loss_of_logits(
        logits.transpose(0, 1), labels, params, TensorParallel(_tp_group(self))
    )
    # The per-token loss is a view of the kernels' flat output. Megatron's combined 1F1B
    # schedule (--overlap-moe-expert-parallel-comm) replaces a view by a new tensor
    # (make_viewless), which would drop the attached cross entropy: return a tensor that is
    # not a view, made by Megatron's own zero-copy function.
    from megatron.core.utils import make_viewless_tensor

    loss = make_viewless_tensor(loss, requires_grad=loss.requires_grad, keep_graph=True)
    reporting.attach_cross_entropy(loss, ce)
    return loss


tofu_compute_language_model_loss._tofu_patched = True  # marker: applying twice is a no-op


def _call_params() -> TOFUParams | None:
    """This call's settings: the first call after apply() checks its inputs on the host
    (labels in range, shards), every later one does not (no per-step host sync)."""
    params = _State.unchecked if _State.checked else _State.params
    _State.checked = params is not None
    return params


def apply(
    loss_type: str = "tofu",
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    backend: str = "auto",
    fused_output: bool = False,
    chunk_size: int | None = None,
    skip_masked: bool = False,
) -> None:
    """Make Megatron-Core compute ``loss_type`` in every LanguageModule.

    ``"tofu"`` installs the TOFU loss with ``gamma``/``beta``/``backend`` (again: updates
    them) and the cross-entropy reporting of ``reporting.py``; ``"cross_entropy"``
    restores Megatron's own loss path untouched. ``fused_output``: GPTModel's and
    HybridModel's output layer and loss as one step without the logits (``chunk_size``
    tokens per logits block; default ``fused_output.fused_chunk_rows``, the rule in
    docs/megatron.md's flag table), see ``fused_output.py``; ``skip_masked``: the fused step
    computes only the rows whose loss mask is 1 (one host sync per call; docs/megatron.md).
    """
    check_flag(fused_output, "fused_output", "megatron_patch.apply")
    check_flag(skip_masked, "skip_masked", "megatron_patch.apply")
    if loss_type not in LOSS_TYPES:
        raise ValueError(
            f"megatron_patch: loss_type must be one of {LOSS_TYPES}, got {loss_type!r}"
        )
    if loss_type == "cross_entropy":
        revert()
        return
    # Megatron's loss entry returns per-token losses; the logits are dead after it, so the
    # gradient goes into their storage; the cross entropy rides along for the reports.
    params = TOFUParams(
        gamma=gamma,
        beta=beta,
        backend=backend,
        reduction="none",
        inplace_backward=True,
        return_ce=True,
    )
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"megatron_patch: chunk_size must be a positive int, got {chunk_size!r}")
    cls = _language_module()
    with _State.lock:
        current = cls.__dict__["compute_language_model_loss"]
        if not getattr(current, "_tofu_patched", False):
            _State.original = current
            cls.compute_language_model_loss = tofu_compute_language_model_loss
        _State.params, _State.unchecked = params, dataclasses.replace(params, check_inputs=False)
        _State.checked = False
        reporting.install()
        _fused.uninstall()
        if fused_output:
            _fused.install(_call_params, reporting.attach_cross_entropy, chunk_size, skip_masked)


def revert() -> None:
    """Restore Megatron's original ``compute_language_model_loss`` and
    ``forward_step_calc_loss`` (the same objects)."""
    with _State.lock:
        if _State.original is not None:
            _language_module().compute_language_model_loss = _State.original
        _State.original, _State.params, _State.unchecked = None, None, None
        _State.checked = False
        reporting.uninstall()
        _fused.uninstall()


def is_applied() -> bool:
    return _State.params is not None


def config() -> TOFUParams | None:
    """The settings the patched loss runs with (None while not applied)."""
    return _State.params
