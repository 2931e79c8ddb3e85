"""``TOFUSFTTrainer``: TRL's ``SFTTrainer`` with TOFU as its loss, one forward per step.

TRL 1.16's ``SFTTrainer`` with a ``compute_loss_func`` runs the model twice per step (the
loss on the full logits, then a no-grad pass of its fused LM head for its metrics) and
deprecates that argument. This subclass overrides ``compute_loss`` instead:

- the model runs once, through its root forward (so PEFT, DDP and FSDP wrappers see their
  forward call, as TRL's own fused head does): the forward that
  :func:`~tofu_kernels.hf.apply_tofu` (``fused_linear=True``) installs on the causal LM,
  called with ``tofu_metrics=True``;
- the loss is :func:`~tofu_kernels.linear_tofu_loss` on the last hidden states and the LM
  head's weight (no ``[batch, seq, vocab]`` logits), normalised as TRL does: the sum over
  the micro-batch divided by ``num_items_in_batch`` (the accumulated batch's token count),
  times the number of processes with ``average_tokens_across_devices``, plus the MoE
  router loss (``router_aux_loss_coef``, divided over the accumulation steps);
- TRL's metrics ``entropy`` and ``mean_token_accuracy`` come from the same kernels
  (``return_metrics``: two more fp32 accumulators per row, no more exponentials), logged
  under TRL's names; evaluation runs the same way (the two-pass kernels, no gradient).

What needs the full logits is refused at construction (label smoothing, ``loss_type``
other than ``"nll"``, a ``compute_loss_func``) or, for ``compute_metrics`` /
``preprocess_logits_for_metrics``, falls back as TRL does: one extra no-grad forward with
logits per evaluation step, said once.

This module imports ``trl``; ``tofu_kernels.hf.TOFUSFTTrainer`` imports this module on first use.
"""

from __future__ import annotations

import warnings

import torch
import trl

from ..params import DEFAULT_BETA, DEFAULT_GAMMA, DEFAULT_IGNORE_INDEX, TOFUParams
from .forward import apply_tofu, check_model, check_params

__all__ = ["TOFUSFTTrainer"]


def trainer_params(
    gamma: float | None, beta: float | None, params: TOFUParams | None
) -> TOFUParams:
    """The trainer's :class:`TOFUParams`: ``params`` as given, or made from ``gamma`` and
    ``beta`` (the paper's defaults where not given)."""
    if params is None:
        return TOFUParams(
            gamma=DEFAULT_GAMMA if gamma is None else gamma,
            beta=DEFAULT_BETA if beta is None else beta,
            who="TOFUSFTTrainer",
            names={"gamma": "tofu_gamma", "beta": "tofu_beta"},
        )
    if gamma is not None or beta is not None:
        raise ValueError("TOFUSFTTrainer: give tofu_params or tofu_gamma / tofu_beta, not both")
    if not isinstance(params, TOFUParams):
        raise TypeError(
            f"TOFUSFTTrainer: tofu_params must be a tofu_kernels.TOFUParams, got {type(params).__name__}"
        )
    if params.ignore_index != DEFAULT_IGNORE_INDEX:
        raise ValueError(
            f"TOFUSFTTrainer: tofu_params.ignore_index must be {DEFAULT_IGNORE_INDEX}, the label TRL's "
            f"collators and the Trainer's token count use, got {params.ignore_index}"
        )
    check_params(params, "TOFUSFTTrainer: tofu_params")
    return params


_NO_LOSS_FUNC = (
    "TOFUSFTTrainer computes the TOFU loss itself: do not pass compute_loss_func (for the loss on "
    "the logits, use SFTTrainer(compute_loss_func=tofu_loss_func(...)))"
)


