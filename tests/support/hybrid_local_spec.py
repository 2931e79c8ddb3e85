"""A HybridModel stack spec built from Megatron-Core's local layers (no Transformer Engine).

The stack specs megatron-core ships (``megatron.core.models.hybrid.hybrid_layer_specs``)
use Transformer Engine modules, which are not installed here; this module is what a CPU
test passes to Megatron-LM's ``pretrain_hybrid.py`` as
``--spec tests.support.hybrid_local_spec hybrid_stack_spec``. It gives the pattern symbols
``*`` (attention) and ``-`` (MLP) the layers of ``get_gpt_layer_local_spec`` (the GPT
block ``*-`` is then a local GPT layer), and an MTP block for the pattern's ``/`` section.
Mamba (``M``) is left out: ``MambaMixer`` needs the mamba-ssm package's CUDA/Triton kernels.
"""

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_submodules
from megatron.core.models.hybrid.hybrid_block import HybridStack, HybridStackSubmodules
from megatron.core.ssm.mlp_layer import MLPLayer
from megatron.core.transformer.multi_token_prediction import (
    MultiTokenPredictionBlock,
    MultiTokenPredictionBlockSubmodules,
    MultiTokenPredictionLayer,
    MultiTokenPredictionLayerSubmodules,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

_gpt = get_gpt_layer_local_submodules()
_norm = LocalSpecProvider().layer_norm()

hybrid_stack_spec = ModuleSpec(
    module=HybridStack,
    submodules=HybridStackSubmodules(
        attention_layer=ModuleSpec(
            module=TransformerLayer,
            submodules=TransformerLayerSubmodules(
                input_layernorm=_gpt.input_layernorm,
                self_attention=_gpt.self_attention,
                self_attn_bda=_gpt.self_attn_bda,
            ),
        ),
        mlp_layer=ModuleSpec(
            module=MLPLayer,
            submodules=TransformerLayerSubmodules(
                pre_mlp_layernorm=_gpt.pre_mlp_layernorm, mlp=_gpt.mlp, mlp_bda=_gpt.mlp_bda
            ),
        ),
        mtp_block_spec=ModuleSpec(
            module=MultiTokenPredictionBlock,
            submodules=MultiTokenPredictionBlockSubmodules(
                layer_specs=[
                    ModuleSpec(
                        module=MultiTokenPredictionLayer,
                        submodules=MultiTokenPredictionLayerSubmodules(
                            enorm=_norm,
                            hnorm=_norm,
                            eh_proj=LocalSpecProvider().column_parallel_linear(),
                            mtp_model_layer=None,  # built from the pattern's MTP section
                            layer_norm=_norm,
                        ),
                    )
                ]
            ),
        ),
    ),
)
