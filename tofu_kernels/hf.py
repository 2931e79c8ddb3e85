"""Hugging Face entry points: ``transformers.Trainer`` / TRL ``SFTTrainer`` and causal LMs.

Two ways in, both with the paper's label convention (the logits at position ``i`` predict
``labels[i + 1]``: the labels are padded with one ``ignore_index`` on the right and their
first column dropped, as ``transformers``' own causal-LM loss does):

* :func:`tofu_loss_func` returns a ``compute_loss_func(outputs, labels,
  num_items_in_batch=None)`` for ``Trainer(compute_loss_func=...)`` and
  ``SFTTrainer(compute_loss_func=...)``, the signature of the authors' code. It runs on
  ``outputs.logits`` as they are (bf16 stays bf16: no fp32 copy).
* :func:`apply_tofu` makes a causal LM's own loss TOFU (``model(..., labels=...).loss``);
  with ``fused_linear=True`` the training forward never builds the logits
  (:func:`tofu_kernels.linear_tofu_loss` on the last hidden states). :func:`revert_tofu`
  undoes it.

Normalisation: without ``num_items_in_batch`` the loss is the mean over the micro-batch's
non-ignored (shifted) tokens; with it, the sum divided by ``num_items_in_batch``, the
number of such tokens in the whole accumulated batch, so gradient accumulation over
micro-batches equals one big batch (``transformers``' convention).

``transformers`` is imported lazily: the rest of the package does not need it.
"""

from __future__ import annotations

import dataclasses
import types

import torch

from .linear import loss_of_hidden
from .loss import loss_of_logits
from .params import DEFAULT_BETA, DEFAULT_GAMMA, DEFAULT_IGNORE_INDEX, TOFUParams

__all__ = ["SUPPORTED_MODELS", "apply_tofu", "revert_tofu", "shift_labels", "tofu_loss_func"]

# Causal-LM classes whose forward is backbone -> lm_head (nn.Linear, no bias) -> loss, with
# no logit scaling or soft-capping: the structure the fused forward reproduces.
SUPPORTED_MODELS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


def shift_labels(labels: torch.Tensor, ignore_index: int = DEFAULT_IGNORE_INDEX) -> torch.Tensor:
    """``labels[..., 1:]`` with one ``ignore_index`` appended: the target of each position."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


@dataclasses.dataclass(frozen=True)
class _HFLoss:
    """The TOFU loss with Hugging Face's label shift and normalisation, for one
    :class:`TOFUParams` (reduction "mean"), made once by :func:`tofu_loss_func` or
    :func:`apply_tofu`."""

    params: TOFUParams
    chunk_size: int | None = None  # the fused linear path's rows per logits chunk

    # The sum over a micro-batch, divided afterwards by the whole batch's token count: the
    # two-pass path takes the 1/n as its upstream gradient for free (the gradient-in-the-
    # forward path would need one more pass over the gradient to apply it).
    summed: TOFUParams = dataclasses.field(init=False)

    def __post_init__(self):
        summed = dataclasses.replace(self.params, reduction="sum", grad_in_forward=False)
        object.__setattr__(self, "summed", summed)

    def targets(self, labels, shifted, device) -> torch.Tensor:
        """The target of every position: ``shifted`` as given, else ``labels`` shifted."""
        return (shift_labels(labels, self.params.ignore_index) if shifted is None else shifted).to(device)

    def on_logits(self, logits, labels, num_items_in_batch=None, shifted=None) -> torch.Tensor:
        """TOFU of ``[..., V]`` logits against (shifted) labels, with HF's normalisation."""
        target = self.targets(labels, shifted, logits.device)
        if num_items_in_batch is None:
            return loss_of_logits(logits, target, self.params)
        n = num_items_in_batch
        if torch.is_tensor(n):
            n = n.to(logits.device)
        return loss_of_logits(logits, target, self.summed) / n

    def on_hidden(self, hidden, weight, labels, num_items_in_batch=None, shifted=None) -> torch.Tensor:
        """The same loss from the last hidden states and the output layer's weight."""
        target = self.targets(labels, shifted, hidden.device)
        return loss_of_hidden(hidden, weight, target, self.params, chunk_size=self.chunk_size,
                              normalizer=num_items_in_batch)


