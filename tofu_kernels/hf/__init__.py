"""Hugging Face entry points (docs/huggingface.md): :class:`TOFUSFTTrainer` (TRL's
``SFTTrainer`` with TOFU, imported on first use), :func:`apply_tofu` / :func:`revert_tofu` (a
causal LM's own loss; ``fused_linear=True``: no logits) and :func:`tofu_loss_func` (a
``compute_loss_func``). Labels follow ``transformers``' causal-LM convention (shifted inside,
``num_items_in_batch`` normalisation). ``transformers`` is imported lazily.
"""

from .forward import SUPPORTED_MODELS, apply_tofu, revert_tofu, shift_labels, tofu_loss_func

__all__ = [
    "SUPPORTED_MODELS",
    "TOFUSFTTrainer",
    "apply_tofu",
    "revert_tofu",
    "shift_labels",
    "tofu_loss_func",
]


def __getattr__(name: str):
    # TOFUSFTTrainer subclasses trl.SFTTrainer: importing it imports TRL, so only on first use.
    if name == "TOFUSFTTrainer":
        from .trainer import TOFUSFTTrainer

        return TOFUSFTTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
