"""Supervised fine-tuning data as Megatron-LM reads it, made in a test: a tiny Hugging Face
tokenizer with a chat template, a chat jsonl, and Megatron's own dataset and data loader.

The tokenizer is character-level (plus the role words and the special tokens of Megatron's
Nemotron prompt formats), so that tokenizing a conversation turn by turn gives the same ids
as tokenizing it whole, which Megatron's ``SFTTokenizer`` asserts when it masks prompts.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

# The special tokens Megatron's SFT prompt formats use (sft_tokenizer.py): <SPECIAL_10> starts
# a system turn, <SPECIAL_11> a user and an assistant turn, <SPECIAL_12> ends an assistant
# turn (nemotron-nano-v2), <SPECIAL_233> pads (nemotron-h-aligned).
SPECIAL = [
    "<unk>",
    "<pad>",
    "<s>",
    "</s>",
    "<SPECIAL_10>",
    "<SPECIAL_11>",
    "<SPECIAL_12>",
    "<SPECIAL_233>",
]
WORDS = ["System", "User", "Assistant"]
# A chat template of the shape Llama/Qwen tokenizers carry (what the "default" format uses).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _turns(*pairs, system=None):
    out = [{"role": "system", "content": system}] if system is not None else []
    for user, assistant in pairs:
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return out


# Lines of the jsonl, in the order Megatron's sampler reads them (sequential, no shuffle).
# With --seq-length 48 and two samples per micro-batch, the first two micro-batches differ in
# prompt and answer lengths, one line is truncated, one packs two conversations.
CONVERSATIONS = [
    _turns(("name a fruit", "apple"), system="be brief"),  # short
    _turns(("hi", "hello there, how are you"), system="x"),  # short prompt, long answer
    _turns(
        ("list two colours please, thanks", "red"), ("and one more", "blue")
    ),  # multi-turn: truncated
    _turns(("a?", "b")) + _turns(("c?", "dd"), system="s"),  # two conversations, one pack
]


def write_tokenizer(path: Path, nemotron: bool = True) -> Path:
    """A character-level Hugging Face tokenizer saved at ``path`` (AutoTokenizer loads it).

    ``nemotron=False`` leaves out Nemotron's special tokens and any unk or pad token, as a
    Llama 3 tokenizer does (its EOS then doubles as padding in Megatron's ``default`` format).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    special = SPECIAL if nemotron else ["<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(special + WORDS + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>" if nemotron else None))
    tok.pre_tokenizer = pre_tokenizers.Split(
        Regex("|".join(WORDS) + r"|[\s\S]"), behavior="isolated"
    )
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(special)
    extra = {"unk_token": "<unk>", "pad_token": "<pad>"} if nemotron else {}
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        chat_template=CHAT_TEMPLATE,
        **extra,
    ).save_pretrained(path)
    return path


def write_chat_jsonl(path: Path, repeat: int = 4, per_line: int = 1) -> Path:
    """The conversations above, ``repeat`` times, as ``{"messages": [...]}`` lines of
    ``per_line`` conversations each (Megatron's SFTDataset packs one line into a sample)."""
    convs = [c for _ in range(repeat) for c in CONVERSATIONS]
    with open(path, "w") as f:
        for i in range(0, len(convs), per_line):
            f.write(
                json.dumps({"messages": [m for c in convs[i : i + per_line] for m in c]}) + "\n"
            )
    return path


def assistant_text(conversation: list[dict]) -> str:
    """What nemotron-h-aligned trains on: each assistant turn's content and its newline."""
    return "".join(m["content"].strip() + "\n" for m in conversation if m["role"] == "assistant")


def megatron_iterators(script_module):
    """(train, validation) iterators over Megatron's data loaders, built by the training
    script's own ``train_valid_test_datasets_provider`` (SFTDataset with ``--sft``) and
    Megatron's ``build_pretraining_data_loader``; None on the ranks where Megatron builds no
    data (tensor-parallel rank > 0: Megatron's ``get_batch`` broadcasts from rank 0)."""
    from megatron.training.datasets.data_samplers import build_pretraining_data_loader
    from megatron.training.training import build_train_valid_test_datasets

    datasets = build_train_valid_test_datasets(script_module.train_valid_test_datasets_provider)
    return tuple(
        None if ds is None else iter(build_pretraining_data_loader(ds, 0)) for ds in datasets[:2]
    )


class PackedAsMask(torch.nn.Module):
    """Packed SFT sequences for Megatron's local attention, which refuses them.

    ``--sft`` packs conversations and hands the model ``PackedSeqParams`` (THD, cu_seqlens);
    only Transformer Engine's attention takes those, and it attends causally within each
    packed conversation. This wrapper gives the model the same attention as a dense boolean
    mask (block-diagonal causal, from cu_seqlens) and no packed_seq_params; everything else,
    the loss included, is the model's own. It also records what the loss saw.
    """

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module
        self.calls: list[dict] = []

    def set_input_tensor(self, tensor):
        self.module.set_input_tensor(tensor)

    def forward(self, tokens, position_ids, attention_mask, packed_seq_params=None, **kwargs):
        if packed_seq_params is not None:
            cu = packed_seq_params.cu_seqlens_q.long()
            pos = torch.arange(tokens.shape[1])
            seq = torch.bucketize(pos, cu[1:], right=True)  # which packed conversation
            attend = (seq[:, None] == seq[None, :]) & (pos[:, None] >= pos[None, :])
            attention_mask = ~attend[None, None]
        out = self.module(tokens, position_ids, attention_mask, **kwargs)
        self.calls.append(
            {
                "tokens": tokens,
                "labels": kwargs.get("labels"),
                "loss_mask": kwargs.get("loss_mask"),
                "packed": packed_seq_params is not None,
                "output": out,
            }
        )
        return out
