"""Loss-kernel microbenchmark: TOFU (ours) against what users would otherwise run.

    python benchmarks/bench_loss.py                 # GPU: full grid; CPU: tiny smoke grid
    python benchmarks/bench_loss.py --cpu-smoke     # force the CPU smoke mode
    python benchmarks/bench_loss.py --tokens 16384 --vocab 32064 128256 --dtype bf16

Every row reports forward, backward and forward+backward medians (20%/80% quantiles),
the bandwidth under the byte model

    bytes(fwd+bwd) = N * V * (read fwd + read bwd + write grad) = N * V * 3 * elt
                   = 6 B/element for bf16 logits, 12 B/element for fp32

as GB/s and as a fraction of a device-to-device copy measured in the same run, the
peak extra memory beyond inputs, and the speedup of ours over each baseline in the
same run. Inputs are random normal logits (never zeros), rotated over several buffers
so the L2 cache does not flatter small shapes. CPU numbers are NOT performance
results: they only prove the harness runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
GPU_TOKENS = [4096, 16384, 65536]
GPU_VOCABS = [16032, 32064, 64128, 128256, 151936, 256000]
CPU_TOKENS = [64]
CPU_VOCABS = [512, 2048]


@dataclass
class Impl:
    """One implementation: ``fn(logits, labels) -> scalar loss`` (backward via autograd)."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    kind: str  # "ours" or "baseline"
    mode: str  # "tofu" or "ce"
    note: str = ""


@dataclass
class Row:
    impl: Impl
    n: int
    v: int
    dtype: str
    fwd: tuple[float, float, float] | None = None  # ms: median, q20, q80
    bwd: tuple[float, float, float] | None = None
    both: tuple[float, float, float] | None = None
    peak_mb: float | None = None
    error: str = ""
    extra: dict = field(default_factory=dict)


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU)"


def _time_cpu(fn: Callable[[], object], reps: int, grad_to_none=None) -> tuple[float, float, float]:
    fn()
    ts = []
    for _ in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    q = statistics.quantiles(ts, n=5) if len(ts) > 1 else [ts[0]] * 4
    return statistics.median(ts), q[0], q[3]


def timer(device: str, reps: int) -> Callable[[Callable[[], object]], tuple[float, float, float]]:
    if device == "cuda":
        import triton.testing

        def run(fn, grad_to_none=None):
            med, lo, hi = triton.testing.do_bench(
                fn, quantiles=[0.5, 0.2, 0.8], rep=100, grad_to_none=grad_to_none
            )
            return med, lo, hi

        return run
    return lambda fn, grad_to_none=None: _time_cpu(fn, reps, grad_to_none)


