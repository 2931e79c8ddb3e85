"""PTX of one kernel, read for what a compiler decides about addresses.

Parsed per entry function: instructions (predicate, opcode, operands, source location from
``.loc``), labels and natural loops (:mod:`.cfg`; the innermost hold no other). Two
flow-insensitive analyses over the virtual registers:

- where each global load or store points: the kernel parameters its address register is
  computed from (arithmetic propagates, a load's value does not), so an access is known to
  be to the logits, to the gradient or to a per-row record;
- 32-bit integer products (``mul.lo``/``mad.lo``/``shl`` on 32 bits) whose result feeds an
  address and may overflow: a small interval analysis bounds each register (thread and
  block indices by the launch limits, constants, masks, remainders; parameters and loaded
  values are unbounded), and a product whose bound reaches 2^31 is reported with its line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from . import cfg

INF = float("inf")
_BOUND_31 = 2**31


@dataclass
class Inst:
    index: int
    pred: str | None
    op: str  # e.g. "ld.global.v4.b32"
    args: list[str]  # operands as written (vector operands keep their braces)
    loc: tuple[int, int] | None  # (file index, line) of the last .loc before it
    base: str = ""
    defs: list[str] = field(default_factory=list)  # registers written
    uses: list[str] = field(default_factory=list)  # registers read

    def __post_init__(self):
        self.base = self.op.split(".")[0]
        regs = [_regs(a) for a in self.args]
        if self.base in _NO_DEFS or not regs:
            self.uses = [r for rs in regs for r in rs]
        else:
            self.defs, self.uses = regs[0], [r for rs in regs[1:] for r in rs]


@dataclass
class Access:
    """A global load or store: its width in bits, the parameters its address comes from,
    the source line, and the innermost loop holding it (None: straight-line code)."""

    kind: str  # "ld" or "st"
    bits: int
    params: frozenset[int]
    loc: tuple[str, int] | None
    loop: int | None
    inst: Inst


@dataclass
class Product:
    """A 32-bit integer product that feeds a global address and may reach 2^31."""

    inst: Inst
    loc: tuple[str, int] | None


@dataclass
class Function:
    name: str
    params: list[str]
    insts: list[Inst] = field(default_factory=list)
    labels: dict[str, int] = field(default_factory=dict)
    files: dict[int, str] = field(default_factory=dict)
    _inner: list | None = None

    # ------------------------------------------------------------------ structure

    def successors(self, i: int) -> list[int]:
        ins = self.insts[i]
        nxt = [i + 1] if i + 1 < len(self.insts) else []
        if ins.base == "bra":
            target = self.labels.get(ins.args[-1])
            return ([target] if target is not None else []) + (nxt if ins.pred else [])
        if ins.base in ("ret", "exit", "trap"):
            return nxt if ins.pred else []
        return nxt

    def innermost_loops(self) -> list[frozenset[int]]:
        """Instruction indices of the innermost natural loops."""
        if self._inner is None:
            self._inner = cfg.innermost(cfg.natural_loops(len(self.insts), self.successors))
        return self._inner

    def source(self, ins: Inst) -> tuple[str, int] | None:
        if ins.loc is None:
            return None
        return self.files.get(ins.loc[0], "?"), ins.loc[1]

    # ------------------------------------------------------------------ analyses

    def pointer_sources(self) -> dict[str, frozenset[int]]:
        """For every register, the parameters it is computed from (through arithmetic)."""
        src: dict[str, set[int]] = {}
        pidx = {name: k for k, name in enumerate(self.params)}
        for _ in range(64):
            changed = False
            for ins in self.insts:
                defs, uses = ins.defs, ins.uses
                if not defs:
                    continue
                if ins.op.startswith("ld.param"):
                    name = re.match(r"\[\s*([\w$]+)", ins.args[1])
                    new = {pidx[name.group(1)]} if name and name.group(1) in pidx else set()
                elif ins.base in ("ld", "atom", "shfl", "call", "tex", "suld"):
                    continue  # a loaded value is data, not an address base
                else:
                    new = set().union(*(src.get(u, set()) for u in uses)) if uses else set()
                for d in defs:
                    cur = src.setdefault(d, set())
                    if not new <= cur:
                        cur |= new
                        changed = True
            if not changed:
                break
        return {k: frozenset(v) for k, v in src.items()}

    def accesses(self) -> list[Access]:
        srcs = self.pointer_sources()
        inner = self.innermost_loops()
        out = []
        for ins in self.insts:
            kind = _global_kind(ins.op)
            if kind is None:
                continue
            mem = ins.args[1] if kind == "ld" else ins.args[0]
            params = frozenset().union(*(srcs.get(r, frozenset()) for r in _regs(mem)))
            loop = next((k for k, body in enumerate(inner) if ins.index in body), None)
            out.append(Access(kind, access_bits(ins.op), params, self.source(ins), loop, ins))
        return out

    def wide_products(self) -> list[Product]:
        """32-bit products that feed a global address and whose bound reaches 2^31."""
        bound = self._bounds()
        feeds = self._feeds_address()
        out = []
        for ins in self.insts:
            if not _is_product32(ins):
                continue
            defs = ins.defs
            if defs and defs[0] in feeds and bound.get(defs[0], INF) >= _BOUND_31:
                out.append(Product(ins, self.source(ins)))
        return out

    def _feeds_address(self) -> set[str]:
        feeds: set[str] = set()
        for ins in self.insts:
            kind = _global_kind(ins.op)
            if kind is not None:
                feeds |= set(_regs(ins.args[1] if kind == "ld" else ins.args[0]))
        for _ in range(64):
            grown = False
            for ins in self.insts:
                defs, uses = ins.defs, ins.uses
                if ins.base == "ld" or not defs or not any(d in feeds for d in defs):
                    continue
                new = set(uses) - feeds
                if new:
                    feeds |= new
                    grown = True
            if not grown:
                break
        return feeds

    def _bounds(self) -> dict[str, float]:
        """An upper bound of |value| per register (INF: unknown), widened to INF where a
        loop makes it grow. ``(x / d) * d`` (a remainder's first half) is bounded by x."""
        quotient = {}  # register -> (dividend, divisor, unsigned 32-bit) of the div that defines it
        for ins in self.insts:
            if ins.base == "div" and len(ins.args) == 3:
                quotient[ins.args[0]] = (ins.args[1], ins.args[2], ".u32" in ins.op)
        bound: dict[str, float] = {}
        int_insts = [i for i in self.insts if i.defs and not _FLOAT_OP.search(i.op)]
        rounds = 0
        for rounds in range(12):
            changed = False
            for ins in int_insts:
                defs = ins.defs
                b = _eval_bound(ins, bound)
                if ins.base in ("mul", "mad") and len(ins.args) >= 3:
                    for q, d in ((ins.args[1], ins.args[2]), (ins.args[2], ins.args[1])):
                        if q in quotient and quotient[q][1] == d and ins.base == "mul":
                            x, _, unsigned = quotient[q]
                            # q * d <= x; with an unsigned 32-bit division (the compiler's
                            # fast path of a 64-bit one) the product is exact whatever x is
                            b = min(b, _BOUND_31 - 1 if unsigned else _val(x, bound))
                for d in defs:
                    old = bound.get(d)
                    new = b if old is None else max(old, b)
                    if rounds >= 8 and old is not None and new > old:
                        new = INF  # still growing: a loop counter
                    if new != old:
                        bound[d] = new
                        changed = True
            if not changed:
                break
        return bound


# ------------------------------------------------------------------ parsing

# a store or branch writes no register (a load's address register is read)
_NO_DEFS = (
    "st",
    "bra",
    "ret",
    "bar",
    "barrier",
    "membar",
    "fence",
    "red",
    "exit",
    "trap",
    "prefetch",
)
_SPECIAL = {
    "%tid": 1024,
    "%ntid": 1025,
    "%laneid": 32,
    "%warpid": 64,
    "%nwarpid": 65,
    "%ctaid.x": _BOUND_31 - 1,
    "%ctaid.y": 65536,
    "%ctaid.z": 65536,
    "%nctaid.x": _BOUND_31 - 1,
    "%nctaid.y": 65536,
    "%nctaid.z": 65536,
}
_REG = re.compile(r"%[a-zA-Z_][\w.]*")


_SPECIAL_RE = re.compile(r"%(n?tid|laneid|n?warpid|n?ctaid)(\.[xyz])?$")


def _regs(operand: str) -> list[str]:
    return [r for r in _REG.findall(operand) if not _SPECIAL_RE.match(r)]


def _special_bound(reg: str) -> float | None:
    m = _SPECIAL_RE.match(reg)
    if not m:
        return None
    name = m.group(0)
    return _SPECIAL.get(name, _SPECIAL.get(f"%{m.group(1)}"))


def _global_kind(op: str) -> str | None:
    parts = op.split(".")
    if parts[0] in ("ld", "st") and "global" in parts[1:]:
        return parts[0]
    return None


def access_bits(op: str) -> int:
    """Bits moved by one load or store: vector count x element size."""
    parts = op.split(".")
    n = 1
    for p in parts:
        if p in ("v2", "v4", "v8"):
            n = int(p[1:])
    size = 0
    for p in parts:
        m = re.fullmatch(r"[bsuf](8|16|32|64|128)", p)
        if m:
            size = int(m.group(1))
    return n * size


def _is_product32(ins: Inst) -> bool:
    parts = ins.op.split(".")
    if parts[0] in ("mul", "mad") and "lo" in parts and any(p in ("s32", "u32") for p in parts):
        return True
    return parts[0] == "shl" and "b32" in parts


_INT = re.compile(r"-?(?:0[xX][0-9a-fA-F]+|\d+)")
_FLOAT_OP = re.compile(r"\.(?:f16|f32|f64|bf16|f16x2|bf16x2)\b")


def _imm(arg: str) -> float | None:
    a = arg.strip()
    return abs(int(a, 0)) if _INT.fullmatch(a) else None


def _val(arg: str, bound: dict[str, float]) -> float:
    imm = _imm(arg)
    if imm is not None:
        return imm
    a = arg.strip()
    sp = _special_bound(a)
    if sp is not None:
        return sp
    return bound.get(a, INF) if a.startswith("%") else INF


def _eval_bound(ins: Inst, bound: dict[str, float]) -> float:
    op = ins.base
    args = ins.args[1:]
    vals = [_val(a, bound) for a in args]
    if ins.op.startswith("ld.") or op in ("atom", "call", "shfl", "tex", "vote", "activemask"):
        return INF
    if op in ("mov", "cvt", "cvta", "abs", "neg"):
        return vals[0] if vals else INF
    if op == "add":
        return sum(vals)
    if op == "mul":
        v = vals[0] * vals[1]
        if "lo" in ins.op.split(".") and "wide" not in ins.op:
            return v  # may exceed 2^31: that is what is reported
        return v
    if op == "mad":
        return vals[0] * vals[1] + vals[2]
    if op == "shl":
        s = _imm(args[1])
        return vals[0] * (2**s) if s is not None else INF
    if op in ("shr", "div"):
        s = _imm(args[1])
        if op == "shr" and s is not None:
            return vals[0] / (2**s)
        return vals[0]
    if op == "rem":
        return min(vals[0], vals[1])
    if op == "and":
        return min(vals)
    if op in ("min",):
        return min(vals)
    if op in ("max", "selp", "or", "xor"):
        if op in ("or", "xor") and all(v < INF for v in vals[:2]):
            return 2 ** max(int(v).bit_length() for v in vals[:2])
        return max(vals[:2]) if op != "selp" else max(vals[:2])
    if op == "setp" or op == "set":
        return 1
    return INF


_INST = re.compile(r"^(@!?%\w+\s+)?([a-z][\w.:]*)\s*(.*?);\s*$")


def _split_args(s: str) -> list[str]:
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        out.append(cur.strip())
    return out


def parse(text: str) -> dict[str, Function]:
    """Every ``.entry`` of a PTX module, by name."""
    files = {
        int(m.group(1)): m.group(2)
        for m in re.finditer(r'^\s*\.file\s+(\d+)\s+"([^"]+)"', text, re.M)
    }
    funcs: dict[str, Function] = {}
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"^\s*(?:\.visible\s+|\.weak\s+)?\.entry\s+([\w$]+)\s*\(", lines[i])
        if not m:
            i += 1
            continue
        fn = Function(m.group(1), [], files=files)
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(")"):
            p = re.search(r"([\w$]+)\s*,?\s*$", lines[i].split("//")[0].strip())
            if p and ".param" in lines[i]:
                fn.params.append(p.group(1))
            i += 1
        while i < len(lines) and lines[i].strip() != "{":
            i += 1
        depth, loc = 0, None
        while i < len(lines):
            raw = lines[i].split("//")[0].strip()
            i += 1
            if not raw:
                continue
            depth += raw.count("{") - raw.count("}")
            if raw == "}" and depth <= 0:
                break
            if raw.startswith(".loc"):
                lm = re.match(r"\.loc\s+(\d+)\s+(\d+)", raw)
                loc = (int(lm.group(1)), int(lm.group(2))) if lm else None
                continue
            if raw.startswith(".") or raw in ("{", "}"):
                continue
            lab = re.match(r"^([\w$]+):$", raw)
            if lab:
                fn.labels[lab.group(1)] = len(fn.insts)
                continue
            im = _INST.match(raw)
            if im:
                pred = im.group(1).strip() if im.group(1) else None
                fn.insts.append(
                    Inst(len(fn.insts), pred, im.group(2), _split_args(im.group(3)), loc)
                )
        funcs[fn.name] = fn
    return funcs
