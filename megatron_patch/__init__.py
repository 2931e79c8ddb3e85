"""Megatron-Core / Megatron-LM integration of the TOFU loss.

    import megatron_patch
    megatron_patch.apply(loss_type="tofu", gamma=3.0, beta=0.8, backend="auto")
    megatron_patch.revert()                  # restores Megatron exactly
    megatron_patch.add_arguments(parser)     # --loss-type and the --tofu-* flags

or, for an unmodified Megatron-LM script:

    python -m megatron_patch.launch pretrain_gpt.py --loss-type tofu --tofu-gamma 3 ...

(``python -m megatron_patch.launch --help`` lists every flag with its help.)

With the TOFU loss on, Megatron's reports carry ``lm cross entropy`` beside ``lm loss``.
"""

from .arguments import add_arguments, apply_from_args, install_hooks, remove_hooks
from .patch import LOSS_TYPES, apply, config, is_applied, revert, tofu_params
from .reporting import CE_KEY, cross_entropy_of

__all__ = [
    "CE_KEY",
    "LOSS_TYPES",
    "add_arguments",
    "apply",
    "apply_from_args",
    "config",
    "cross_entropy_of",
    "install_hooks",
    "is_applied",
    "remove_hooks",
    "revert",
    "tofu_params",
]
