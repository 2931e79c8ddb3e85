"""Loss-kernel microbenchmark: TOFU (ours) against what users would otherwise run.

    python benchmarks/bench_loss.py                 # GPU: full grid; CPU: tiny smoke grid
    python benchmarks/bench_loss.py --cpu-smoke     # force the CPU smoke mode
    python benchmarks/bench_loss.py --tokens 16384 --vocab 32064 128256 --dtype bf16

Every row reports forward, backward and forward+backward medians (20%/80% quantiles),
for our kernels also forward+backward replayed from a CUDA graph (no host launch cost)
and the number of GPU kernels one forward+backward launches (read from torch.profiler),
the bandwidth under the byte model

    bytes(fwd+bwd) = N * V * (read fwd + read bwd + write grad) = N * V * 3 * elt
                   = 6 B/element for bf16 logits, 12 B/element for fp32

as GB/s and as a fraction of a device-to-device copy measured in the same run, the
peak extra memory beyond the inputs and the returned gradient, and the speedup of our
fastest backend on our default path (not the two-pass or vocab_parallel rows) over each
baseline of the same kind (TOFU or CE) measured in the same run. Inputs are random normal logits
(never zeros), rotated over several buffers when
they are small enough for the L2 cache to flatter repeated runs. CPU numbers are NOT
performance results: they only prove the harness runs.

Implementations (each where importable; the table says which were not):
  ours-{cuda,triton,torch} TOFU / CE   tofu_kernels, TOFU (gamma, beta) and CE mode (0, 1)
  ours-... TOFU vocab_parallel (tp=1)  vocab_parallel_tofu_loss at world size 1 (Megatron's entry)
  authors TOFU (PyTorch)               the paper's formulation (reference.authors_tofu_loss)
  authors TOFU torch.compile           the same through torch.compile (GPU only)
  composed TOFU (Liger CE x2)          what a user builds today: Liger CE forward for p,
                                       then Liger CE on logits / beta times beta * g(p)
  Megatron vocab_parallel_cross_entropy, Megatron fused CE, Liger CE, TE parallel CE
  torch F.cross_entropy (fp32 upcast)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
BYTES = {torch.bfloat16: 2, torch.float16: 2, torch.float32: 4}
# Tensor-parallel shard widths (a 128K vocabulary over TP = 8 is 16032; 151936 / 8 = 18992;
# 32000 and 32064 are Llama-2 / Phi-3 class full vocabularies, or 128K over TP = 4) at the
# micro-batch token counts TP runs use, then whole large vocabularies.
TP_TOKENS, TP_VOCABS = [4096, 8192, 16384], [16032, 18992, 32000, 32064]
BIG_TOKENS, BIG_VOCABS = [16384, 4096], [128256, 64128, 151936, 256000]
CPU_TOKENS = [64]
CPU_VOCABS = [512, 2048]
TARGET_TOKENS, TARGET_VOCABS = 16384, (32064, 128256)


@dataclass
class Impl:
    """``fn(logits [N, V], labels [N]) -> scalar loss``; backward through autograd."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    kind: str  # "ours" or "baseline"
    mode: str  # "tofu" or "ce"


@dataclass
class Row:
    impl: Impl
    n: int
    v: int
    dtype: str
    fwd: tuple[float, float, float] | None = None  # ms: median, q20, q80
    bwd: tuple[float, float, float] | None = None
    both: tuple[float, float, float] | None = None
    graph: tuple[float, float, float] | None = None  # fwd+bwd replayed from a CUDA graph
    kernels: int | None = None  # GPU kernels launched by one fwd+bwd (torch.profiler)
    peak_mb: float | None = None
    error: str = ""
    speedup: str = ""
    bwd_note: str = ""  # why bwd is absent (a derived backward within the timing noise)

    def gbs(self) -> float:
        return self.n * self.v * 3 * BYTES[DTYPES[self.dtype]] / (self.both[0] * 1e-3) / 1e9