def copy_bandwidth_gbs(device: str, tbench) -> float:
    """Device-to-device copy of 1 GiB (read + write), the bandwidth ceiling we compare to."""
    nbytes = (1 << 30) if device == "cuda" else (64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = tbench(lambda: dst.copy_(src))[0]
    return 2 * nbytes / (ms * 1e-3) / 1e9


def make_impls(device: str, args) -> list[Impl]:
    import tofu_kernels as tk

    g, b = args.gamma, args.beta
    impls: list[Impl] = []
    ours = ["torch"] if device == "cpu" else []
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        ours.append("triton")
    if device == "cuda":
        ours += ["triton"] + (["cuda"] if tk.extension_loaded() else [])
    for be in ours:
        impls.append(Impl(f"ours-{be} TOFU", lambda x, y, be=be: tk.tofu_loss(x, y, g, b, backend=be), "ours", "tofu"))
        impls.append(Impl(f"ours-{be} CE", lambda x, y, be=be: tk.tofu_loss(x, y, 0.0, 1.0, backend=be), "ours", "ce"))
    impls.append(Impl("authors TOFU (PyTorch)", lambda x, y: tk.authors_tofu_loss(x, y, g, b).mean(), "baseline", "tofu"))
    if device == "cuda" and not args.no_compile:
        compiled = torch.compile(tk.authors_tofu_loss, dynamic=False)
        impls.append(Impl("authors TOFU torch.compile", lambda x, y: compiled(x, y, g, b).mean(), "baseline", "tofu"))
    impls.append(Impl("torch F.cross_entropy (fp32 upcast)", lambda x, y: torch.nn.functional.cross_entropy(x.float(), y), "baseline", "ce"))
    return impls


def bench_one(impl: Impl, n: int, v: int, dtype: torch.dtype, device: str, tbench, rotate: int) -> Row:
    row = Row(impl, n, v, str(dtype).replace("torch.", ""))
    try:
        xs = [torch.randn(n, v, device=device, dtype=dtype).requires_grad_() for _ in range(rotate)]
        ys = [torch.randint(0, v, (n,), device=device) for _ in range(rotate)]
        it = [0]

        def pick():
            it[0] = (it[0] + 1) % rotate
            return xs[it[0]], ys[it[0]]

        def fwd():
            x, y = pick()
            with torch.no_grad():
                return impl.fn(x, y)

        def both():
            x, y = pick()
            x.grad = None
            impl.fn(x, y).backward()

        row.fwd = tbench(fwd)
        row.both = tbench(both)
        x, y = xs[0], ys[0]
        loss = impl.fn(x, y)
        # grad_to_none: each backward writes a fresh gradient instead of accumulating.
        row.bwd = tbench(lambda: loss.backward(retain_graph=True), grad_to_none=[x])
        del loss
        x.grad = None
        if device == "cuda":
            x, y = xs[0], ys[0]
            x.grad = None
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            impl.fn(x, y).backward()
            torch.cuda.synchronize()
            # extra = peak minus live inputs, minus the gradient every implementation returns
            grad_bytes = x.numel() * x.element_size()
            row.peak_mb = (torch.cuda.max_memory_allocated() - base - grad_bytes) / 2**20
            x.grad = None
        del xs, ys
    except Exception as e:  # a baseline that cannot run at this shape is reported, not fatal
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
    if device == "cuda":
        torch.cuda.empty_cache()
    return row


def fmt_ms(t) -> str:
    return "-" if t is None else f"{t[0]:.3f} ({t[1]:.3f}-{t[2]:.3f})"


def to_markdown(rows: list[Row], copy_gbs: float, device: str, args) -> str:
    bytes_per_elt = {"bfloat16": 2, "float16": 2, "float32": 4}
    lines = [
        f"# TOFU loss benchmark on {gpu_name()}",
        "",
        f"torch {torch.__version__}; gamma={args.gamma}, beta={args.beta}; "
        f"device copy bandwidth measured in this run: {copy_gbs:.0f} GB/s.",
        "",
        "GB/s = N * V * 3 * elt / t(fwd+bwd): forward reads the logits, backward reads them and",
        "writes the gradient (6 B/element in bf16, 12 in fp32). `copy` = that / copy bandwidth.",
        "Speedup = baseline time / our time for fwd+bwd, same shape, same run.",
    ]
    if device != "cuda":
        lines += ["", "**CPU smoke run: NOT a performance result** (torch backend, Triton interpreter)."]
    lines += [
        "",
        "| N | V | dtype | implementation | fwd ms | bwd ms | fwd+bwd ms | GB/s | copy | peak extra MiB | speedup of ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(f"| {r.n} | {r.v} | {r.dtype} | {r.impl.name} | error: {r.error} | | | | | | |")
            continue
        gbs = r.n * r.v * 3 * bytes_per_elt[r.dtype] / (r.both[0] * 1e-3) / 1e9
        peak = "-" if r.peak_mb is None else f"{r.peak_mb:.1f}"
        lines.append(
            f"| {r.n} | {r.v} | {r.dtype} | {r.impl.name} | {fmt_ms(r.fwd)} | {fmt_ms(r.bwd)} | "
            f"{fmt_ms(r.both)} | {gbs:.0f} | {gbs / copy_gbs:.0%} | {peak} | {r.extra.get('speedup', '')} |"
        )
    return "\n".join(lines) + "\n"


def add_speedups(rows: list[Row]) -> None:
    """Speedup of our first backend over each baseline of the same mode and shape."""
    by_shape: dict[tuple, list[Row]] = {}
    for r in rows:
        by_shape.setdefault((r.n, r.v, r.dtype), []).append(r)
    for group in by_shape.values():
        for r in group:
            if r.impl.kind != "baseline" or r.error:
                continue
            ours = [o for o in group if o.impl.kind == "ours" and o.impl.mode == r.impl.mode and not o.error]
            if ours:
                best = min(ours, key=lambda o: o.both[0])
                r.extra["speedup"] = f"{r.both[0] / best.both[0]:.2f}x ({best.impl.name})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU grid even if a GPU exists")
    p.add_argument("--tokens", type=int, nargs="*")
    p.add_argument("--vocab", type=int, nargs="*", help="vocab shard sizes")
    p.add_argument("--dtype", nargs="*", default=None, choices=list(DTYPES))
    p.add_argument("--gamma", type=float, default=3.0)
    p.add_argument("--beta", type=float, default=0.8)
    p.add_argument("--impl", nargs="*", help="substrings selecting implementations")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    p.add_argument("--reps", type=int, default=5, help="CPU timing repetitions")
    p.add_argument("--out", type=Path, default=None, help="results folder")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before tofu_kernels imports Triton
    tokens = args.tokens or (GPU_TOKENS if device == "cuda" else CPU_TOKENS)
    vocabs = args.vocab or (GPU_VOCABS if device == "cuda" else CPU_VOCABS)
    dtypes = args.dtype or (["bf16", "fp32"] if device == "cuda" else ["bf16"])
    out = args.out or ROOT / "benchmarks" / "results" / ("gpu" if device == "cuda" else "cpu")
    out.mkdir(parents=True, exist_ok=True)

    tbench = timer(device, args.reps)
    copy_gbs = copy_bandwidth_gbs(device, tbench)
    impls = make_impls(device, args)
    if args.impl:
        impls = [i for i in impls if any(s in i.name for s in args.impl)]
    configs = [(n, v, d) for d in dtypes for n in tokens for v in vocabs]
    print(f"device: {gpu_name()}; copy {copy_gbs:.0f} GB/s; {len(configs)} shapes x {len(impls)} implementations", flush=True)
    rows: list[Row] = []
    t_start = time.time()
    for k, (n, v, d) in enumerate(configs, 1):
        for impl in impls:
            r = bench_one(impl, n, v, DTYPES[d], device, tbench, rotate=3)
            rows.append(r)
            status = r.error or f"fwd+bwd {r.both[0]:.3f} ms"
            print(f"[{k}/{len(configs)} {time.time() - t_start:6.1f}s] N={n} V={v} {d} {impl.name}: {status}", flush=True)
    add_speedups(rows)
    md = to_markdown(rows, copy_gbs, device, args)
    (out / "bench_loss.md").write_text(md)
    print()
    print(md)
    print(f"written: {out / 'bench_loss.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
