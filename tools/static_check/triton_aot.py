"""The Triton kernels compiled for a GPU without one: the launches the backend's own op
bodies make at real shapes, recorded, then compiled ahead of time for each target.

- :class:`StandInDriver` is an active Triton driver that only names a target (device 0,
  stream 0): with it, ``JITFunction.warmup`` runs Triton's whole pipeline (ttir, ttgir,
  llir, ptx, ptxas) for that GPU, and Inductor's analysis of which tensors a kernel
  writes (which needs an active driver) runs too.
- :func:`record` calls the Triton backend's methods (the adaptor and op bodies the core
  calls) for each :class:`Case`, with a recorder in place of the launch: it keeps the
  kernel, grid, arguments and the op that launched it. The tensors are CPU views of one
  element with the real shapes, strides and alignment, never read.
- :func:`compile_all` compiles every recorded launch for one target; the JIT cache keeps
  one compile per distinct specialization (dtypes, constexprs, integer and alignment
  specializations), which is what :func:`compile_all` returns with its ptxas log.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import dataclass, field

import torch

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    raise RuntimeError("the static check compiles real Triton kernels: unset TRITON_INTERPRET")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.driver import DriverBase  # noqa: E402
from triton.runtime import driver as _driver  # noqa: E402

from tofu_kernels.backends import gpu, triton_backend  # noqa: E402
from tofu_kernels.backends import triton_kernels as K  # noqa: E402
from tofu_kernels.layout import Shard, dense_layout, row_layout  # noqa: E402
from tofu_kernels.linear import default_chunk_size  # noqa: E402
from tofu_kernels.params import TOFUParams  # noqa: E402
from tofu_kernels.records import Reduction  # noqa: E402


class StandInDriver(DriverBase):
    """An active driver that names a CUDA target and nothing else (nothing launches)."""

    def __init__(self, arch: int):
        self.arch = arch

    @classmethod
    def is_active(cls) -> bool:
        return True

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", self.arch, 32)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def get_benchmarker(self):
        raise RuntimeError("the stand-in driver launches nothing")

    def map_python_to_cpp_type(self, ty: str) -> str:
        raise RuntimeError("the stand-in driver launches nothing")


def kernels(module=K) -> list[triton.runtime.jit.JITFunction]:
    return [v for v in vars(module).values() if isinstance(v, triton.runtime.jit.JITFunction)]


def use_target(arch: int, module=K) -> None:
    """Make ``arch`` (e.g. 90) the active target; forget kernels compiled for another."""
    _driver.set_active(StandInDriver(arch))
    for k in kernels(module):
        k.device_caches.clear()


# ------------------------------------------------------------------ the launches


@dataclass(frozen=True)
class Case:
    """One call of the backend as an entry point makes it."""

    label: str
    dtype: torch.dtype
    shape: tuple[int, ...]  # logits as the entry point sees them
    strides: tuple[int, ...] | None = None  # None: contiguous
    path: str = "two_pass"  # or "grad_in_forward"
    params: TOFUParams = TOFUParams()
    world: int = 1  # tensor-parallel ranks (two-pass only)
    upstream: str = "per_row"  # "per_row" or "scalar" (two-pass backward)
    inplace: bool = False
    chunk: int | None = None  # fused linear: rows per logits chunk (default_chunk_size)


@dataclass
class Launch:
    op: str  # the op whose body launched it
    op_args: dict  # that op's arguments by name
    kernel: triton.runtime.jit.JITFunction
    grid: tuple
    args: tuple
    kwargs: dict
    case: str

    def bound(self) -> dict:
        """The kernel's arguments by name (constexprs and launch options included)."""
        out = dict(zip(self.kernel.arg_names, self.args))
        out.update(self.kwargs)
        return out


