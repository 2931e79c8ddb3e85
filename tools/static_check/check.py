"""What the compiler made of every kernel, held against the budgets of docs/design.md
section 3 ("What the compiler must make of it").

Each compiled kernel (a Triton specialization or a CUDA template instance, per target)
becomes one :class:`KernelReport`: resources (registers, spills, stack, shared memory),
and over its *streaming regions* (the innermost loops that touch global memory; the whole
kernel when no loop does) the exponentials per element, the widths of the accesses to the
logits and the gradient, local-memory traffic and block-wide synchronisation, plus the
32-bit products that feed an address. :func:`violations` lists what breaks a budget.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import ptx as P
from . import sass as S

ROOT = Path(__file__).resolve().parents[2]
DESIGN = ROOT / "docs" / "design.md"
CUDA_SOURCE = ROOT / "csrc" / "tofu_kernels.cu"

# Which arguments a streaming kernel reads and writes row by row (the rest are per-row
# records and scalars): the logits ``x`` and the gradient ``out``, in both backends.
STREAMING = {
    "stats_kernel": ("statistics", ("x",), ()),
    "row_stats_kernel": ("statistics", ("x",), ()),
    "grad_kernel": ("gradient", ("x",), ("out",)),
    "grad_in_forward_kernel": ("statistics+gradient", ("x",), ("out",)),
    "rescale_kernel": ("rescale", ("out",), ("out",)),
}
ELEMENT_BITS = {"bf16": 16, "fp16": 16, "fp32": 32, "__nv_bfloat16": 16, "__half": 16, "float": 32}


# ------------------------------------------------------------------ budgets (docs/design.md)


@dataclass(frozen=True)
class Budgets:
    ex2: dict[str, tuple[float, float]]  # pass -> (beta != 1, beta == 1) exponentials per element
    products: dict[tuple[str, str], str]  # (file name, source line) -> its bound
    local_in_loops: int
    spill_bytes: int
    stream_bits: int


def budgets(design: Path = DESIGN) -> Budgets:
    """The budget tables of docs/design.md section 3 (between their ``static-check`` marks)."""
    text = design.read_text()
    limits = {row[0].split()[0]: int(row[1]) for row in _table(text, "static-check: limits")}
    local_in_loops, spill_bytes, stream_bits = (
        limits["local-memory"],
        limits["bytes"],
        limits["bits"],
    )
    ex2 = {}
    for row in _table(text, "static-check: exponentials"):
        ex2[row[0].strip().lower()] = (float(row[2]), float(row[3]))
    products = {}
    for row in _table(text, "static-check: 32-bit products"):
        products[(row[0].strip("` "), row[1].strip("` "))] = row[2].strip()
    return Budgets(ex2, products, local_in_loops, spill_bytes, stream_bits)


def _table(text: str, mark: str) -> list[list[str]]:
    m = re.search(rf"<!-- {re.escape(mark)} -->\n(.*?)\n\n", text + "\n\n", re.S)
    if not m:
        raise ValueError(f"docs/design.md has no table marked <!-- {mark} -->")
    rows = [
        line.strip().strip("|").split("|")
        for line in m.group(1).splitlines()
        if line.startswith("|")
    ]
    return [[c.strip() for c in r] for r in rows[2:]]  # past the header and the rule


# ------------------------------------------------------------------ one compiled kernel


@dataclass
class Region:
    """An innermost loop touching global memory (or the whole kernel), in SASS."""

    pass_: str  # statistics | gradient | rescale
    ex2: int
    elements: float  # logits elements per iteration (stored where it stores, else loaded)
    ex2_per_element: float
    loads: dict[int, int]  # bits -> LDG count
    stores: dict[int, int]
    local: int
    bar: int
    shfl: int


@dataclass
class KernelReport:
    backend: str
    arch: int
    kernel: str  # family: "stats_kernel", "row_stats_kernel", ...
    spec: str  # the specialization: "bf16 BETA_IS_ONE=0 ..." / "<__nv_bfloat16, false, true>"
    aligned: bool  # 16-byte-aligned rows (the 128-bit budget applies)
    beta_one: bool
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int
    regions: list[Region] = field(default_factory=list)
    local_in_loops: int = 0
    streamed: list[dict] = field(
        default_factory=list
    )  # PTX accesses to x / out in the streaming regions
    sass_128: int = 0
    ptx_128: int = 0
    products: list[dict] = field(
        default_factory=list
    )  # unbounded 32-bit products feeding an address
    cases: list[str] = field(default_factory=list)

    @property
    def streaming(self) -> bool:
        return self.kernel in STREAMING

    def to_json(self) -> dict:
        return asdict(self)


def analyse(
    backend: str,
    arch: int,
    kernel: str,
    spec: str,
    aligned: bool,
    beta_one: bool,
    elem_bits: int,
    param_names: list[str],
    ptx_fn: P.Function,
    sass_fn: S.Function,
    res: S.Resources,
    spills: tuple[int, int],
    cases: list[str] | None = None,
) -> KernelReport:
    r = KernelReport(
        backend,
        arch,
        kernel,
        spec,
        aligned,
        beta_one,
        res.registers,
        spills[0],
        spills[1],
        res.stack,
        res.shared,
        cases=sorted(set(cases or [])),
    )
    r.local_in_loops = sum(sass_fn.region(body).local for body in sass_fn.loops())
    accesses = ptx_fn.accesses()
    r.ptx_128 = sum(1 for a in accesses if a.bits == 128)
    r.sass_128 = sum(
        n
        for reg in [sass_fn.region()]
        for d in (reg.ldg, reg.stg)
        for b, n in d.items()
        if b == 128
    )
    for prod in ptx_fn.wide_products():
        file, line = prod.loc if prod.loc else ("?", 0)
        r.products.append(
            {
                "file": Path(file).name,
                "line": line,
                "text": source_line(file, line),
                "inst": f"{prod.inst.op} {', '.join(prod.inst.args)}",
            }
        )
    if not r.streaming:
        return r
    pass_, loads, stores = STREAMING[kernel]
    index = {n.lower(): k for k, n in enumerate(param_names)}
    load_idx = {index[n] for n in loads}
    store_idx = {index[n] for n in stores}
    streamed = [
        a
        for a in accesses
        if (a.kind == "ld" and a.params & load_idx) or (a.kind == "st" and a.params & store_idx)
    ]
    in_loops = [a for a in streamed if a.loop is not None]
    for a in in_loops or streamed:
        file, line = a.loc if a.loc else ("?", 0)
        r.streamed.append(
            {"kind": a.kind, "bits": a.bits, "file": Path(file).name, "line": line, "loop": a.loop}
        )
    spans = [body for body in sass_fn.innermost_loops() if sass_fn.region(body).has_global]
    for body in spans or [None]:
        reg = sass_fn.region(body)
        stores_here = bool(reg.stg)
        kind = "rescale" if pass_ == "rescale" else ("gradient" if stores_here else "statistics")
        bits = sum(b * n for b, n in (reg.stg if stores_here else reg.ldg).items())
        elements = bits / elem_bits
        r.regions.append(
            Region(
                kind,
                reg.ex2,
                elements,
                reg.ex2 / elements if elements else 0.0,
                reg.ldg,
                reg.stg,
                reg.local,
                reg.bar,
                reg.shfl,
            )
        )
    return r


def source_line(file: str, line: int) -> str:
    try:
        return Path(file).read_text().splitlines()[line - 1].strip() if line > 0 else ""
    except (OSError, IndexError):
        return ""


# ------------------------------------------------------------------ budgets held


RULES = ("spills", "local memory", "ptxas vectors", "32-bit products", "128-bit", "exponentials")


def violations(r: KernelReport, b: Budgets) -> list[str]:
    """What ``r`` breaks, one line each, ``"<rule>: <kernel>: <what>"`` (rule: one of
    :data:`RULES`; empty: within every budget)."""
    where = f"{r.backend} sm_{r.arch} {r.kernel} {r.spec}"
    out = []
    if r.spill_stores > b.spill_bytes or r.spill_loads > b.spill_bytes:
        out.append(
            f"spills: {where}: spills {r.spill_stores} B stored / {r.spill_loads} B loaded (budget {b.spill_bytes})"
        )
    if r.local_in_loops > b.local_in_loops:
        out.append(
            f"local memory: {where}: {r.local_in_loops} local-memory instructions (LDL/STL) inside loops"
        )
    if r.sass_128 < r.ptx_128:
        out.append(
            f"ptxas vectors: {where}: ptxas split 128-bit accesses ({r.ptx_128} in PTX, {r.sass_128} in SASS)"
        )
    for p in r.products:
        if (p["file"], p["text"]) not in b.products:
            out.append(
                f"32-bit products: {where}: unlisted 32-bit product feeding an address at {p['file']}:{p['line']} "
                f"`{p['text']}` ({p['inst']})"
            )
    if not r.streaming:
        return list(dict.fromkeys(out))
    if r.aligned:
        narrow: dict[tuple, int] = {}
        for a in r.streamed:
            if a["bits"] < b.stream_bits:
                key = (a["kind"], a["bits"], a["file"], a["line"], a["loop"] is not None)
                narrow[key] = narrow.get(key, 0) + 1
        for (kind, bits, file, line, in_loop), n in narrow.items():
            what = "load(s) of the logits" if kind == "ld" else "store(s) of the gradient"
            out.append(
                f"128-bit: {where}: {n} {bits}-bit {what} at {file}:{line} in a streaming "
                f"{'loop' if in_loop else 'kernel'} (16-byte-aligned rows: budget {b.stream_bits} bits)"
            )
    for reg in r.regions:
        limit = b.ex2[reg.pass_][1 if r.beta_one else 0]
        if reg.ex2_per_element > limit + 1e-9:
            out.append(
                f"exponentials: {where}: {reg.ex2_per_element:.3f} EX2 per element in a {reg.pass_} loop "
                f"({reg.ex2} per {reg.elements:g} elements; budget {limit:g})"
            )
    return list(dict.fromkeys(out))