class TOFUSFTTrainer(trl.SFTTrainer):
    """``trl.SFTTrainer`` training with the TOFU loss from the fused linear kernels.

    Takes everything ``SFTTrainer`` takes (``peft_config`` included: LoRA / QLoRA adapters,
    the LM head frozen) and, keyword-only: ``tofu_gamma``, ``tofu_beta`` (default: the
    paper's 3.0, 0.8) or ``tofu_params`` (a ready :class:`~tofu_kernels.TOFUParams`:
    ``gamma``, ``beta``, ``backend``; ``ignore_index`` -100, the label TRL's collators use),
    and ``tofu_chunk_size`` (tokens per logits chunk, default ``linear.CHUNK_BYTES`` of logits). The model
    must be one of :data:`~tofu_kernels.hf.SUPPORTED_MODELS` (or a subclass), as for
    ``apply_tofu``. Under DDP, FSDP2 and DeepSpeed ZeRO-1/2/3 it trains what one process
    trains (docs/huggingface.md, "Sharded data parallelism").
    """

    def __init__(
        self,
        *args,
        tofu_gamma: float | None = None,
        tofu_beta: float | None = None,
        tofu_params: TOFUParams | None = None,
        tofu_chunk_size: int | None = None,
        **kwargs,
    ):
        params = trainer_params(tofu_gamma, tofu_beta, tofu_params)
        if kwargs.get("compute_loss_func") is not None:
            raise ValueError(_NO_LOSS_FUNC)
        model = kwargs.get("model", args[0] if args else None)
        if isinstance(model, torch.nn.Module):  # a model id is checked once loaded, by apply_tofu
            check_model(model, True, "TOFUSFTTrainer")
        super().__init__(*args, **kwargs)
        # TRL 2.0 drops SFTTrainer's compute_loss_func and label smoothing: read them only where they exist
        if getattr(self, "compute_loss_func", None) is not None:  # passed positionally
            raise ValueError(_NO_LOSS_FUNC)
        check_model(self.model, True, "TOFUSFTTrainer")  # the loaded model
        if getattr(self.args, "label_smoothing_factor", 0.0) > 0:
            raise ValueError(
                "TOFUSFTTrainer: label_smoothing_factor > 0 needs the full logits and is not TOFU; "
                "set it to 0"
            )
        if self.args.loss_type != "nll":
            raise ValueError(
                f"TOFUSFTTrainer: loss_type={self.args.loss_type!r} is another loss; TOFU replaces "
                "the 'nll' loss (leave loss_type at its default)"
            )
        sp = getattr(self.accelerator, "parallelism_config", None)
        if (
            sp is not None
            and getattr(sp, "sp_enabled", False)
            and getattr(sp, "sp_backend", None) == "deepspeed"
        ):
            raise ValueError(
                "TOFUSFTTrainer: DeepSpeed sequence parallelism reduces the model's own loss "
                "across ranks; it is not supported"
            )
        if self.compute_metrics is not None or self.preprocess_logits_for_metrics is not None:
            warnings.warn(
                "TOFUSFTTrainer: compute_metrics / preprocess_logits_for_metrics need the logits: each "
                "evaluation step runs one extra no-grad forward that builds them (training is unaffected)",
                UserWarning,
                stacklevel=2,
            )
        # The forward TRL's fused head installed is replaced by ours (the same place: the
        # causal LM under any PEFT wrapper), which TRL's compute_loss would call; ours does not.
        apply_tofu(self.model, params=params, fused_linear=True, chunk_size=tofu_chunk_size)
        self.tofu_params = params

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        inputs["use_cache"] = False
        if self.aux_loss_enabled:
            inputs["output_router_logits"] = True
        outputs = model(**inputs, tofu_metrics=True, num_items_in_batch=num_items_in_batch)
        loss = outputs.lm_loss
        # As TRL (and Trainer): num_items_in_batch counts every rank's tokens, DDP averages
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        if self.aux_loss_enabled:  # a per-micro-batch mean: averaged over the accumulation steps
            steps = (
                self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            )
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
        self._log_tofu_metrics(mode, inputs, outputs)
        if return_outputs:  # compute_metrics wants logits: the extra forward TRL also runs
            with torch.no_grad():
                outputs = model(**{k: v for k, v in inputs.items() if k != "labels"})
        return (loss, outputs) if return_outputs else loss

    def _log_tofu_metrics(self, mode: str, inputs: dict, outputs) -> None:
        """TRL's per-step metrics under TRL's names and with TRL's arithmetic (the ranks' sums
        added, then divided; the router loss averaged over the ranks), from our kernels'
        per-token outputs: every rank's numbers travel in one gather and reach the host in
        one sync (TRL gathers and syncs each on its own)."""
        if mode == "train":  # padding-free batches carry position_ids instead of an attention mask
            if "attention_mask" in inputs:
                local = inputs["attention_mask"].sum()
            elif "position_ids" in inputs:
                local = torch.tensor(
                    inputs["position_ids"].size(1), device=inputs["position_ids"].device
                )
            else:
                raise ValueError(
                    "TOFUSFTTrainer: expected 'attention_mask' or 'position_ids' in the batch "
                    "(TRL's collators make one of them)"
                )
        else:
            local = torch.zeros(())
        aux = outputs.aux_loss if self.aux_loss_enabled else torch.zeros(())
        # fp64 where the device has it (MPS has not): the token counts stay exact integers (fp32: to 2^24)
        device = outputs.entropy.device
        dtype = torch.float32 if device.type == "mps" else torch.float64
        row = torch.stack(
            [
                t.detach().to(device=device, dtype=dtype).reshape(())
                for t in (
                    outputs.label_mask.sum(),
                    outputs.entropy.sum(),
                    outputs.top1.sum(),
                    local,
                    aux,
                )
            ]
        )
        rows = self.accelerator.gather_for_metrics(row[None]).reshape(-1, row.numel())  # [ranks, 5]
        num_valid, entropy_sum, num_correct, tokens, aux_sum = rows.sum(
            0
        ).tolist()  # the one host sync
        self._metrics[mode]["entropy"].append(entropy_sum / num_valid if num_valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append(
            num_correct / num_valid if num_valid > 0 else 0.0
        )
        if mode == "train":
            self._total_train_tokens += int(tokens) // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if self.aux_loss_enabled:
            self._metrics[mode]["aux_loss"].append(aux_sum / rows.shape[0])
