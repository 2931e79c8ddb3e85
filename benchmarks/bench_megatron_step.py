"""A Megatron-Core GPT training step with each loss: ms per step and peak memory.

    python benchmarks/bench_megatron_step.py --out results/       # GPU: 4 layers, hidden 2048, V 128256, seq 4096
    python benchmarks/bench_megatron_step.py --cpu-smoke          # CPU: tiny, proves the harness runs

One GPTModel (local layer spec, bf16 parameters and logits, TP = 1), the same weights and
batch for every variant, at micro-batch 1 and 4; a step is forward + loss + backward of the
masked mean loss, as Megatron's schedules run it (the optimizer's step is the same for
every loss and left out). Variants: Megatron's native `vocab_parallel_cross_entropy`,
Megatron's fused cross entropy (`cross_entropy_loss_fusion`, native impl), TOFU through
megatron_patch, TOFU in CE mode (gamma 0, beta 1), and both with the fused output layer
(`--tofu-fused-linear`: no logits tensor), the fused output computing only the tokens whose
loss mask is 1 (`--tofu-skip-masked`). `--prompt-fraction` masks that share of each sequence
(its first tokens, as SFT's prompts; default 0.5; 0 for pretraining). Timing: CUDA events around each step, median
and 20/80 % quantiles after warm-up. Peak extra memory: the allocator's peak during a step
minus what was allocated before it (weights, gradients from the previous step, the batch).
The first step's plain cross entropy (masked mean) must agree across the TOFU variants.
Targets (H100/H200, bf16): a TOFU step no slower and no larger than the native CE step;
the fused output's peak at most unfused TOFU's minus 90 % of the logits' bytes, its time
at most 1.05x; fused CE mode faster and smaller than Megatron's native CE.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GPU_SHAPE = dict(num_layers=4, hidden=2048, heads=16, vocab=128256, seq=4096, batches=(1, 4))
CPU_SHAPE = dict(num_layers=2, hidden=64, heads=4, vocab=512, seq=64, batches=(2,))
TOFU, TOFU_CE = "TOFU (gamma 3, beta 0.8)", "TOFU CE mode (gamma 0, beta 1)"
FUSED, FUSED_CE = "TOFU fused output (gamma 3, beta 0.8)", "TOFU fused output, CE mode"
FUSED_SKIP = "TOFU fused output, only the tokens that train (--tofu-skip-masked)"


def init(device: str) -> None:
    fd, path = tempfile.mkstemp(prefix="tofu_step_pg_")
    os.close(fd)
    os.unlink(path)
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo", init_method=f"file://{path}", rank=0, world_size=1
    )
    from megatron.core import parallel_state, tensor_parallel

    if device == "cpu":
        torch.cuda.current_device = lambda: "cpu"  # Megatron hard-codes it
    parallel_state.initialize_model_parallel(1)
    if device == "cuda":
        tensor_parallel.random.model_parallel_cuda_manual_seed(1234)
    else:
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def build(shape: dict, device: str):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(0)
    dtype = torch.bfloat16
    cfg = TransformerConfig(
        num_layers=shape["num_layers"],
        hidden_size=shape["hidden"],
        num_attention_heads=shape["heads"],
        use_cpu_initialization=True,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=True,
        pipeline_dtype=dtype,
        bias_activation_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        cross_entropy_fusion_impl="native",
    )
    model = GPTModel(
        cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=shape["vocab"],
        max_sequence_length=shape["seq"],
    )
    return model.to(device=device, dtype=dtype)


def variants():
    import megatron_patch

    def native(model):
        megatron_patch.revert()
        model.config.cross_entropy_loss_fusion = False

    def fused(model):
        megatron_patch.revert()
        model.config.cross_entropy_loss_fusion = True

    def tofu(gamma, beta, fused_linear, skip_masked=False):
        def setup(model):
            model.config.cross_entropy_loss_fusion = False
            megatron_patch.apply(
                "tofu", gamma=gamma, beta=beta, fused_linear=fused_linear, skip_masked=skip_masked
            )

        return setup

    return {
        "Megatron native CE": native,
        "Megatron fused CE": fused,
        TOFU: tofu(3.0, 0.8, False),
        TOFU_CE: tofu(0.0, 1.0, False),
        FUSED: tofu(3.0, 0.8, True),
        FUSED_CE: tofu(0.0, 1.0, True),
        FUSED_SKIP: tofu(3.0, 0.8, True, skip_masked=True),
    }


def measure(model, batch, device: str, warmup: int, reps: int):
    ids, pos, mask, labels, loss_mask = batch

    import megatron_patch

    ces = []

    def step():
        per_token = model(ids, pos, mask, labels=labels, loss_mask=loss_mask)
        loss = (per_token.float() * loss_mask).sum() / loss_mask.sum()
        ce = megatron_patch.cross_entropy_of(per_token)  # TOFU: the plain CE rides along
        ces.append(
            float(((per_token if ce is None else ce).float() * loss_mask).sum() / loss_mask.sum())
        )
        loss.backward()
        return loss.detach()

    losses = [step() for _ in range(warmup)]
    times = []
    peak = None
    for i in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
            if i == 0:
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            losses.append(step())
            end.record()
            torch.cuda.synchronize()
            if i == 0:
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            losses.append(step())
            times.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(times, n=5) if len(times) > 1 else [times[0]] * 4
    return statistics.median(times), q[0], q[3], peak, float(losses[0]), ces[0]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cpu-smoke", action="store_true")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--out", type=Path, default=Path("."))
    p.add_argument(
        "--prompt-fraction",
        type=float,
        default=0.5,
        help="share of each sequence's first tokens with loss mask 0 (SFT's prompts; default 0.5)",
    )
    args = p.parse_args(argv)
    if not 0.0 <= args.prompt_fraction < 1.0:
        p.error(f"--prompt-fraction: a share in [0, 1), got {args.prompt_fraction}")
    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    shape = GPU_SHAPE if device == "cuda" else CPU_SHAPE
    if device == "cpu":
        args.warmup, args.reps = 1, 2
    init(device)
    model = build(shape, device)
    s, v = shape["seq"], shape["vocab"]
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU (no GPU)"
    lines = [
        f"# Megatron-Core GPT training step on {gpu}",
        "",
        f"GPTModel {shape['num_layers']} layers, hidden {shape['hidden']}, vocab {v}, sequence {s}, bf16, "
        f"local layer spec, TP = 1; step = forward + loss + backward ({args.warmup} warm-up, median of "
        f"{args.reps}). Prompt fraction {args.prompt_fraction:.0%}: the loss mask is 0 on that share of "
        "each sequence's first tokens. `first CE`: the first step's plain cross entropy (masked mean), equal "
        "for every variant on the same weights and batch.",
        "",
    ]
    if device == "cpu":
        lines += ["**CPU smoke run: NOT a performance result.**", ""]
    targets = []
    for b in shape["batches"]:
        rows = run_batch(model, b, s, v, device, args)
        lines += table(rows, b, s, v)
        targets += check(rows, b, s, v) if device == "cuda" else []
    if targets:
        lines += ["", "## Targets", "", "| target | value | result |", "|---|---|---|", *targets]
    import megatron_patch

    megatron_patch.revert()
    md = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_megatron_step.md").write_text(md)
    print(md)
    dist.destroy_process_group()
    return 0


def run_batch(model, b: int, s: int, v: int, device: str, args) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, v, (b, s), generator=g).to(device)
    labels = torch.randint(0, v, (b, s), generator=g).to(device)
    pos = torch.arange(s, device=device).expand(b, s)
    mask = torch.triu(torch.ones(s, s, device=device, dtype=torch.bool), diagonal=1)[None, None]
    loss_mask = torch.ones(b, s, device=device)
    loss_mask[:, : int(args.prompt_fraction * s)] = 0
    batch = (ids, pos, mask, labels, loss_mask)
    rows = {}
    for name, setup in variants().items():
        if device == "cpu" and name == "Megatron fused CE":
            rows[name] = "skipped on CPU (torch.compile'd)"
            continue
        setup(model)
        model.zero_grad(set_to_none=True)
        try:
            rows[name] = measure(model, batch, device, args.warmup, args.reps)
        except torch.cuda.OutOfMemoryError:
            rows[name] = "out of memory"
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.empty_cache()
        print(f"[bench_megatron_step] micro-batch {b}, {name}: {rows[name]}", flush=True)
    return rows


def table(rows: dict, b: int, s: int, v: int) -> list[str]:
    lines = [
        f"### micro-batch {b} (logits: {b * s * v * 2 / 2**20:.0f} MiB in bf16)",
        "",
        "| loss | ms/step (q20-q80) | peak extra MiB | first loss | first CE | vs native CE time "
        "| vs fused every token |",
        "|---|---|---|---|---|---|---|",
    ]
    native, every = rows.get("Megatron native CE"), rows.get(FUSED)
    for name, r in rows.items():
        if isinstance(r, str):
            lines.append(f"| {name} | {r} | | | | | |")
            continue
        ratio = f"{r[0] / native[0]:.3f}x" if isinstance(native, tuple) else "-"
        skip = f"{r[0] / every[0]:.3f}x" if name == FUSED_SKIP and isinstance(every, tuple) else ""
        peak = "-" if r[3] is None else f"{r[3]:.0f}"
        lines.append(
            f"| {name} | {r[0]:.2f} ({r[1]:.2f}-{r[2]:.2f}) | {peak} | {r[4]:.4f} | {r[5]:.6f} | {ratio} "
            f"| {skip} |"
        )
    return lines + [""]


def check(rows: dict, b: int, s: int, v: int) -> list[str]:
    """The targets, PASS or MISS, for one micro-batch size."""
    native, tofu, ce_mode = rows.get("Megatron native CE"), rows.get(TOFU), rows.get(FUSED_CE)
    fused = rows.get(FUSED)
    out = []

    def row(what, value, ok):
        out.append(f"| micro-batch {b}: {what} | {value} | {'PASS' if ok else 'MISS'} |")

    if isinstance(tofu, tuple) and isinstance(native, tuple):
        row(
            "TOFU step time <= native CE",
            f"{tofu[0]:.2f} vs {native[0]:.2f} ms",
            tofu[0] <= native[0],
        )
        row(
            "TOFU peak memory <= native CE",
            f"{tofu[3]:.0f} vs {native[3]:.0f} MiB",
            tofu[3] <= native[3],
        )
    if isinstance(fused, tuple) and isinstance(tofu, tuple):
        logits = b * s * v * 2 / 2**20
        row(
            "fused peak <= unfused TOFU - 90 % of the logits",
            f"{fused[3]:.0f} vs {tofu[3] - 0.9 * logits:.0f} MiB",
            fused[3] <= tofu[3] - 0.9 * logits,
        )
        row(
            "fused step time <= 1.05x unfused TOFU",
            f"{fused[0] / tofu[0]:.3f}x",
            fused[0] <= 1.05 * tofu[0],
        )
        row(
            "first CE equal, fused vs unfused TOFU",
            f"{fused[5]:.6f} vs {tofu[5]:.6f}",
            abs(fused[5] - tofu[5]) <= 1e-3 * abs(tofu[5]),
        )
    if isinstance(ce_mode, tuple) and isinstance(native, tuple):
        row(
            "fused CE mode faster than native CE",
            f"{ce_mode[0]:.2f} vs {native[0]:.2f} ms",
            ce_mode[0] < native[0],
        )
        row(
            "fused CE mode smaller than native CE",
            f"{ce_mode[3]:.0f} vs {native[3]:.0f} MiB",
            ce_mode[3] < native[3],
        )
    return out


if __name__ == "__main__":
    sys.exit(main())
