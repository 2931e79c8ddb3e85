"""A tiny SFT run that ``tests/hf/test_hf_launch.py`` starts the way a user does, under
``accelerate launch --config_file examples/accelerate/<setup>`` (or as one plain process for
the reference): ``python -m tests.support.hf_launch --out DIR [--trainer tofu|trl]``.

Everything that would make runs differ for another reason than the parallelism is fixed
and stated: fp32 (``bf16=False``: TRL's SFTConfig turns bf16 autocast on by default, also on
CPU), plain SGD at a constant learning rate, no gradient clipping, the examples in
sequential order (so that one process with the ranks' batch size times the process count
sees, at each micro-step, exactly the union of the ranks' batches), prompt-completion
examples of one length (no padding: the batches' shapes do not depend on how they are
split; the prompts' tokens are not trained). Rank 0 writes ``DIR/run.pt``: the full
weights before training and after each optimizer step, and the trainer's log history.
"""

from __future__ import annotations

import argparse

import torch
import trl
from datasets import Dataset
from transformers import TrainerCallback

from tofu_kernels.hf import TOFUSFTTrainer


def model_and_tokenizer():
    from .hf_models import VOCAB, tiny_model, word_tokenizer

    return tiny_model("llama", pad_token_id=VOCAB - 3, eos_token_id=VOCAB - 2), word_tokenizer()


def dataset(n: int) -> Dataset:
    """``n`` prompt-completion pairs, 12 words in all, prompts of 3 to 6 words."""
    words = [[f"w{(5 * i + 3 * j) % 60}" for j in range(12)] for i in range(n)]
    cut = [3 + i % 4 for i in range(n)]
    return Dataset.from_dict(
        {
            "prompt": [" ".join(w[:c]) for w, c in zip(words, cut)],
            "completion": [" " + " ".join(w[c:]) for w, c in zip(words, cut)],
        }
    )


class _Snapshots(TrainerCallback):
    """The full weights at the start and after every optimizer step (a collective call on
    every rank: FSDP2 and ZeRO-3 gather the shards)."""

    def __init__(self):
        self.trainer, self.weights = None, []

    def _take(self):
        state = self.trainer.accelerator.get_state_dict(self.trainer.model_wrapped)
        if state is not None:  # ZeRO-3 consolidates on rank 0 only
            self.weights.append({k: v.detach().float().cpu().clone() for k, v in state.items()})

    def on_train_begin(self, args, state, control, **kw):
        self._take()

    def on_step_end(self, args, state, control, **kw):
        self._take()


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--trainer", choices=["tofu", "trl"], default="tofu")
    p.add_argument("--per-device", type=int, default=2)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--deepspeed", default=None)
    args = p.parse_args(argv)
    model, tokenizer = model_and_tokenizer()
    config = trl.SFTConfig(
        output_dir=args.out,
        max_steps=args.steps,
        per_device_train_batch_size=args.per_device,
        gradient_accumulation_steps=args.accumulation,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        bf16=False,
        use_cpu=True,
        train_sampling_strategy="sequential",
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        max_length=32,
        deepspeed=args.deepspeed,
    )
    cls, extra = (
        (TOFUSFTTrainer, dict(tofu_gamma=3.0, tofu_beta=0.8))
        if args.trainer == "tofu"
        else (trl.SFTTrainer, {})
    )
    snapshots = _Snapshots()
    trainer = cls(
        model=model,
        args=config,
        train_dataset=dataset(48),
        processing_class=tokenizer,
        callbacks=[snapshots],
        **extra,
    )
    snapshots.trainer = trainer
    trainer.train()
    if trainer.accelerator.is_main_process:
        torch.save(
            {
                "weights": snapshots.weights,
                "log": trainer.state.log_history,
                "processes": trainer.accelerator.num_processes,
                "distributed_type": str(trainer.accelerator.distributed_type),
                "deepspeed": trainer.is_deepspeed_enabled,
                "fsdp": trainer.is_fsdp_enabled,
            },
            f"{args.out}/run.pt",
        )


if __name__ == "__main__":
    main()
