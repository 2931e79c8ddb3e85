"""TOFU in Axolotl: :class:`TOFUPlugin` (``plugins:`` in the YAML, or found through the package's
``axolotl.plugins`` entry point) with ``tofu_loss: true``. Its keys (:class:`TOFUArgs`) join
Axolotl's config schema, so bad values and combinations are refused when Axolotl validates the
config; its hooks check the model and run :func:`tofu_kernels.hf.apply_tofu`. The keys, the
refused combinations and the hooks: docs/axolotl.md.

Importing this module imports ``axolotl`` (the plugin's base class) and ``pydantic``.
"""

from __future__ import annotations

from pydantic import BaseModel, Field, field_validator, model_validator

from .hf.forward import SUPPORTED_MODELS, apply_tofu, check_model
from .params import DEFAULT_BETA, DEFAULT_GAMMA, beta_error, gamma_error

try:
    from axolotl.integrations.base import BasePlugin
    from axolotl.utils.logging import get_logger
except ImportError as e:  # pragma: no cover - exercised where Axolotl is missing
    raise ImportError(
        "tofu_kernels.axolotl needs Axolotl (axolotl.integrations.base): pip install axolotl"
    ) from e

__all__ = ["MODEL_TYPES", "TOFUArgs", "TOFUPlugin"]

LOG = get_logger(__name__)

# Axolotl's ``model_config_type`` (the checkpoint's config.json ``model_type``) of each
# supported causal LM.
MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
}

# key -> why it cannot go with tofu_loss (each replaces the loss TOFU replaces, or needs the logits)
CONFLICTS = {
    "cut_cross_entropy": "Cut Cross Entropy replaces the model's loss with its own fused cross entropy",
    "liger_fused_linear_cross_entropy": "Liger's fused linear cross entropy replaces the model's loss",
    "liger_cross_entropy": "Liger's cross entropy replaces the model's loss",
    "chunked_cross_entropy": "Axolotl's chunked cross entropy replaces the model's loss",
    "use_eaft": "EAFT is another loss (a compute_loss_func on the logits)",
    "use_dft": "DFT is another loss (a compute_loss_func on the logits)",
    "label_smoothing_factor": "label smoothing is not TOFU and needs the full logits",
    "rl": "the RL trainers (DPO, ORPO, KTO, GRPO, ...) compute their own losses",
    "reward_model": "a reward model trains its own loss",
    "process_reward_model": "a process reward model trains its own loss",
}
FIELDS = ("tofu_loss", "tofu_gamma", "tofu_beta", "tofu_fused_linear", "tofu_chunk_size")


class TOFUArgs(BaseModel):
    """The plugin's YAML keys, merged into Axolotl's config schema."""

    tofu_loss: bool | None = Field(
        default=None,
        json_schema_extra={
            "description": "Train with the TOFU loss (tofu_kernels) instead of cross entropy"
        },
    )
    tofu_gamma: float = Field(
        default=DEFAULT_GAMMA, json_schema_extra={"description": "TOFU focal exponent, >= 0"}
    )
    tofu_beta: float = Field(
        default=DEFAULT_BETA, json_schema_extra={"description": "TOFU temperature, > 0"}
    )
    tofu_fused_linear: bool = Field(
        default=True,
        json_schema_extra={
            "description": "Compute the loss from the last hidden states and "
            "lm_head.weight, never building the logits"
        },
    )
    tofu_chunk_size: int | None = Field(
        default=None,
        json_schema_extra={
            "description": "Tokens per logits chunk of the fused loss "
            "(default: tofu_kernels.linear.default_chunk_size)"
        },
    )

    @model_validator(mode="before")
    @classmethod
    def check_tofu_keys(cls, data):
        if not isinstance(data, dict):
            return data
        unknown = sorted(
            k for k in data if isinstance(k, str) and k.startswith("tofu_") and k not in FIELDS
        )
        if unknown:
            raise ValueError(
                f"unknown TOFU key(s) {', '.join(unknown)}: the TOFU plugin's keys are "
                f"{', '.join(FIELDS)}"
            )
        if not data.get("tofu_loss"):
            given = [k for k in FIELDS[1:] if data.get(k) is not None]
            if given:
                raise ValueError(
                    f"{given[0]} is set but tofu_loss is not true: add `tofu_loss: true` to train "
                    "with TOFU (or remove the tofu_* keys)"
                )
            return data
        for key, why in CONFLICTS.items():
            value = data.get(key)
            if value and not (key == "label_smoothing_factor" and value == 0):
                raise ValueError(
                    f"tofu_loss: true cannot be combined with {key}: {value!r} ({why}); set "
                    f"{key} off or tofu_loss: false"
                )
        return data

    @field_validator("tofu_gamma")
    @classmethod
    def check_gamma(cls, value):
        err = gamma_error(value)
        if err:
            raise ValueError(f"tofu_gamma: {err}")
        return value

    @field_validator("tofu_beta")
    @classmethod
    def check_beta(cls, value):
        err = beta_error(value)
        if err:
            raise ValueError(f"tofu_beta: {err}")
        return value

    @field_validator("tofu_chunk_size")
    @classmethod
    def check_chunk_size(cls, value):
        if value is not None and value < 1:
            raise ValueError(f"tofu_chunk_size must be a positive number of tokens, got {value}")
        return value


def _model_type_error(model_type) -> str | None:
    if model_type is None or model_type in MODEL_TYPES:
        return None
    return (
        f"tofu_loss: true needs one of the supported models; base_model has model_config_type "
        f"{model_type!r}, supported: {', '.join(MODEL_TYPES)} ({', '.join(SUPPORTED_MODELS)}); set "
        "tofu_loss: false or change base_model"
    )


class TOFUPlugin(BasePlugin):
    """Axolotl plugin: the model's own loss becomes TOFU (:func:`tofu_kernels.hf.apply_tofu`)."""

    def get_input_args(self) -> str:
        return f"{TOFUArgs.__module__}.{TOFUArgs.__name__}"

    def pre_model_load(self, cfg):
        if cfg.tofu_loss:
            err = _model_type_error(cfg.model_config_type)
            if err:
                raise ValueError(err)

    def post_model_load(self, cfg, model):
        if not cfg.tofu_loss:
            return
        try:
            check_model(model, bool(cfg.tofu_fused_linear), "tofu_loss")
        except ValueError as e:
            raise ValueError(
                f"{e} (base_model: {cfg.base_model}; set tofu_loss: false or change base_model)"
            ) from None
        gamma = DEFAULT_GAMMA if cfg.tofu_gamma is None else cfg.tofu_gamma
        beta = DEFAULT_BETA if cfg.tofu_beta is None else cfg.tofu_beta
        fused = True if cfg.tofu_fused_linear is None else bool(cfg.tofu_fused_linear)
        apply_tofu(
            model, gamma=gamma, beta=beta, fused_linear=fused, chunk_size=cfg.tofu_chunk_size
        )
        LOG.info(f"TOFU loss applied (gamma={gamma}, beta={beta}, fused_linear={fused})")

    def post_trainer_create(self, cfg, trainer):
        if not cfg.tofu_loss:
            return
        if getattr(trainer, "compute_loss_func", None) is not None:
            raise ValueError(
                "tofu_loss: true, but the trainer has a compute_loss_func (e.g. use_eaft / use_dft), "
                "which replaces the model's TOFU loss; set one of them off"
            )
        if getattr(trainer.args, "label_smoothing_factor", 0) > 0:
            raise ValueError(
                "tofu_loss: true cannot be combined with label_smoothing_factor > 0 (the trainer's "
                "label smoothing replaces the model's loss); set one of them off"
            )
