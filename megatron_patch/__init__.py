"""Megatron-Core / Megatron-LM integration of the TOFU loss.

    import megatron_patch
    megatron_patch.apply(loss_type="tofu", gamma=3.0, beta=0.8, backend="auto")
    megatron_patch.revert()                  # restores Megatron exactly
    megatron_patch.add_arguments(parser)     # --loss-type --tofu-gamma --tofu-beta --tofu-backend

or, for an unmodified Megatron-LM script:

    python -m megatron_patch.launch pretrain_gpt.py --loss-type tofu --tofu-gamma 3 ...
"""

from .arguments import add_arguments, apply_from_args, install_hooks, remove_hooks
from .patch import LOSS_TYPES, apply, config, is_applied, last_cross_entropy, revert

__all__ = [
    "LOSS_TYPES",
    "add_arguments",
    "apply",
    "apply_from_args",
    "config",
    "install_hooks",
    "is_applied",
    "last_cross_entropy",
    "remove_hooks",
    "revert",
]