def gpu_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU)"


# ------------------------------------------------------------------ timing


def _time_cpu(fn, reps: int, grad_to_none=None) -> tuple[float, float, float]:
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


def make_timer(device: str, reps: int):
    if device == "cuda":
        import triton.testing

        def run(fn, grad_to_none=None):
            med, lo, hi = triton.testing.do_bench(
                fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grad_to_none
            )
            return med, lo, hi

        return run
    return lambda fn, grad_to_none=None: _time_cpu(fn, reps, grad_to_none)


def copy_bandwidth_gbs(device: str, tbench) -> float:
    """Device-to-device copy (read + write), the bandwidth ceiling we compare to."""
    nbytes = (1 << 30) if device == "cuda" else (64 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    ms = tbench(lambda: dst.copy_(src))[0]
    return 2 * nbytes / (ms * 1e-3) / 1e9


# ------------------------------------------------------------------ implementations


def _init_megatron(device: str):
    """A world-size-1 process group and Megatron parallel state (TP = 1)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        # a file rendezvous: no TCP port to collide with other runs on the machine
        fd, path = tempfile.mkstemp(prefix="tofu_bench_pg_")
        os.close(fd)
        os.unlink(path)
        dist.init_process_group(
            "nccl" if device == "cuda" else "gloo",
            init_method=f"file://{path}",
            rank=0,
            world_size=1,
        )
    if device == "cpu":
        torch.cuda.current_device = lambda: "cpu"  # Megatron hard-codes it
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(1)
    return parallel_state.get_tensor_model_parallel_group()


def make_impls(device: str, args) -> tuple[list[Impl], list[str]]:
    """Our backends and every importable baseline; also the names that are missing."""
    import tofu_kernels as tk
    from tofu_kernels.tofu_math import focal_weight

    g, b = args.gamma, args.beta
    impls: list[Impl] = []
    missing: list[str] = []
    ours = []
    if device == "cuda":
        ours = (["cuda"] if tk.extension_loaded() else []) + ["triton"]
        if not tk.extension_loaded():
            missing.append("ours-cuda (extension not built)")
    else:
        ours = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET") == "1" else [])
    # check_inputs=False: no per-call host sync, as in training (the Megatron patch checks
    # the first call only); the eager label check is one .item() per call.
    # reduction="mean": the gradient is made in the forward ("grad in fwd", the default);
    # "two-pass" forces the recompute path, the one per-token upstream gradients take.
    for be in ours:
        impls.append(
            Impl(
                f"ours-{be} TOFU",
                lambda x, y, be=be: tk.tofu_loss(
                    x, y, gamma=g, beta=b, backend=be, check_inputs=False
                ),
                "ours",
                "tofu",
            )
        )
        impls.append(
            Impl(
                f"ours-{be} TOFU two-pass",
                lambda x, y, be=be: tk.tofu_loss(
                    x, y, gamma=g, beta=b, backend=be, check_inputs=False, grad_in_forward=False
                ),
                "ours",
                "tofu",
            )
        )
    for be in ours:
        impls.append(
            Impl(
                f"ours-{be} CE",
                lambda x, y, be=be: tk.tofu_loss(
                    x, y, gamma=0.0, beta=1.0, backend=be, check_inputs=False
                ),
                "ours",
                "ce",
            )
        )
    if ours:  # Megatron's entry: per-token losses (two-pass), summed here as its loss_func does
        be = ours[0]
        impls.append(
            Impl(
                f"ours-{be} TOFU vocab_parallel (tp=1)",
                lambda x, y, be=be: tk.vocab_parallel_tofu_loss(
                    x, y, gamma=g, beta=b, backend=be, check_inputs=False
                ).sum(),
                "ours",
                "tofu",
            )
        )

    impls.append(
        Impl(
            "authors TOFU (PyTorch)",
            lambda x, y: tk.authors_tofu_loss(x, y, g, b).mean(),
            "baseline",
            "tofu",
        )
    )
    if device == "cuda" and not args.no_compile:
        compiled = torch.compile(tk.authors_tofu_loss, dynamic=True)
        impls.append(
            Impl(
                "authors TOFU torch.compile",
                lambda x, y: compiled(x, y, g, b).mean(),
                "baseline",
                "tofu",
            )
        )

    try:
        from liger_kernel.ops.cross_entropy import LigerCrossEntropyFunction
    except ImportError:
        missing.append("Liger-Kernel (liger_kernel not installed)")
    else:
        if device == "cuda":

            def liger_ce(x, y, reduction="mean"):
                # (input, target, weight, ignore_index, lse_square_scale, label_smoothing, reduction)
                return LigerCrossEntropyFunction.apply(x, y, None, -100, 0.0, 0.0, reduction)[0]

            def composed_tofu(x, y):
                with torch.no_grad():
                    # forward-only pass for p (no grad requested: Liger does not write into x)
                    log_p = -liger_ce(x.detach(), y, "none")
                    weight = b * focal_weight(log_p.float(), g)
                return (weight * liger_ce(x / b, y, "none")).mean()

            impls.append(Impl("composed TOFU (Liger CE x2)", composed_tofu, "baseline", "tofu"))
            impls.append(Impl("Liger CE", lambda x, y: liger_ce(x, y), "baseline", "ce"))
        else:
            missing.append("Liger-Kernel (needs a GPU)")

    try:
        import megatron.core  # noqa: F401
    except ImportError:
        missing.append("Megatron-Core (megatron.core not installed)")
    else:
        tp_group = _init_megatron(device)
        from megatron.core.fusions.fused_cross_entropy import fused_vocab_parallel_cross_entropy
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        # Megatron takes [s, b, V]; [N, 1, V] is a free view. Its native CE overwrites fp32
        # inputs in place (a timing-neutral shift of the values here).
        impls.append(
            Impl(
                "Megatron vocab_parallel_cross_entropy",
                lambda x, y: vocab_parallel_cross_entropy(x.unsqueeze(1), y.unsqueeze(1)).mean(),
                "baseline",
                "ce",
            )
        )
        impls.append(
            Impl(
                "Megatron fused CE",
                lambda x, y: fused_vocab_parallel_cross_entropy(
                    x.unsqueeze(1), y.unsqueeze(1), tp_group
                ).mean(),
                "baseline",
                "ce",
            )
        )
    try:
        from transformer_engine.pytorch.cross_entropy import parallel_cross_entropy
    except ImportError:
        missing.append("Transformer Engine (transformer_engine not installed)")
    else:
        impls.append(
            Impl(
                "TE parallel_cross_entropy",
                lambda x, y: parallel_cross_entropy(x.unsqueeze(1), y.unsqueeze(1)).mean(),
                "baseline",
                "ce",
            )
        )
    impls.append(
        Impl(
            "torch F.cross_entropy (fp32 upcast)",
            lambda x, y: torch.nn.functional.cross_entropy(x.float(), y),
            "baseline",
            "ce",
        )
    )
    return impls, missing


# ------------------------------------------------------------------ running


def _rotation(n: int, v: int, dtype: torch.dtype, device: str) -> int:
    """Buffers to rotate over: several when the logits are near L2 size, else one."""
    nbytes = n * v * BYTES[dtype]
    if device != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    free, _ = torch.cuda.mem_get_info()
    if nbytes > 8 * l2:
        return 1
    return max(1, min(3, int(0.25 * free // nbytes)))


def bench_one(impl: Impl, n: int, v: int, dtype: torch.dtype, device: str, tbench) -> Row:
    row = Row(
        impl,
        n,
        v,
        str(dtype)
        .replace("torch.", "")
        .replace("bfloat16", "bf16")
        .replace("float32", "fp32")
        .replace("float16", "fp16"),
    )
    xs = ys = None
    try:
        k = _rotation(n, v, dtype, device)
        xs = [torch.randn(n, v, device=device, dtype=dtype).requires_grad_() for _ in range(k)]
        ys = [torch.randint(0, v, (n,), device=device) for _ in range(k)]
        it = [0]

        def pick():
            it[0] = (it[0] + 1) % k
            return xs[it[0]], ys[it[0]]

        def fwd():  # the training forward: autograd on (our default path writes the gradient here)
            x, y = pick()
            x.grad = None
            return impl.fn(x, y)

        def both():
            x, y = pick()
            x.grad = None
            impl.fn(x, y).backward()

        row.fwd = tbench(fwd)
        row.both = tbench(both)
        x, y = xs[0], ys[0]
        loss = impl.fn(x, y)
        try:
            # backward alone; grad_to_none: each run writes a fresh gradient, never accumulates
            row.bwd = tbench(lambda: loss.backward(retain_graph=True), grad_to_none=[x])
        except RuntimeError:
            # backwards that consume their saved tensors in place (Megatron's CE) cannot
            # be replayed: report fwd+bwd minus fwd, without quantiles
            row.bwd, row.bwd_note = derived_backward(row.fwd, row.both)
        loss = None
        x.grad = None
        if device == "cuda" and impl.kind == "ours":
            row.kernels = count_kernels(impl, x, y)
            x.grad = None
            row.graph = graph_time(impl, x, y, tbench)
            x.grad = None
        if device == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            impl.fn(x, y).backward()
            torch.cuda.synchronize()
            grad_bytes = x.numel() * x.element_size()
            row.peak_mb = (torch.cuda.max_memory_allocated() - base - grad_bytes) / 2**20
            x.grad = None
    except torch.cuda.OutOfMemoryError:
        row.error = "out of memory"
    except Exception as e:  # a baseline that cannot run at this shape is reported, not fatal
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    finally:
        xs = ys = None  # free the buffers (the timing closures hold these cells)
        if device == "cuda":
            torch.cuda.empty_cache()
    return row


def derived_backward(fwd, both) -> tuple[tuple[float, float, float] | None, str]:
    """The backward's time as fwd+bwd minus fwd, (median, nan, nan), where fwd+bwd's 20%
    quantile is above fwd's 80% one; else None and why: within the timing noise the
    difference says nothing, and where the medians cross it is not even positive."""
    if both[1] > fwd[2]:
        return (both[0] - fwd[0], math.nan, math.nan), ""
    return None, "medians cross" if both[0] <= fwd[0] else "within the timing noise"


def count_kernels(impl: Impl, x: torch.Tensor, y: torch.Tensor) -> int:
    """GPU kernels (and memsets / copies) one forward + backward launches, from torch.profiler.

    The backward's seed gradient is made before profiling and ``x.grad`` is cleared, so
    neither autograd's ones-fill nor a gradient accumulation is counted: the loss's own.
    """
    from torch.profiler import ProfilerActivity, profile

    x.grad = None
    impl.fn(x, y).backward()  # warm: compilation and caches stay out of the count
    x.grad = None
    seed = torch.ones((), device=x.device)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        impl.fn(x, y).backward(seed)
        torch.cuda.synchronize()
    x.grad = None
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def graph_time(impl: Impl, x: torch.Tensor, y: torch.Tensor, tbench):
    """fwd+bwd captured once in a CUDA graph and timed by replay (the GPU's time alone)."""
    try:
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                x.grad = None
                impl.fn(x, y).backward()
        torch.cuda.current_stream().wait_stream(s)
        x.grad = None
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            impl.fn(x, y).backward()
        t = tbench(g.replay)
        del g
        return t
    except Exception as e:  # a path that cannot be captured is reported, not fatal
        print(
            f"  graph capture failed for {impl.name}: {type(e).__name__}: {str(e)[:100]}",
            flush=True,
        )
        return None


def check_composed_equals_ours(impls: list[Impl], device: str, dtype: torch.dtype) -> str:
    """The composed baseline must compute our loss (else its timing compares nothing)."""
    comp = next((i for i in impls if i.name.startswith("composed")), None)
    ours = next((i for i in impls if i.kind == "ours" and i.mode == "tofu"), None)
    if comp is None or ours is None:
        return ""
    x = torch.randn(512, 4096, device=device, dtype=dtype)
    y = torch.randint(0, 4096, (512,), device=device)
    a, b = float(comp.fn(x.clone(), y)), float(ours.fn(x.clone(), y))
    return f"composed TOFU vs ours on 512 x 4096 {dtype}: {a:.6f} vs {b:.6f} (rel. diff {abs(a - b) / abs(b):.1e})"


def default_path(kind: str, mode: str, backend: str | None = None):
    """Selects ``kind``'s rows of ``mode`` on the default path (for ours: the gradient in the
    forward, as a mean; not the two-pass or vocab_parallel rows), of ``backend`` if given."""
    return lambda i: (
        i.kind == kind
        and i.mode == mode
        and "vocab_parallel" not in i.name
        and "two-pass" not in i.name
        and (backend is None or i.name.startswith(f"ours-{backend} "))
    )


def add_speedups(rows: list[Row]) -> None:
    """Each baseline's speedup: its fwd+bwd time over our fastest backend's on the default
    path, same mode, shape and run (the baselines take a mean, as that path does)."""
    by_shape: dict[tuple, list[Row]] = {}
    for r in rows:
        by_shape.setdefault((r.n, r.v, r.dtype), []).append(r)
    for group in by_shape.values():
        for r in group:
            if r.impl.kind != "baseline" or r.error:
                continue
            ours = [o for o in group if default_path("ours", r.impl.mode)(o.impl) and not o.error]
            if ours:
                best = min(ours, key=lambda o: o.both[0])
                r.speedup = f"{r.both[0] / best.both[0]:.2f}x ({best.impl.name})"


def _best(rows, n, v, pred):
    cands = [
        r
        for r in rows
        if r.n == n and r.v == v and r.dtype == "bf16" and not r.error and pred(r.impl)
    ]
    return min(cands, key=lambda r: r.both[0], default=None)


def targets(rows: list[Row], copy_gbs: float) -> list[str]:
    """The targets over every bf16 shape measured: PASS where all shapes pass, else the misses."""
    shapes = sorted({(r.n, r.v) for r in rows if r.dtype == "bf16"})

    def named(name):
        return lambda i: i.name == name

    checks = []  # (target, shape, value text, ok)
    for n, v in shapes:
        tofu = _best(rows, n, v, default_path("ours", "tofu"))
        if tofu is None:
            continue
        be = tofu.impl.name.split()[0]
        ce = _best(
            rows,
            n,
            v,
            lambda i, be=be: default_path("ours", "ce")(i) and i.name.startswith(be + " "),
        )
        frac = tofu.gbs() / copy_gbs
        checks.append(
            (
                "TOFU fwd+bwd >= 80% of copy bandwidth (N >= 4096, V >= 16032)",
                (n, v),
                f"{frac:.0%}",
                frac >= 0.8,
            )
        )
        if v >= 64128:
            checks.append(
                (
                    "TOFU fwd+bwd >= 90% of copy bandwidth (V >= 64128)",
                    (n, v),
                    f"{frac:.0%}",
                    frac >= 0.9,
                )
            )
        two = _best(
            rows, n, v, lambda i: i.kind == "ours" and i.mode == "tofu" and "two-pass" in i.name
        )
        if two is not None:
            f2 = two.gbs() / copy_gbs
            checks.append(
                (
                    "two-pass TOFU fwd+bwd >= 80% of copy bandwidth (6 B/element)",
                    (n, v),
                    f"{f2:.0%}",
                    f2 >= 0.8,
                )
            )
        for r in (tofu, two):
            if r is not None and r.kernels is not None:
                checks.append(
                    (
                        "<= 4 GPU kernels per single-device fwd+bwd",
                        (n, v),
                        f"{r.kernels} ({r.impl.name})",
                        r.kernels <= 4,
                    )
                )
        cu = _best(rows, n, v, default_path("ours", "tofu", "cuda"))
        tr = _best(rows, n, v, default_path("ours", "tofu", "triton"))
        if cu and tr:
            checks.append(
                (
                    "Triton within 1.15x of CUDA (TOFU fwd+bwd)",
                    (n, v),
                    f"{tr.both[0] / cu.both[0]:.2f}x",
                    tr.both[0] <= 1.15 * cu.both[0],
                )
            )
        liger = _best(rows, n, v, named("Liger CE"))
        if ce and liger:
            checks.append(
                (
                    "our CE mode <= Liger CE time",
                    (n, v),
                    f"{ce.both[0] / liger.both[0]:.2f}x",
                    ce.both[0] <= liger.both[0],
                )
            )
        if ce:
            checks.append(
                (
                    "TOFU <= 1.05x our CE mode",
                    (n, v),
                    f"{tofu.both[0] / ce.both[0]:.2f}x",
                    tofu.both[0] <= 1.05 * ce.both[0],
                )
            )
        mega = _best(rows, n, v, named("Megatron vocab_parallel_cross_entropy"))
        if mega:
            checks.append(
                (
                    ">= 5x faster than Megatron native CE",
                    (n, v),
                    f"{mega.both[0] / tofu.both[0]:.1f}x",
                    mega.both[0] >= 5 * tofu.both[0],
                )
            )
        auth = _best(rows, n, v, named("authors TOFU (PyTorch)"))
        if auth:
            checks.append(
                (
                    ">= 8x faster than authors' TOFU",
                    (n, v),
                    f"{auth.both[0] / tofu.both[0]:.1f}x",
                    auth.both[0] >= 8 * tofu.both[0],
                )
            )
        if tofu.peak_mb is not None:
            checks.append(
                (
                    "peak extra memory <= 1% of logits",
                    (n, v),
                    f"{tofu.peak_mb:.1f} MiB",
                    tofu.peak_mb * 2**20 <= 0.01 * n * v * 2,
                )
            )
    out = [
        "| target | shapes | result | misses (N x V: value) | all values |",
        "|---|---|---|---|---|",
    ]
    for target in dict.fromkeys(c[0] for c in checks):
        cs = [c for c in checks if c[0] == target]
        misses = [c for c in cs if not c[3]]
        result = "PASS" if not misses else "MISS"
        miss_txt = ", ".join(f"{n}x{v}: {val}" for _, (n, v), val, _ in misses) or "-"
        values = ", ".join(f"{n}x{v}: {val}" for _, (n, v), val, _ in cs)
        out.append(
            f"| {target} | {len(cs)} | {result} ({len(cs) - len(misses)}/{len(cs)}) | {miss_txt} | {values} |"
        )
    return out


def fmt_ms(t) -> str:
    if t is None:
        return "-"
    if math.isnan(t[1]):
        return f"{t[0]:.3f} (derived)"
    return f"{t[0]:.3f} ({t[1]:.3f}-{t[2]:.3f})"


def to_markdown(rows, copy_gbs, device, args, missing, notes) -> str:
    lines = [
        f"# TOFU loss benchmark on {gpu_name()}",
        "",
        f"torch {torch.__version__}; gamma={args.gamma}, beta={args.beta}; device-to-device copy "
        f"measured in this run: {copy_gbs:.0f} GB/s.",
        "",
        "GB/s = N * V * 3 * elt / t(fwd+bwd): forward reads the logits, backward reads them and",
        "writes the gradient (6 B/element in bf16, 12 in fp32). `copy` = GB/s / copy bandwidth.",
        "Rows with the gradient made in the forward (our default for a mean, Liger) move as few as",
        "4 B/element, so their `copy` can exceed 100 %: compare their times, not their GB/s.",
        "Speedup = baseline time / our fastest backend's time on our default path (not the two-pass or",
        "vocab_parallel rows; same mode, shape and run), fwd+bwd.",
        "graph = fwd+bwd captured in a CUDA graph and replayed (the GPU's time without host launch cost);",
        "kernels = GPU kernels (incl. memsets/copies) one eager fwd+bwd launches, from torch.profiler.",
        "Peak extra = peak allocated during fwd+bwd minus inputs and the returned gradient.",
        "fwd = the training forward (autograd on, no backward), bwd = backward alone;",
        "bwd `(derived)` = fwd+bwd minus fwd, where a backward cannot be replayed alone; `n/a` where",
        "that difference is within the timing noise (fwd+bwd's 20% quantile not above fwd's 80%).",
    ]
    if device != "cuda":
        lines += [
            "",
            "**CPU smoke run: NOT a performance result** (torch backend, Triton interpreter).",
        ]
    if missing:
        lines += ["", "Not measured: " + "; ".join(missing) + "."]
    lines += [f"{n}" for n in notes if n]
    lines += [
        "",
        "| N | V | dtype | implementation | fwd ms | bwd ms | fwd+bwd ms | graph fwd+bwd ms "
        "| kernels | GB/s | copy | peak extra MiB | speedup of ours |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.error:
            lines.append(
                f"| {r.n} | {r.v} | {r.dtype} | {r.impl.name} | {r.error} | | | | | | | | |"
            )
            continue
        peak = "-" if r.peak_mb is None else f"{r.peak_mb:.1f}"
        bwd = f"n/a ({r.bwd_note})" if r.bwd_note else fmt_ms(r.bwd)
        lines.append(
            f"| {r.n} | {r.v} | {r.dtype} | {r.impl.name} | {fmt_ms(r.fwd)} | {bwd} | "
            f"{fmt_ms(r.both)} | {fmt_ms(r.graph)} | {'-' if r.kernels is None else r.kernels} | "
            f"{r.gbs():.0f} | {r.gbs() / copy_gbs:.0%} | {peak} | {r.speedup} |"
        )
    if device == "cuda":
        lines += ["", "## Targets (bf16, every shape measured)", ""] + targets(rows, copy_gbs)
    return "\n".join(lines) + "\n"


def plot(rows: list[Row], path: Path, device: str) -> str:
    """Time (fwd+bwd) vs vocab shard, one line per implementation; a panel per (N, dtype)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    panels = sorted({(r.n, r.dtype) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (n, d) in zip(axes[0], panels):
        for name in dict.fromkeys(r.impl.name for r in rows):
            pts = sorted(
                (r.v, r.both[0])
                for r in rows
                if r.n == n and r.dtype == d and r.impl.name == name and not r.error
            )
            if pts:
                ax.plot(
                    *zip(*pts), marker="o", label=name, linestyle="-" if "ours" in name else "--"
                )
        ax.set(
            xlabel="vocab shard V", ylabel="fwd+bwd ms (median)", title=f"N={n}, {d}", yscale="log"
        )
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    title = f"TOFU loss benchmark on {gpu_name()}"
    fig.suptitle(
        title + ("" if device == "cuda" else "\nCPU smoke run: NOT a performance result"),
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"plot: {path}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cpu-smoke", action="store_true", help="tiny CPU grid even if a GPU exists")
    p.add_argument("--tokens", type=int, nargs="*")
    p.add_argument("--vocab", type=int, nargs="*", help="vocab shard sizes")
    p.add_argument("--dtype", nargs="*", default=None, choices=list(DTYPES))
    p.add_argument("--gamma", type=float, default=3.0)
    p.add_argument("--beta", type=float, default=0.8)
    p.add_argument("--impl", nargs="*", help="substrings selecting implementations")
    p.add_argument("--no-compile", action="store_true", help="skip torch.compile baselines")
    p.add_argument("--reps", type=int, default=5, help="CPU timing repetitions")
    p.add_argument(
        "--time-budget",
        type=float,
        default=None,
        help="seconds; configurations not started by then are listed as skipped",
    )
    p.add_argument("--out", type=Path, default=None, help="results folder")
    args = p.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() and not args.cpu_smoke else "cpu"
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before tofu_kernels imports Triton
    if args.tokens or args.vocab or device == "cpu":
        tokens = args.tokens or (TP_TOKENS + BIG_TOKENS if device == "cuda" else CPU_TOKENS)
        vocabs = args.vocab or (TP_VOCABS + BIG_VOCABS if device == "cuda" else CPU_VOCABS)
        grid = [(n, v) for n in tokens for v in vocabs]
    else:  # the tensor-parallel shard grid, then large vocabularies
        grid = [(n, v) for n in TP_TOKENS for v in TP_VOCABS] + [
            (n, v) for n in BIG_TOKENS for v in BIG_VOCABS
        ]
    dtypes = args.dtype or ["bf16"]
    out = args.out or ROOT / "benchmarks" / "results" / ("gpu" if device == "cuda" else "cpu")
    out.mkdir(parents=True, exist_ok=True)

    tbench = make_timer(device, args.reps)
    copy_gbs = copy_bandwidth_gbs(device, tbench)
    impls, missing = make_impls(device, args)
    if args.impl:
        impls = [i for i in impls if any(s in i.name for s in args.impl)]
    notes = [check_composed_equals_ours(impls, device, DTYPES[dtypes[0]])]
    # the targets' shapes first, so a time budget never skips them
    # the headline shapes first, then the grid in order, so a time budget skips the tail
    configs = [(n, v, d) for d in dtypes for n, v in grid]
    configs.sort(
        key=lambda c: (
            not (c[0] == TARGET_TOKENS and c[1] in TARGET_VOCABS and c[2] == "bf16"),
            dtypes.index(c[2]),
        )
    )
    print(
        f"device: {gpu_name()}; copy {copy_gbs:.0f} GB/s; {len(configs)} shapes x {len(impls)} "
        f"implementations; not available: {missing or 'none'}",
        flush=True,
    )
    rows: list[Row] = []
    skipped: list[str] = []
    t_start = time.time()
    for k, (n, v, d) in enumerate(configs, 1):
        if args.time_budget is not None and time.time() - t_start > args.time_budget:
            skipped.append(f"N={n} V={v} {d}")
            continue
        for impl in impls:
            r = bench_one(impl, n, v, DTYPES[d], device, tbench)
            rows.append(r)
            status = r.error or f"fwd+bwd {r.both[0]:.3f} ms ({r.gbs():.0f} GB/s)"
            print(
                f"[{k}/{len(configs)} {time.time() - t_start:6.1f}s] N={n} V={v} {d} {impl.name}: {status}",
                flush=True,
            )
    if skipped:
        notes.append(
            f"Skipped by the {args.time_budget:.0f} s time budget: " + ", ".join(skipped) + "."
        )
    add_speedups(rows)
    md = to_markdown(rows, copy_gbs, device, args, missing, notes)
    (out / "bench_loss.md").write_text(md)
    (out / "bench_loss.json").write_text(
        json.dumps(
            {
                "gpu": gpu_name(),
                "torch": torch.__version__,
                "copy_gbs": copy_gbs,
                "rows": [
                    {
                        "impl": r.impl.name,
                        "n": r.n,
                        "v": r.v,
                        "dtype": r.dtype,
                        "fwd": r.fwd,
                        "bwd": r.bwd,
                        "both": r.both,
                        "peak_mb": r.peak_mb,
                        "error": r.error,
                    }
                    for r in rows
                ],
            },
            indent=1,
        )
    )
    print()
    print(md)
    print(plot(rows, out / "bench_loss.png", device))
    print(f"written: {out / 'bench_loss.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
