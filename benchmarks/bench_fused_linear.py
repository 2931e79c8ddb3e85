"""Fused linear + loss benchmark: the model's last layer and its loss, forward + backward.

    python benchmarks/bench_fused_linear.py              # GPU: N=8192 D=4096 bf16, V=128256 and 16032
    python benchmarks/bench_fused_linear.py --cpu-smoke  # tiny, proves the harness runs
    python benchmarks/bench_fused_linear.py --tokens 4096 --hidden 4096 --vocab 151936
    python benchmarks/bench_fused_linear.py --prompt-fraction 0 0.5 0.9   # SFT: prompt rows ignored

Each implementation computes ``loss(hidden @ weight.T, labels)`` and the gradients of
``hidden`` and ``weight`` (fresh buffers every run). Reported: forward+backward median
(20%/80% quantiles), peak extra memory over the inputs (GiB: everything the step
allocates, the two gradients included; ``hidden``'s and ``weight``'s gradient alone are
``N*D`` and ``V*D`` elements), the GEMM throughput that time implies (3 GEMMs of
``2*N*D*V`` flops; the fused TOFU with reduction "mean" does exactly 3), the loss of one
call (the TOFU rows must agree, the CE rows among themselves), and PASS/MISS against the
targets (docs/design.md section 8), judged at the full vocabulary (128256):

  ours fused linear_tofu_loss   time <= 1.05 x (matmul + ours), peak extra <= 1.2 GiB,
                                at least 1.35 x faster than Cut Cross-Entropy, faster than
                                Liger's fused linear CE and than the composed recipe

The second vocabulary (16032: a 128256-column vocabulary over TP = 8, the width one rank's
output layer has) is measured side by side, one table per vocabulary, with no target.

Prompt fraction (column "prompt"): the share of rows whose label is ignore_index, as prompt
and padding tokens are in SFT (default 0 and 0.5). Ours computes the output layer only for
the rows that train; "ours fused TOFU (every row)" is the same call computing every row
(skip_ignored=False), and "vs every row" is ours' time over that row's, measured in the same run.

Implementations (each where importable; the table says which were not):
  ours fused TOFU [chunk c]      tofu_kernels.linear_tofu_loss (default chunk, and a sweep)
  ours fused CE                  the same in CE mode (gamma 0, beta 1): the like-for-like
                                 row for the CE baselines
  matmul + ours TOFU             F.linear, then tofu_kernels.tofu_loss on the logits
  matmul + authors TOFU          F.linear, then the paper's PyTorch loss
  matmul + torch CE (fp32)       F.linear, then F.cross_entropy on fp32 logits (HF's default)
  Cut Cross-Entropy              cut_cross_entropy.linear_cross_entropy (CE only)
  Liger fused linear CE          liger_kernel LigerFusedLinearCrossEntropyLoss (CE only)
  composed TOFU (Liger FLCE)     TOFU from what a Liger user already has (:func:`composed_tofu_loss`):
                                 Liger's fused linear CE with reduction "none" on hidden / beta
                                 (the tempered CE per token, -log q_t), a no-grad pass at
                                 temperature 1 for the detached focal weight g(p), and
                                 sum(g * beta * ce_tempered) / n
  composed TOFU (torch stand-in) the same recipe over :func:`linear_ce_none_torch` (chunked
                                 torch linear CE) where Liger cannot run: the recipe's math,
                                 checked against ours by tests/docs/test_bench_recipe.py; CPU only
CPU numbers are NOT performance results.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_loss import DTYPES, gpu_name, make_timer  # noqa: E402

TIME_RATIO, PEAK_GIB, CCE_SPEEDUP = 1.05, 1.2, 1.35
TARGET_VOCAB, TP_SHARD_VOCAB = 128256, 16032  # the full vocabulary, and its shard at TP = 8
COMPOSED_LIGER, COMPOSED_TORCH = "composed TOFU (Liger FLCE)", "composed TOFU (torch stand-in)"


def linear_ce_none_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    chunk: int = 1024,
) -> torch.Tensor:
    """Per-token cross entropy of ``hidden @ weight.T``, reduction "none": the torch stand-in
    for a fused linear CE (what Liger's gives with ``reduction="none"``).

    ``hidden [N, D]``, ``weight [V, D]``, ``labels [N]`` (``ignore_index`` gives 0); returns
    ``[N]`` in at least fp32 (fp64 inputs stay fp64). Chunks of ``chunk`` rows bound the
    forward's temporaries only: autograd keeps every chunk's logits (a stand-in for the
    math, not for the memory).
    """
    out = []
    for s in range(0, hidden.shape[0], chunk):
        z = torch.nn.functional.linear(hidden[s : s + chunk], weight)
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        out.append(
            torch.nn.functional.cross_entropy(
                z, labels[s : s + chunk], reduction="none", ignore_index=ignore_index
            )
        )
    return torch.cat(out)


def composed_tofu_loss(
    linear_ce_none,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    gamma: float,
    beta: float,
    ignore_index: int = -100,
) -> torch.Tensor:
    """TOFU (reduction "mean") composed from a fused linear CE with reduction "none".

    ``linear_ce_none(hidden, weight, labels) -> [N]`` per-token CE of ``hidden @ weight.T``
    (0 at ``ignore_index``). Since ``(hidden / beta) @ weight.T = z / beta``, its CE on
    ``hidden / beta`` is the tempered ``-log q_t``; a second call without gradients on
    ``hidden`` gives ``-log p`` for the detached focal weight g(p) (docs/design.md section 2).
    loss = sum(g * beta * (-log q_t)) / (non-ignored tokens); its gradient is
    ``g * (q - onehot)`` through the first call only. Two passes over the vocabulary where
    ours makes one, and in the inputs' dtype ``hidden / beta`` is rounded once more.
    """
    from tofu_kernels.reference import spec_focal_weight

    with torch.no_grad():
        ce1 = linear_ce_none(hidden.detach(), weight.detach(), labels)
        g = spec_focal_weight(-ce1.to(torch.promote_types(ce1.dtype, torch.float32)), gamma)
    ce_t = linear_ce_none(hidden / beta, weight, labels)
    ce_t = ce_t.to(torch.promote_types(ce_t.dtype, torch.float32))
    n = (labels != ignore_index).sum().clamp(min=1)
    return (g * beta * ce_t).sum() / n


@dataclass
class Row:
    name: str
    prompt: float = 0.0  # the share of rows whose label is ignore_index
    both: tuple[float, float, float] | None = None
    peak_gib: float | None = None
    loss: float | None = None
    error: str = ""


EVERY_ROW = "ours fused TOFU (every row)"


def make_impls(device: str, args) -> tuple[list[tuple[str, object]], list[str]]:
    import tofu_kernels as tk

    g, b = args.gamma, args.beta
    impls, missing = [], []
    impls.append(
        (
            "ours fused TOFU",
            lambda h, w, y: tk.linear_tofu_loss(h, w, y, gamma=g, beta=b, check_inputs=False),
        )
    )
    impls.append(
        (
            EVERY_ROW,
            lambda h, w, y: tk.linear_tofu_loss(
                h, w, y, gamma=g, beta=b, check_inputs=False, skip_ignored=False
            ),
        )
    )
    for c in args.chunk_sweep:
        impls.append(
            (
                f"ours fused TOFU [chunk {c}]",
                lambda h, w, y, c=c: tk.linear_tofu_loss(
                    h, w, y, gamma=g, beta=b, check_inputs=False, chunk_size=c
                ),
            )
        )
    impls.append(
        (
            "ours fused CE",
            lambda h, w, y: tk.linear_tofu_loss(h, w, y, gamma=0.0, beta=1.0, check_inputs=False),
        )
    )
    impls.append(
        (
            "matmul + ours TOFU",
            lambda h, w, y: tk.tofu_loss(
                torch.nn.functional.linear(h, w), y, gamma=g, beta=b, check_inputs=False
            ),
        )
    )
    impls.append(
        (
            "matmul + authors TOFU",
            lambda h, w, y: (
                tk.authors_tofu_loss(  # the mean over the tokens that train
                    torch.nn.functional.linear(h, w), y, g, b
                ).sum()
                / (y != -100).sum().clamp(min=1)
            ),
        )
    )
    impls.append(
        (
            "matmul + torch CE (fp32)",
            lambda h, w, y: torch.nn.functional.cross_entropy(
                torch.nn.functional.linear(h, w).float(), y
            ),
        )
    )
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError:
        missing.append("Cut Cross-Entropy (cut_cross_entropy not installed)")
    else:
        if device == "cuda":
            impls.append(("Cut Cross-Entropy", lambda h, w, y: linear_cross_entropy(h, w, y)))
        else:
            missing.append("Cut Cross-Entropy (needs a GPU)")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        missing.append("Liger fused linear CE (liger_kernel not installed)")
    else:
        if device == "cuda":
            liger = LigerFusedLinearCrossEntropyLoss()
            impls.append(("Liger fused linear CE", lambda h, w, y: liger(w, h, y)))
            liger_none = LigerFusedLinearCrossEntropyLoss(reduction="none")
            impls.append(
                (
                    COMPOSED_LIGER,
                    lambda h, w, y: composed_tofu_loss(
                        lambda h_, w_, y_: liger_none(w_, h_, y_), h, w, y, gamma=g, beta=b
                    ),
                )
            )
        else:
            missing.append("Liger fused linear CE (needs a GPU)")
    if not any(name == COMPOSED_LIGER for name, _ in impls):
        missing.append(f"{COMPOSED_LIGER} (needs Liger on a GPU)")
        if device != "cuda":
            impls.append(
                (
                    COMPOSED_TORCH,
                    lambda h, w, y: composed_tofu_loss(
                        linear_ce_none_torch, h, w, y, gamma=g, beta=b
                    ),
                )
            )
    return impls, missing


def bench(name, fn, n, d, v, dtype, device, tbench, prompt: float = 0.0) -> Row:
    row = Row(name, prompt)
    h = w = y = None
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        h = torch.randn(n, d, device=device, dtype=dtype, generator=gen).requires_grad_()
        w = (
            torch.randn(v, d, device=device, dtype=dtype, generator=gen) * d**-0.5
        ).requires_grad_()
        y = torch.randint(0, v, (n,), device=device, generator=gen)
        y[
            torch.randperm(n, generator=torch.Generator().manual_seed(1))[: int(prompt * n)].to(
                device
            )
        ] = -100

        def step():
            fn(h, w, y).backward()

        row.loss = float(fn(h, w, y).detach())
        row.both = tbench(step, grad_to_none=[h, w])
        h.grad = w.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            row.peak_gib = (torch.cuda.max_memory_allocated() - base) / 2**30
    except torch.cuda.OutOfMemoryError:
        row.error = "out of memory"
    except Exception as e:  # a baseline that cannot run here is reported, not fatal
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    finally:
        h = w = y = None
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def targets(rows: list[Row], device: str, v: int) -> list[str]:
    if device != "cuda":
        return ["n.a. (CPU smoke run: the targets are judged on a GPU)"]
    if v != TARGET_VOCAB:
        return [
            f"n.a. (the targets are judged at V = {TARGET_VOCAB}; this table is for comparison)"
        ]
    by = {r.name: r for r in rows if r.both}
    ours, mat, cce = (
        by.get("ours fused TOFU"),
        by.get("matmul + ours TOFU"),
        by.get("Cut Cross-Entropy"),
    )
    liger, composed = by.get("Liger fused linear CE"), by.get(COMPOSED_LIGER)
    out = []
    if ours is None:
        return ["n.a. ours fused TOFU did not run"]
    if mat is not None:
        ratio = ours.both[0] / mat.both[0]
        out.append(
            f"{'PASS' if ratio <= TIME_RATIO else 'MISS'} time: ours fused {ours.both[0]:.2f} ms = "
            f"{ratio:.3f} x matmul + ours ({mat.both[0]:.2f} ms); target <= {TIME_RATIO}"
        )
    if ours.peak_gib is not None:
        out.append(
            f"{'PASS' if ours.peak_gib <= PEAK_GIB else 'MISS'} memory: ours fused peak extra "
            f"{ours.peak_gib:.3f} GiB; target <= {PEAK_GIB}"
        )
    if cce is not None:
        sp = cce.both[0] / ours.both[0]
        out.append(
            f"{'PASS' if sp >= CCE_SPEEDUP else 'MISS'} vs Cut Cross-Entropy: {sp:.2f} x faster "
            f"({cce.both[0]:.2f} ms, {cce.peak_gib:.3f} GiB); target >= {CCE_SPEEDUP}"
        )
    else:
        out.append("n.a. vs Cut Cross-Entropy: not importable here")
    for name, other in (("Liger's fused linear CE", liger), ("the composed recipe", composed)):
        if other is None:
            out.append(f"n.a. faster than {name}: did not run here")
            continue
        sp = other.both[0] / ours.both[0]
        out.append(
            f"{'PASS' if sp > 1 else 'MISS'} faster than {name}: {sp:.2f} x ({other.both[0]:.2f} ms, "
            f"peak extra {_gib(other.peak_gib)} GiB); target > 1"
        )
    if composed is not None and composed.loss is not None and ours.loss is not None:
        out.append(
            f"(check) composed recipe's loss {composed.loss:.6g} vs ours {ours.loss:.6g}: relative "
            f"difference {abs(composed.loss - ours.loss) / max(abs(ours.loss), 1e-30):.1e}"
        )
    return out


def _gib(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def to_markdown(tables, n, d, dtype, device, missing, notes) -> str:
    """``tables``: (V, rows) per vocabulary, one section each."""
    lines = [
        f"# Fused linear + loss: N={n} D={d} {dtype}, forward + backward",
        "",
        f"Device: **{gpu_name()}**; torch {torch.__version__}.",
        "CPU smoke run: NOT a performance result." if device == "cpu" else "",
    ]
    for v, rows in tables:
        lines += ["", f"## V = {v}", ""] + _table(rows, n, d, v, device)
    lines += ["", f"Not available: {', '.join(missing) if missing else 'none'}."] + notes
    return "\n".join(lines) + "\n"


def _table(rows, n, d, v, device) -> list[str]:
    flops = 3 * 2 * n * d * v
    lines = [
        "| implementation | prompt | fwd+bwd ms (q20-q80) | vs every row | TFLOP/s (3 GEMMs of every row) "
        "| peak extra GiB | loss |",
        "|---|---|---|---|---|---|---|",
    ]
    every = {r.prompt: r for r in rows if r.name == EVERY_ROW and r.both}
    for r in rows:
        if r.error:
            lines.append(f"| {r.name} | {r.prompt:.0%} | {r.error} | | | | |")
            continue
        med, lo, hi = r.both
        peak = "" if r.peak_gib is None else f"{r.peak_gib:.3f}"
        loss = "" if r.loss is None else f"{r.loss:.6g}"
        base = every.get(r.prompt)
        ratio = (
            f"{med / base.both[0]:.2f}"
            if r.name.startswith("ours fused TOFU") and base is not None
            else ""
        )
        lines.append(
            f"| {r.name} | {r.prompt:.0%} | {med:.2f} ({lo:.2f}-{hi:.2f}) | {ratio} "
            f"| {flops / (med * 1e-3) / 1e12:.0f} | {peak} | {loss} |"
        )
    full = [r for r in rows if r.prompt == 0.0]  # the targets are judged with every row training
    return lines + ["", "Targets:", ""] + [f"- {t}" for t in targets(full, device, v)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU shapes even if a GPU exists")
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument(
        "--vocab",
        type=int,
        nargs="+",
        default=None,
        help=f"vocabulary widths, one table each (GPU default: {TARGET_VOCAB} {TP_SHARD_VOCAB})",
    )
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--gamma", type=float, default=3.0)
    p.add_argument("--beta", type=float, default=0.8)
    p.add_argument(
        "--chunk-sweep",
        type=int,
        nargs="*",
        default=None,
        help="extra chunk sizes for ours (GPU default: 256 1024)",
    )
    p.add_argument("--impl", nargs="*", help="substrings selecting implementations")
    p.add_argument("--reps", type=int, default=3, help="CPU timing repetitions")
    p.add_argument(
        "--prompt-fraction",
        type=float,
        nargs="+",
        default=[0.0, 0.5],
        help="shares of rows ignored (SFT prompts), one set of rows each (default 0 0.5)",
    )
    p.add_argument("--out", type=Path, default=None, help="results folder")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    n = args.tokens or (8192 if device == "cuda" else 48)
    d = args.hidden or (4096 if device == "cuda" else 32)
    vocabs = args.vocab or ([TARGET_VOCAB, TP_SHARD_VOCAB] if device == "cuda" else [300])
    if args.chunk_sweep is None:
        args.chunk_sweep = [256, 1024] if device == "cuda" else [16]
    dtype = DTYPES[args.dtype]
    out = args.out or ROOT / "benchmarks" / "results" / ("gpu" if device == "cuda" else "cpu")
    out.mkdir(parents=True, exist_ok=True)
    tbench = make_timer(device, args.reps)
    impls, missing = make_impls(device, args)
    if args.impl:
        impls = [i for i in impls if any(s in i[0] for s in args.impl)]
    print(
        f"device: {gpu_name()}; N={n} D={d} V={' '.join(map(str, vocabs))} {args.dtype}; {len(impls)} "
        f"implementations; not available: {missing or 'none'}",
        flush=True,
    )
    tables, t0 = [], time.time()
    for f in args.prompt_fraction:
        if not 0.0 <= f < 1.0:
            p.error(f"--prompt-fraction: a share in [0, 1), got {f}")
    for v in vocabs:
        rows = []
        for prompt in args.prompt_fraction:
            for k, (name, fn) in enumerate(impls, 1):
                r = bench(name, fn, n, d, v, dtype, device, tbench, prompt)
                rows.append(r)
                status = r.error or (
                    f"fwd+bwd {r.both[0]:.2f} ms, peak extra "
                    f"{r.peak_gib if r.peak_gib is not None else '-'} GiB"
                )
                print(
                    f"[{k}/{len(impls)} V={v} prompt {prompt:.0%} {time.time() - t0:6.1f}s] {name}: {status}",
                    flush=True,
                )
        tables.append((v, rows))
    notes = []
    if device == "cuda":
        notes.append(
            f"\nPeak extra includes the gradients of hidden ({n * d * dtype.itemsize / 2**30:.3f} GiB) "
            f"and weight (V x {d} x {dtype.itemsize} B: "
            + ", ".join(f"{v * d * dtype.itemsize / 2**30:.3f} GiB at V = {v}" for v in vocabs)
            + ")."
        )
    md = to_markdown(tables, n, d, args.dtype, device, missing, notes)
    (out / "bench_fused_linear.md").write_text(md)
    (out / "bench_fused_linear.json").write_text(
        json.dumps(
            {
                "gpu": gpu_name(),
                "torch": torch.__version__,
                "n": n,
                "d": d,
                "dtype": args.dtype,
                "tables": [
                    {
                        "v": v,
                        "rows": [
                            {
                                "impl": r.name,
                                "prompt": r.prompt,
                                "both": r.both,
                                "peak_gib": r.peak_gib,
                                "loss": r.loss,
                                "error": r.error,
                            }
                            for r in rows
                        ],
                    }
                    for v, rows in tables
                ],
            },
            indent=1,
        )
    )
    print()
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
