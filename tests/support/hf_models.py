"""Tiny randomly initialised Hugging Face causal LMs (no downloads), a word tokenizer and a
text data set over the same vocabulary, and the float64 TOFU loss the Hugging Face tests
compare with. Import after ``pytest.importorskip("transformers")``."""

from __future__ import annotations

import pytest
import torch
import transformers

import tofu_kernels as tk
from tofu_kernels import hf

VOCAB = 97
FAMILIES = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
}


def tiny_model(family: str, seed: int = 0, **config):
    """The tiny model of ``family`` (seeded, fp32, training mode); ``config``: settings of its
    config class on top of the tiny sizes (e.g. ``tie_word_embeddings``)."""
    config_cls, model_cls = FAMILIES[family]
    cfg = config_cls(
        **{
            **dict(
                vocab_size=VOCAB,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
                head_dim=8,
            ),
            **config,
        }
    )
    torch.manual_seed(seed)
    return model_cls(cfg).float().train()


def reference_loss(logits, labels, num_items=None, gamma=3.0, beta=0.8):
    """fp64 TOFU after the shift: mean over non-ignored tokens, or sum / num_items."""
    target = hf.shift_labels(labels)
    per_token, _ = tk.tofu_loss_reference(logits.double(), target, gamma=gamma, beta=beta)
    n = (target != -100).sum() if num_items is None else num_items
    return per_token.sum() / n


def word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 3)}
    vocab.update({"<pad>": VOCAB - 3, "<eos>": VOCAB - 2, "<unk>": VOCAB - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def text_dataset(n=32):
    datasets = pytest.importorskip("datasets")
    return datasets.Dataset.from_dict(
        {"text": [" ".join(f"w{(3 * i + j) % 40}" for j in range(12)) for i in range(n)]}
    )
