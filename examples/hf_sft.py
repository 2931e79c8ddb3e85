"""TOFU with Hugging Face: TRL's SFTTrainer (TOFUSFTTrainer) and transformers' Trainer.

    python examples/hf_sft.py                                  # tiny Qwen3 built here, CPU ok
    python examples/hf_sft.py --lora                           # LoRA adapters (peft), as in the paper
    python examples/hf_sft.py --model Qwen/Qwen3-0.6B --steps 50   # a real checkpoint
    accelerate launch --config_file examples/accelerate/fsdp2.yaml examples/hf_sft.py --model Qwen/Qwen3-8B
    accelerate launch --config_file examples/accelerate/zero3.yaml examples/hf_sft.py --model Qwen/Qwen3-8B

Three ways, each printed with its loss curve and time per step:
  1. TOFUSFTTrainer(tofu_gamma, tofu_beta): TRL's SFTTrainer with TOFU as its loss, one
     forward per step, the loss from the last hidden states (never the [batch, seq, vocab]
     logits), TRL's entropy / mean_token_accuracy from the same kernels. The main way.
  2. TRL SFTTrainer(compute_loss_func=tofu_loss_func(gamma, beta)): the paper's original
     setup; in TRL 1.16 it costs a second (no-grad) forward per step and the full logits.
  3. transformers Trainer on a model whose own loss is TOFU (apply_tofu, fused_linear=True).
Without --model, a randomly initialised 2-layer Qwen3 and a word-level tokenizer are built
in memory (no downloads) and trained on a repetitive toy corpus, so the loss must fall.
Under a multi-process launch (accelerate launch, torchrun) only way 1 runs (--way trainer:
accelerate allows one distributed setup per process); --way picks one way in any case.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import transformers
import trl
from datasets import Dataset

from tofu_kernels.hf import TOFUSFTTrainer, apply_tofu, tofu_loss_func


def tiny_model_and_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = [f"w{i}" for i in range(60)] + ["<pad>", "<eos>", "<unk>"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    config = transformers.Qwen3Config(
        vocab_size=len(words),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(config), tokenizer


def _trainer_with_apply_tofu(load, peft_config, texts, args, common, out):
    """Way 3: transformers' Trainer on a model whose own loss is TOFU, without the logits."""
    model, tokenizer = load()
    if peft_config is not None:  # apply_tofu works on the PeftModel too
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    apply_tofu(model, args.gamma, args.beta, fused_linear=True)
    tokens = Dataset.from_dict({"text": texts}).map(
        lambda r: tokenizer(r["text"]), remove_columns=["text"]
    )
    trainer = transformers.Trainer(
        model=model,
        train_dataset=tokens,
        args=transformers.TrainingArguments(output_dir=out, **common),
        data_collator=transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    return trainer.train().metrics, trainer.state.log_history


def launch_in_words(processes: int, distributed_type: str) -> str:
    """'1 process, not distributed' / '2 processes, DeepSpeed' (accelerate says NO, MULTI_CPU, ...)."""
    how = {
        "NO": "not distributed",
        "MULTI_CPU": "DDP on CPUs",
        "MULTI_GPU": "DDP",
        "DEEPSPEED": "DeepSpeed",
        "FSDP": "FSDP",
    }.get(distributed_type, distributed_type)
    return f"{processes} process{'es' if processes != 1 else ''}, {how}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", default=None, help="a Llama / Mistral / Qwen2 / Qwen3 checkpoint (default: tiny)"
    )
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--gamma", type=float, default=3.0)
    p.add_argument("--beta", type=float, default=0.8)
    p.add_argument(
        "--lora", action="store_true", help="train LoRA adapters (peft) instead of every weight"
    )
    p.add_argument(
        "--way",
        choices=["all", "trainer", "loss_func", "apply_tofu"],
        default=None,
        help="which way to run (default: all three in one process, the trainer under a multi-process launch)",
    )
    args = p.parse_args(argv)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    way = args.way or ("trainer" if distributed else "all")
    if distributed and way == "all":
        p.error(
            "--way all runs three trainers in one process; under a multi-process launch pick one"
        )

    def load():
        if args.model is None:
            return tiny_model_and_tokenizer()
        return (
            transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16),
            transformers.AutoTokenizer.from_pretrained(args.model),
        )

    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
            target_modules=[
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ],
        )
    texts = [" ".join(f"w{(3 * i + j) % 40}" for j in range(12)) for i in range(64)]
    lr = (5e-3 if args.model is None else 1e-5) * (4 if args.lora else 1)
    common = dict(
        max_steps=args.steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=lr,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
    )
    curves, setup = {}, None
    with tempfile.TemporaryDirectory() as out:
        sft = trl.SFTConfig(output_dir=out, max_length=32, **common)

        # 1. TRL, the main way: TOFU as SFTTrainer's loss, one forward per step, no logits
        if way in ("all", "trainer"):
            model, tokenizer = load()
            trainer = TOFUSFTTrainer(
                model=model,
                processing_class=tokenizer,
                args=sft,
                peft_config=peft_config,
                train_dataset=Dataset.from_dict({"text": texts}),
                tofu_gamma=args.gamma,
                tofu_beta=args.beta,
            )
            curves["TOFUSFTTrainer"] = trainer.train().metrics, trainer.state.log_history
            setup = launch_in_words(
                trainer.accelerator.num_processes, trainer.accelerator.distributed_type.value
            )

        # 2. TRL with the paper's compute_loss_func: the model's logits, plus TRL's extra forward
        if way in ("all", "loss_func"):
            model, tokenizer = load()
            trainer = trl.SFTTrainer(
                model=model,
                processing_class=tokenizer,
                args=sft,
                peft_config=peft_config,
                train_dataset=Dataset.from_dict({"text": texts}),
                compute_loss_func=tofu_loss_func(args.gamma, args.beta),
            )
            curves["SFTTrainer + tofu_loss_func"] = (
                trainer.train().metrics,
                trainer.state.log_history,
            )

        # 3. transformers: the model's own loss is TOFU, without the logits
        if way in ("all", "apply_tofu"):
            curves["Trainer + apply_tofu(fused_linear=True)"] = _trainer_with_apply_tofu(
                load, peft_config, texts, args, common, out
            )
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if setup is not None:
        print(f"TOFUSFTTrainer ran on {setup}")
    for name, (metrics, history) in curves.items():
        logs = [h for h in history if "loss" in h]
        ms = 1e3 * metrics["train_runtime"] / max(len(logs), 1)
        acc = (
            f", token accuracy {logs[-1]['mean_token_accuracy']:.2f}"
            if "mean_token_accuracy" in logs[-1]
            else ""
        )
        print(
            f"{name}: TOFU loss {logs[0]['loss']:.3f} -> {logs[-1]['loss']:.3f} over {len(logs)} steps "
            f"({ms:.0f} ms/step{acc})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