def tofu_loss_func(
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    *,
    backend: str = "auto",
):
    """A ``compute_loss_func`` for ``transformers.Trainer`` and TRL's ``SFTTrainer``.

    ``Trainer(model, args, train_dataset=ds, compute_loss_func=tofu_loss_func(3.0, 0.8))``.
    The function takes ``(outputs, labels, num_items_in_batch=None)``: ``outputs.logits``
    ``[B, T, V]`` (any float dtype, used as is), unshifted ``labels`` ``[B, T]``.
    """
    loss = _HFLoss(TOFUParams(gamma=gamma, beta=beta, ignore_index=ignore_index, backend=backend))

    def compute_loss_func(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        if logits is None:
            raise ValueError("tofu_loss_func: outputs.logits is None (a fused LM head?); the loss needs the logits")
        return loss.on_logits(logits, labels, num_items_in_batch)

    compute_loss_func.tofu_params = loss.params
    return compute_loss_func


def _supported_name(model) -> str | None:
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED_MODELS:
            return cls.__name__
    return None


def _keep_last(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """``transformers``' ``logits_to_keep``: an int k keeps the last k positions (0: all),
    a tensor lists the positions to keep."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:, :]
    return hidden[:, logits_to_keep, :]


def _tofu_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                  inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, **kwargs):
    """The supported causal LMs' forward with the loss taken from the hidden states.

    Only in training with labels; otherwise (generation, evaluation, no labels) the
    class's own forward runs, with the TOFU loss on its logits.
    """
    loss: _HFLoss = self._tofu_loss
    shifted = kwargs.get("shift_labels")
    if not (self.training and (labels is not None or shifted is not None)):
        return type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids, past_key_values=past_key_values,
                                  inputs_embeds=inputs_embeds, labels=labels, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return_dict = kwargs.pop("return_dict", None)
    num_items = kwargs.get("num_items_in_batch")
    outputs = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=past_key_values, inputs_embeds=inputs_embeds, use_cache=use_cache,
                         **kwargs)
    keep_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
    if shifted is None and not keep_all:
        raise ValueError("apply_tofu(fused_linear=True): labels with logits_to_keep need shift_labels")
    hidden = _keep_last(outputs.last_hidden_state, logits_to_keep)
    out = CausalLMOutputWithPast(loss=loss.on_hidden(hidden, self.lm_head.weight, labels, num_items, shifted=shifted), logits=None, past_key_values=outputs.past_key_values,
                                 hidden_states=outputs.hidden_states, attentions=outputs.attentions)
    return out.to_tuple() if return_dict is False else out


def apply_tofu(
    model,
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    fused_linear: bool = False,
    *,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    backend: str = "auto",
    chunk_size: int | None = None,
):
    """Make ``model(..., labels=labels).loss`` the TOFU loss; returns ``model``.

    Supported: :data:`SUPPORTED_MODELS` (Llama, Mistral, Qwen2, Qwen3 causal LMs and their
    subclasses). ``fused_linear=True``: in training with labels the forward returns
    ``logits=None`` and the loss comes from :func:`~tofu_kernels.linear_tofu_loss` on the
    last hidden states (extra memory one ``[chunk_size, V]`` block instead of the
    ``[B, T, V]`` logits and their gradient); evaluation and generation are unchanged.
    Applying again replaces the settings; :func:`revert_tofu` restores the model's loss.

    Note: TRL's ``SFTTrainer`` computes its loss from its own fused LM head and does not
    read ``model(...).loss``; give it ``compute_loss_func=tofu_loss_func(...)`` instead.
    """
    loss = _HFLoss(TOFUParams(gamma=gamma, beta=beta, ignore_index=ignore_index, backend=backend), chunk_size)
    name = _supported_name(model)
    if name is None:
        raise ValueError(
            f"apply_tofu: {type(model).__name__} is not supported; supported causal LMs: "
            f"{', '.join(SUPPORTED_MODELS)} (for another model, use "
            "Trainer(compute_loss_func=tofu_kernels.hf.tofu_loss_func(...)))"
        )
    head = model.lm_head
    if fused_linear and not (isinstance(head, torch.nn.Linear) and head.bias is None):
        raise ValueError(f"apply_tofu(fused_linear=True): {name}.lm_head must be nn.Linear without bias, got {head}")
    revert_tofu(model)
    model._tofu_loss = loss

    def loss_function(logits, labels, vocab_size=None, num_items_in_batch=None, ignore_index=None,
                      shift_labels=None, **_):
        return loss.on_logits(logits, labels, num_items_in_batch, shifted=shift_labels)

    model.loss_function = loss_function  # transformers' setter: model._loss_function
    if fused_linear:
        model.forward = types.MethodType(_tofu_forward, model)
    return model


def revert_tofu(model):
    """Undo :func:`apply_tofu` (nothing to do if it was not applied); returns ``model``."""
    if getattr(model, "_tofu_loss", None) is None:
        return model
    del model._tofu_loss
    model.__dict__.pop("_loss_function", None)
    if "forward" in model.__dict__ and getattr(model.__dict__["forward"], "__func__", None) is _tofu_forward:
        del model.__dict__["forward"]
    return model
