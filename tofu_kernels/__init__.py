"""TOFU (Tempered Focal) loss kernels for vocab-sharded logits.

import tofu_kernels as tk
loss = tk.tofu_loss(logits, labels, gamma=3.0, beta=0.8)
loss = tk.linear_tofu_loss(hidden, lm_head.weight, labels)  # never builds the logits
"""

from .extension import extension_loaded, extension_status
from .linear import LinearTOFULoss, linear_tofu_loss, vocab_parallel_linear_tofu_loss
from .loss import TOFULoss, tofu_loss, vocab_parallel_tofu_loss
from .params import BACKENDS, DEFAULT_BETA, DEFAULT_GAMMA, DEFAULT_IGNORE_INDEX, TOFUParams
from .records import TokenMetrics
from .reference import authors_tofu_loss, tofu_loss_reference
from .tofu_math import focal_weight

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "DEFAULT_BETA",
    "DEFAULT_GAMMA",
    "DEFAULT_IGNORE_INDEX",
    "LinearTOFULoss",
    "TOFULoss",
    "TOFUParams",
    "TokenMetrics",
    "authors_tofu_loss",
    "extension_loaded",
    "extension_status",
    "focal_weight",
    "linear_tofu_loss",
    "tofu_loss",
    "tofu_loss_reference",
    "vocab_parallel_linear_tofu_loss",
    "vocab_parallel_tofu_loss",
]
