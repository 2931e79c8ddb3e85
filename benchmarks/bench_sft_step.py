"""A TRL training step with TOFU: TOFUSFTTrainer against SFTTrainer + compute_loss_func.

    python benchmarks/bench_sft_step.py              # GPU: a small Qwen3 (V 151936) built in memory
    python benchmarks/bench_sft_step.py --cpu-smoke  # tiny, proves the harness runs

Both trainers train the same model (built in memory from a config, no download; same seed,
same pre-tokenised random batches, bf16 on a GPU) with the same TOFU loss:

  TOFUSFTTrainer                 one forward, the loss from the last hidden states through
                                 linear_tofu_loss (no [B, T, V] logits), TRL's metrics from
                                 the same kernels
  SFTTrainer + tofu_loss_func    the paper's setup in TRL 1.16: the forward with full logits
                                 for the loss, then TRL's second, no-grad forward (its fused
                                 LM head) for the metrics

`--prompt-fraction` (default 0 and 0.5; column "prompt"): that share of each sequence's first
tokens has label -100, as a prompt does in SFT; TOFUSFTTrainer computes the output layer only
for the tokens that train, the other trainer for every token.

Reported per trainer: median ms per optimizer step (after warm-up steps; CUDA synchronised
around each step), peak memory allocated during training (GiB; the model and the optimizer
states are the same for both), and the final loss of each (equal up to bf16 noise: the
same loss). Targets: TOFUSFTTrainer step time <= 0.8 x the other's, peak lower.
CPU numbers are NOT performance results.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TIME_RATIO = 0.8


def build(args, device: str):
    import transformers
    from tokenizers import Tokenizer, models

    cfg = transformers.Qwen3Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=max(args.hidden // 128, 2),
        num_key_value_heads=max(args.hidden // 512, 1),
        head_dim=min(128, args.hidden // 2),
        max_position_embeddings=max(args.seq, 64),
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg)
    if device == "cuda":
        model = model.to(device="cuda", dtype=torch.bfloat16)
    tok = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2}, unk_token="<unk>"))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    return model, tokenizer


def dataset(args, n: int, prompt: float = 0.0):
    from datasets import Dataset

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab, (n, args.seq), generator=g)
    labels = ids.clone()
    labels[
        :, : int(prompt * args.seq)
    ] = -100  # the prompt: no loss (TRL keeps a labels column as is)
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


def run(name: str, args, device: str, out_dir: str, prompt: float = 0.0) -> dict:
    import transformers
    import trl

    from tofu_kernels.hf import TOFUSFTTrainer, tofu_loss_func

    model, tokenizer = build(args, device)
    steps = args.warmup + args.steps
    config = trl.SFTConfig(
        output_dir=out_dir,
        max_steps=steps,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        learning_rate=1e-4,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        max_length=args.seq,
        gradient_checkpointing=False,
        dataset_num_proc=None,
    )
    common = dict(
        model=model,
        args=config,
        processing_class=tokenizer,
        train_dataset=dataset(args, steps * args.batch, prompt),
    )
    if name == "TOFUSFTTrainer":
        trainer = TOFUSFTTrainer(**common, tofu_gamma=args.gamma, tofu_beta=args.beta)
    else:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TRL 1.16 deprecates compute_loss_func
            trainer = trl.SFTTrainer(
                **common, compute_loss_func=tofu_loss_func(args.gamma, args.beta)
            )

    times: list[float] = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t = time.perf_counter()

        def on_step_end(self, *_, **__):
            if device == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    trainer.add_callback(Clock())
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    result = {
        "name": name,
        "prompt": prompt,
        "ms": 1e3 * statistics.median(times[args.warmup :]),
        "peak_gib": peak,
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "steps": len(times),
    }
    del trainer, model
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def to_markdown(rows, args, device) -> str:
    from bench_loss import gpu_name

    lines = [
        f"# TRL SFT step with TOFU: Qwen3 {args.layers} layers, hidden {args.hidden}, V {args.vocab}, "
        f"batch {args.batch} x {args.seq} tokens",
        "",
        f"Device: **{gpu_name()}**; torch {torch.__version__}.",
        "CPU smoke run: NOT a performance result." if device == "cpu" else "",
        "",
        "| trainer | prompt | ms / step (median) | vs itself at prompt 0 | peak GiB | loss first -> last |",
        "|---|---|---|---|---|---|",
    ]
    at0 = {r["name"]: r for r in rows if r["prompt"] == 0.0}
    for r in rows:
        peak = "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}"
        ratio = f"{r['ms'] / at0[r['name']]['ms']:.2f}" if r["name"] in at0 else ""
        lines.append(
            f"| {r['name']} | {r['prompt']:.0%} | {r['ms']:.1f} | {ratio} | {peak} "
            f"| {r['first_loss']:.3f} -> {r['last_loss']:.3f} |"
        )
    lines += ["", "Targets (at the first prompt fraction):", ""]
    ours, base = rows[:2]
    if device != "cuda":
        lines.append("- n.a. (CPU smoke run: the targets are judged on a GPU)")
    else:
        ratio = ours["ms"] / base["ms"]
        lines.append(
            f"- {'PASS' if ratio <= TIME_RATIO else 'MISS'} time: TOFUSFTTrainer {ours['ms']:.1f} ms = "
            f"{ratio:.2f} x SFTTrainer + compute_loss_func ({base['ms']:.1f} ms); target <= {TIME_RATIO}"
        )
        lines.append(
            f"- {'PASS' if ours['peak_gib'] < base['peak_gib'] else 'MISS'} memory: peak "
            f"{ours['peak_gib']:.2f} GiB vs {base['peak_gib']:.2f} GiB; target lower"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU sizes even if a GPU exists")
    p.add_argument("--vocab", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--gamma", type=float, default=3.0)
    p.add_argument("--beta", type=float, default=0.8)
    p.add_argument("--out", type=Path, default=None, help="results folder")
    p.add_argument(
        "--prompt-fraction",
        type=float,
        nargs="+",
        default=[0.0, 0.5],
        help="shares of each sequence's first tokens labelled -100 (default 0 0.5)",
    )
    args = p.parse_args(argv)
    for f in args.prompt_fraction:
        if not 0.0 <= f < 1.0:
            p.error(f"--prompt-fraction: a share in [0, 1), got {f}")
    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    gpu = device == "cuda"
    defaults = dict(
        vocab=151936 if gpu else 500,
        hidden=1024 if gpu else 32,
        layers=4 if gpu else 1,
        batch=8 if gpu else 2,
        seq=1024 if gpu else 16,
        steps=10 if gpu else 2,
        warmup=3 if gpu else 1,
    )
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    out = args.out or ROOT / "benchmarks" / "results" / ("gpu" if gpu else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for prompt in args.prompt_fraction:
            for name in ("TOFUSFTTrainer", "SFTTrainer + tofu_loss_func"):
                t0 = time.time()
                rows.append(run(name, args, device, tmp, prompt))
                print(
                    f"{name}, prompt {prompt:.0%}: {rows[-1]['ms']:.1f} ms/step, peak {rows[-1]['peak_gib']} GiB "
                    f"({time.time() - t0:.0f} s)",
                    flush=True,
                )
    md = to_markdown(rows, args, device)
    (out / "bench_sft_step.md").write_text(md)
    (out / "bench_sft_step.json").write_text(
        json.dumps({"args": vars(args) | {"out": str(out)}, "rows": rows}, indent=1)
    )
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