def stand_in(shape, dtype, strides=None, offset_bytes=0) -> torch.Tensor:
    """A CPU tensor with ``shape`` (and, for the record, ``strides``) over one element: what
    a launch needs of it is its address's alignment, dtype and shape."""
    base = torch.empty(16 // torch.empty(0, dtype=dtype).element_size() + 1, dtype=dtype)
    elem = base.element_size()
    start = offset_bytes // elem
    return base[start:].as_strided(shape, (0,) * len(shape))


def cases() -> list[Case]:
    """The calls the entry points make, at the design's shapes (docs/design.md section 6):
    tofu_loss's two paths, Megatron's vocab-parallel shards in its [s, b, v] layout, the
    fused linear loss's logits chunks; every dtype, beta = 1 and not, gamma = 0 and not,
    metrics on and off, aligned and unaligned widths, one row and few rows."""
    out = []
    paper, ce = TOFUParams(), TOFUParams(gamma=0.0, beta=1.0)
    none = TOFUParams(reduction="none")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        d = str(dtype).split(".")[-1]
        for width in (16032, 128256, 256000, 16033):
            n = 16384 if width <= 16033 else 4096
            out.append(
                Case(f"tofu_loss mean {d} {n}x{width}", dtype, (n, width), path="grad_in_forward")
            )
            out.append(Case(f"tofu_loss none {d} {n}x{width}", dtype, (n, width), params=none))
        out.append(
            Case(f"tofu_loss mean ce {d}", dtype, (4096, 32064), path="grad_in_forward", params=ce)
        )
        out.append(
            Case(
                f"tofu_loss none ce {d}",
                dtype,
                (4096, 32064),
                params=TOFUParams(gamma=0.0, beta=1.0, reduction="none"),
            )
        )
        out.append(
            Case(
                f"tofu_loss none metrics {d}",
                dtype,
                (4096, 32064),
                params=TOFUParams(reduction="none", return_metrics=True),
            )
        )
        out.append(
            Case(
                f"tofu_loss mean metrics {d}",
                dtype,
                (4096, 32064),
                path="grad_in_forward",
                params=TOFUParams(return_metrics=True),
            )
        )
    bf16 = torch.bfloat16
    out.append(
        Case(
            "tofu_loss sum scalar upstream bf16",
            bf16,
            (4096, 64128),
            params=TOFUParams(reduction="sum"),
            upstream="scalar",
            inplace=True,
        )
    )
    out.append(Case("one row bf16", bf16, (1, 151936), path="grad_in_forward"))
    out.append(Case("one row two-pass bf16", bf16, (1, 151936), params=none))
    out.append(Case("few rows (split) bf16", bf16, (48, 151936), params=none))
    # Megatron: logits [s, b, v/tp] seen as [b, s, v/tp]; per-token upstream, gradient in place
    megatron = TOFUParams(reduction="none", inplace_backward=True, return_ce=True)
    for vocab, tp in ((128256, 8), (151936, 8), (256000, 8), (128256, 2), (50257, 1)):
        s, b, v = 4096, 2, -(-vocab // tp)
        for dtype in (bf16, torch.float32):
            d = str(dtype).split(".")[-1]
            out.append(
                Case(
                    f"megatron tp{tp} {d} v{vocab}",
                    dtype,
                    (b, s, v),
                    strides=(v, b * v, 1),
                    params=megatron,
                    world=tp,
                    inplace=True,
                )
            )
    out.append(
        Case(
            "megatron tp8 metrics bf16",
            bf16,
            (2, 4096, 16032),
            strides=(16032, 2 * 16032, 1),
            params=TOFUParams(reduction="none", inplace_backward=True, return_metrics=True),
            world=8,
            inplace=True,
        )
    )
    # fused linear: logits chunks [C, V] (default_chunk_size), gradient in place
    for vocab, tp in ((128256, 1), (151936, 1), (128256, 8)):
        v = vocab // tp
        c = default_chunk_size(8192, v, 2)
        path = "grad_in_forward" if tp == 1 else "two_pass"
        params = paper if tp == 1 else TOFUParams(reduction="none")
        out.append(
            Case(
                f"linear chunk {c}x{v} tp{tp} bf16",
                bf16,
                (c, v),
                path=path,
                params=params,
                world=tp,
                inplace=True,
                chunk=c,
            )
        )
        out.append(
            Case(
                f"linear chunk {c}x{v} tp{tp} bf16 last",
                bf16,
                (8192 % c or c, v),
                path=path,
                params=params,
                world=tp,
                inplace=True,
                chunk=c,
            )
        )
    return out


class _Recorder:
    def __init__(self, sink: list, kernel, state: dict):
        self.sink, self.kernel, self.state = sink, kernel, state

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.sink.append(
                Launch(
                    self.state["op"],
                    self.state["args"],
                    self.kernel,
                    tuple(grid),
                    args,
                    kwargs,
                    self.state["case"],
                )
            )

        return launch


def record(selected: list[Case] | None = None, module=K) -> list[Launch]:
    """Every launch the Triton backend makes for the cases (``module``: the kernels' module,
    a mutated copy in the check's self-test)."""
    sink: list[Launch] = []
    state = {"op": None, "args": None, "case": None}

    def spy(name, call):
        def run(**kw):
            state["op"], state["args"] = name, kw
            call(**kw)

        return run

    backend = triton_backend.TritonBackend(
        {name: spy(name, call) for name, call in triton_backend.OPS.items()}
    )
    saved_launch, saved_k = triton_backend._launch, triton_backend.K
    triton_backend._launch = lambda kernel: _Recorder(sink, kernel, state)
    triton_backend.K = module
    try:
        for case in cases() if selected is None else selected:
            state["case"] = case.label
            _run_case(backend, case)
    finally:
        triton_backend._launch, triton_backend.K = saved_launch, saved_k
    return sink


def _run_case(backend: gpu.GPUBackend, c: Case) -> None:
    meta = torch.empty(c.shape, dtype=c.dtype, device="meta")
    if c.strides is not None:
        meta = meta.as_strided(c.shape, c.strides)
    _, lay = row_layout(meta)
    x = stand_in(c.shape, c.dtype)
    n = lay.n_rows
    labels = torch.empty(n, dtype=torch.int64)
    width = lay.width
    if c.inplace:
        out, out_lay = x, lay
    else:
        out, out_lay = stand_in(c.shape, c.dtype), dense_layout(lay)
    p = c.params
    if c.path == "grad_in_forward":
        red = Reduction[p.reduction.upper()]
        epi = backend.grad_in_forward(x, lay, out, out_lay, labels, p, red)
        backend.rescale(out, out_lay, torch.empty(1))
        return
    tp = c.world > 1
    shard = Shard(
        (c.world - 1) * width if tp else 0, width - (7 if tp and width % 8 else 0) if tp else width
    )
    parts = backend.row_stats(x, lay, labels, shard, p, tp)
    if tp:
        stride = parts.data.numel()
        parts = parts._replace(
            data=torch.empty(c.world * stride), world=c.world, rank_stride=stride
        )
    red = Reduction[p.reduction.upper()]
    epi = backend.epilogue(parts, labels, p, None if tp else shard.vocab_end, red)
    upstream = torch.empty(n) if c.upstream == "per_row" else torch.empty(())
    backend.grad(x, lay, out, out_lay, labels, epi.grad_rec, upstream, epi.scale, shard, p)


# ------------------------------------------------------------------ compiling


@dataclass
class Compiled:
    """One distinct compiled kernel for one target."""

    name: str  # e.g. "stats_kernel"
    key: str  # Triton's hash of the specialization
    signature: dict  # argument name -> Triton type ("*bf16", "i32", "constexpr", ...)
    constants: dict  # constexpr arguments
    num_warps: int
    ptx: str
    cubin: bytes
    ptxas_log: str
    attrs: dict = field(default_factory=dict)  # (argument index,) -> Triton's specializations
    shared: int = 0  # bytes of (dynamic) shared memory
    cases: list[str] = field(default_factory=list)
    ops: set[str] = field(default_factory=set)

    @property
    def spec(self) -> str:
        """A short name of the specialization: the logits' dtype (else the first pointer's),
        the constexprs (``n_rows=1``: an integer argument Triton specialized as 1)."""
        ptrs = {n: t[1:] for n, t in self.signature.items() if t.startswith("*")}
        dtype = ptrs.get("X", ptrs.get("OUT", next(iter(ptrs.values()), "")))
        consts = " ".join(
            f"{k}={int(v) if isinstance(v, bool) else v}"
            for k, v in sorted(self.constants.items())
            if k not in ("BLOCK", "BLOCK_R")
        )
        return f"{dtype}" + (f" {consts}" if consts else "")


def compile_all(launches: list[Launch], arch: int, module=K) -> list[Compiled]:
    """Compile every launch for ``arch``; one :class:`Compiled` per distinct kernel."""
    use_target(arch, module)
    triton.knobs.nvidia.dump_ptxas_log = True
    seen: dict[str, Compiled] = {}
    try:
        for ln in launches:
            log = io.StringIO()
            with contextlib.redirect_stdout(log):
                ck = ln.kernel.warmup(*ln.args, grid=ln.grid, **ln.kwargs)
            key = ck.hash
            if key not in seen:
                src = ck.src if hasattr(ck, "src") else None
                sig = dict(getattr(src, "signature", {}) or {})
                consts = {
                    k if isinstance(k, str) else ln.kernel.arg_names[k[0]]: v
                    for k, v in (getattr(src, "constants", {}) or {}).items()
                }
                seen[key] = Compiled(
                    ck.metadata.name,
                    key,
                    sig,
                    consts,
                    ck.metadata.num_warps,
                    ck.asm["ptx"],
                    ck.asm["cubin"],
                    log.getvalue(),
                    dict(getattr(src, "attrs", {}) or {}),
                    ck.metadata.shared,
                )
            seen[key].cases.append(ln.case)
            seen[key].ops.add(ln.op)
    finally:
        triton.knobs.nvidia.dump_ptxas_log = False
    return list(seen.values())


def ptxas_spills(log: str) -> tuple[int, int]:
    """(spill store bytes, spill load bytes) from a ptxas -v log."""
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)
