"""torchtitan configs that train Llama 3 with the TOFU loss (docs/torchtitan.md).

Each function is a torchtitan config_registry entry: torchtitan's own Llama 3 config with
its loss replaced. From the repository root (torchtitan imports this file by its module path):

    torchrun --nproc-per-node 8 -m torchtitan.train --module examples.torchtitan.tofu_llama3 --config llama3_8b_tofu

The fused entry (``LinearTOFULoss``) computes the output layer and TOFU together; the other
keeps torchtitan's ``ChunkedLossWrapper`` around TOFU on each chunk's logits.
"""

from torchtitan.components.loss import ChunkedLossWrapper
from torchtitan.models.common.config_utils import decoder_vocab_size
from torchtitan.models.llama3 import config_registry

from tofu_kernels.torchtitan import LinearTOFULoss, TOFULoss

GAMMA, BETA = 3.0, 0.8  # the paper's values


def _with_tofu(config, fused: bool):
    vocab = decoder_vocab_size(config.model_spec)
    if fused:
        config.loss = LinearTOFULoss.Config(gamma=GAMMA, beta=BETA, global_vocab_size=vocab)
    else:
        config.loss = ChunkedLossWrapper.Config(
            loss_fn=TOFULoss.Config(gamma=GAMMA, beta=BETA, global_vocab_size=vocab)
        )
    return config


def llama3_8b_tofu():
    """Llama 3.1 8B, torchtitan's recipe, TOFU through the fused output layer."""
    return _with_tofu(config_registry.llama3_8b(), fused=True)


def llama3_8b_tofu_chunked():
    """The same with torchtitan's ChunkedLossWrapper around TOFU on the logits."""
    return _with_tofu(config_registry.llama3_8b(), fused=False)


def llama3_debugmodel_tofu():
    """torchtitan's small debug model (a quick check of a setup)."""
    return _with_tofu(config_registry.llama3_debugmodel(), fused=True)
