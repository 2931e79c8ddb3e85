"""Hugging Face entry points: ``transformers.Trainer`` / TRL ``SFTTrainer`` and causal LMs.

Three ways in, all with the paper's label convention (the logits at position ``i`` predict
``labels[i + 1]``: the labels are padded with one ``ignore_index`` on the right and their
first column dropped, as ``transformers``' own causal-LM loss does):

* :class:`TOFUSFTTrainer` (``tofu_kernels.hf.trainer``, imported on first use):
  TRL's ``SFTTrainer`` with TOFU as its loss, one forward per step through the model's
  root forward, the loss from the last hidden states and the LM head's weight (never the
  logits) and TRL's ``entropy`` / ``mean_token_accuracy`` from the same kernels.
* :func:`apply_tofu` makes a causal LM's own loss TOFU (``model(..., labels=...).loss``);
  with ``fused_linear=True`` the training forward never builds the logits
  (:func:`tofu_kernels.linear_tofu_loss` on the last hidden states); the same forward,
  called with ``tofu_metrics=True``, is what :class:`TOFUSFTTrainer` runs.
  :func:`revert_tofu` undoes it.
* :func:`tofu_loss_func` returns a ``compute_loss_func(outputs, labels,
  num_items_in_batch=None)`` for ``Trainer(compute_loss_func=...)`` and
  ``SFTTrainer(compute_loss_func=...)``, the signature of the authors' code. It runs on
  ``outputs.logits`` as they are (bf16 stays bf16: no fp32 copy). In TRL 1.16 that path
  runs a second, no-grad forward per step for TRL's metrics.

Normalisation: without ``num_items_in_batch`` the loss is the mean over the micro-batch's
non-ignored (shifted) tokens; with it, the sum divided by ``num_items_in_batch``, the
number of such tokens in the whole accumulated batch, so gradient accumulation over
micro-batches equals one big batch (``transformers``' convention).

``transformers`` is imported lazily: the rest of the package does not need it.
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
