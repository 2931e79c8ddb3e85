"""Replace Megatron-Core's language-model loss with the vocab-parallel TOFU loss.

``LanguageModule.compute_language_model_loss(self, labels, logits)`` is the single loss
entry of GPTModel, HybridModel (Mamba), MTP heads and T5/BERT in megatron-core 0.16
through 0.19 (same signature in all; the TP group moved from ``pg_collection.tp`` to
``tp_group``, both handled). It receives labels ``[b, s]`` and logits ``[s, b, V/tp]`` in
the model dtype and returns the unreduced fp32 loss ``[b, s]``; masking and averaging
happen downstream in the training script's ``loss_func``. We patch the class attribute
(where every caller looks it up), keep the original, and restore it on ``revert()``.
With ``fused_linear=True`` the output layer and the loss of GPTModel and HybridModel run
as one step without the logits (``fused_linear.py``).
"""

from __future__ import annotations

import functools
import sys
import warnings

import torch

from tofu_kernels import patching
from tofu_kernels.loss import loss_of_logits
from tofu_kernels.params import DEFAULT_BETA, DEFAULT_GAMMA, TOFUParams, check_flag
from tofu_kernels.vocab_parallel import TensorParallel

from . import fused_linear as _fused
from . import reporting, settings

LOSS_TYPES = ("cross_entropy", "tofu")
_TARGET = "megatron.core.models.common.language_module.language_module.LanguageModule"
_LOSS = "compute_language_model_loss"


def _language_module():
    try:
        from megatron.core.models.common.language_module.language_module import LanguageModule
    except ImportError as e:
        raise ImportError(f"megatron_patch needs {_TARGET} (megatron-core 0.16-0.19): {e}") from e
    if _LOSS not in LanguageModule.__dict__:
        raise ImportError(
            f"megatron_patch: {_TARGET}.{_LOSS} not found; this "
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


def _make_loss(megatron_loss):
    @functools.wraps(megatron_loss)
    def compute_language_model_loss(self, labels: torch.Tensor, logits: torch.Tensor):
        """TOFU: labels ``[b, s]``, logits ``[s, b, V/tp]`` (model dtype, read without a
        copy) -> fp32 loss ``[b, s]``; the gradient goes into the logits' storage (they are
        dead after the loss, as in Megatron's own cross entropy) and the per-token cross
        entropy rides on the result (``reporting.cross_entropy_of``)."""
        if isinstance(logits, _fused.DeferredLogits):  # HybridModel's fused output step
            return _fused.fused_loss_of_deferred(logits, labels, self.config)
        params = settings.take_call_params()
        if params is None:  # reverted while something still holds this function
            return megatron_loss(self, labels, logits)
        loss, ce = loss_of_logits(
            logits.transpose(0, 1), labels, params, TensorParallel(_tp_group(self))
        )
        # The loss is a view of the kernels' flat output; Megatron's combined 1F1B schedule
        # (--overlap-moe-expert-parallel-comm) replaces views by new tensors, which would
        # drop the attached cross entropy: Megatron's own zero-copy un-viewing.
        from megatron.core.utils import make_viewless_tensor

        loss = make_viewless_tensor(loss, requires_grad=loss.requires_grad, keep_graph=True)
        reporting.attach_cross_entropy(loss, ce)
        return loss

    return compute_language_model_loss


def apply(
    loss_type: str = "tofu",
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    backend: str = "auto",
    fused_linear: bool = False,
    chunk_size: int | None = None,
    skip_masked: bool = False,
    *,
    fused_output: bool | None = None,
) -> None:
    """Make Megatron-Core compute ``loss_type`` in every LanguageModule.

    ``"tofu"`` installs the TOFU loss with ``gamma``/``beta``/``backend`` (again: updates
    them) and the cross-entropy reporting of ``reporting.py``; ``"cross_entropy"``
    restores Megatron's own loss path untouched. ``fused_linear``: GPTModel's and
    HybridModel's output layer and loss as one step without the logits (``chunk_size``
    tokens per logits block; default ``fused_linear.fused_chunk_rows``, the rule in
    docs/megatron.md's flag table), see ``fused_linear.py``; ``skip_masked``: the fused step
    computes only the rows whose loss mask is 1 (one host sync per call; docs/megatron.md).
    ``fused_output``: the old name of ``fused_linear`` (deprecated).
    """
    if fused_output is not None:  # the old name of fused_linear, for one release
        warnings.warn(
            "megatron_patch.apply(fused_output=...) is deprecated, use fused_linear=... (the same "
            "setting; the old name goes in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        fused_linear = fused_output
    check_flag(fused_linear, "fused_linear", "megatron_patch.apply")
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
    with settings.lock:
        patching.replace(cls, _LOSS, _make_loss)
        settings.store(settings.Applied(params, fused_linear, chunk_size, skip_masked))
        reporting.install()
        _fused.uninstall()
        if fused_linear:
            _fused.install()


def revert() -> None:
    """Restore Megatron's original ``compute_language_model_loss`` and
    ``forward_step_calc_loss`` (the same objects)."""
    with settings.lock:
        module = sys.modules.get(_TARGET.rsplit(".", 1)[0])  # not imported: nothing was patched
        if module is not None:
            patching.restore(module.LanguageModule, _LOSS)
        settings.store(None)
        reporting.uninstall()
        _fused.uninstall()


def is_applied() -> bool:
    return settings.current() is not None


def tofu_params() -> TOFUParams | None:
    """The settings the patched loss runs with (None while not applied)."""
    applied = settings.current()
    return None if applied is None else applied.params


def config() -> TOFUParams | None:
    """Deprecated name of :func:`tofu_params` (goes in the next release)."""
    warnings.warn(
        "megatron_patch.config() is deprecated, use megatron_patch.tofu_params() (the same "
        "TOFUParams; 'config' next to Megatron's TransformerConfig misled)",
        DeprecationWarning,
        stacklevel=2,
    )
    return tofu_params()
