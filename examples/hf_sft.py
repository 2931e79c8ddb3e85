"""TOFU with Hugging Face: TRL's SFTTrainer and transformers' Trainer.

    python examples/hf_sft.py                                  # tiny Qwen3 built here, CPU ok
    python examples/hf_sft.py --model Qwen/Qwen3-0.6B --steps 50   # a real checkpoint

Two ways, both printed with their loss curve:
  1. TRL SFTTrainer(compute_loss_func=tofu_loss_func(gamma, beta)): the paper's setup.
  2. transformers Trainer on a model whose own loss is TOFU (apply_tofu), with
     fused_linear=True: the training forward never builds the [batch, seq, vocab] logits.
Without --model, a randomly initialised 2-layer Qwen3 and a word-level tokenizer are built
in memory (no downloads) and trained on a repetitive toy corpus, so the loss must fall.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers
import trl
from datasets import Dataset

from tofu_kernels.hf import apply_tofu, tofu_loss_func


def tiny_model_and_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(60)] + ["<pad>", "<eos>", "<unk>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                                     unk_token="<unk>")
    config = transformers.Qwen3Config(vocab_size=len(words), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(config), tokenizer


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a Llama / Mistral / Qwen2 / Qwen3 checkpoint (default: tiny)")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--gamma", type=float, default=3.0)
    p.add_argument("--beta", type=float, default=0.8)
    args = p.parse_args(argv)

    def load():
        if args.model is None:
            return tiny_model_and_tokenizer()
        return (transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16),
                transformers.AutoTokenizer.from_pretrained(args.model))

    texts = [" ".join(f"w{(3 * i + j) % 40}" for j in range(12)) for i in range(64)]
    common = dict(max_steps=args.steps, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                  learning_rate=5e-3 if args.model is None else 1e-5, logging_steps=1, report_to=[],
                  save_strategy="no", disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    curves = {}
    with tempfile.TemporaryDirectory() as out:
        # 1. TRL: the paper's compute_loss_func, on the model's logits
        model, tokenizer = load()
        trainer = trl.SFTTrainer(
            model=model, processing_class=tokenizer, train_dataset=Dataset.from_dict({"text": texts}),
            args=trl.SFTConfig(output_dir=out, max_length=32, **common),
            compute_loss_func=tofu_loss_func(args.gamma, args.beta),
        )
        trainer.train()
        curves["TRL SFTTrainer + tofu_loss_func"] = trainer.state.log_history

        # 2. transformers: the model's own loss is TOFU, without the logits
        model, tokenizer = load()
        apply_tofu(model, args.gamma, args.beta, fused_linear=True)
        tokens = Dataset.from_dict({"text": texts}).map(lambda r: tokenizer(r["text"]), remove_columns=["text"])
        trainer = transformers.Trainer(
            model=model, train_dataset=tokens, args=transformers.TrainingArguments(output_dir=out, **common),
            data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
        )
        trainer.train()
        curves["Trainer + apply_tofu(fused_linear=True)"] = trainer.state.log_history
    for name, history in curves.items():
        losses = [h["loss"] for h in history if "loss" in h]
        print(f"{name}: TOFU loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
