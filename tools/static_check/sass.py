"""SASS of a cubin, read with ``cuobjdump -sass`` (the one bundled with Triton's wheel), and
the cubin's resources (``cuobjdump -res-usage``).

Per function: instructions, natural loops (:mod:`.cfg`; the innermost hold no other), and
per loop what the budgets count: ``MUFU.EX2``, global loads and stores
by width, local-memory traffic (``LDL``/``STL``), barriers and shuffles.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from . import cfg


@cache
def cuobjdump() -> str:
    """Triton's bundled cuobjdump (a CUDA toolkit may have none)."""
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.is_file():
        raise FileNotFoundError(f"cuobjdump not found at {tool}")
    return str(tool)


@dataclass
class Inst:
    addr: int
    pred: str | None
    op: str  # e.g. "LDG.E.128"
    text: str

    @property
    def base(self) -> str:
        return self.op.split(".")[0]


def global_bits(op: str) -> int:
    """Bits moved by one LDG/STG: .128 / .64 / .U16 / .S16 / .U8 / .S8, else 32."""
    parts = op.split(".")
    for p in parts[1:]:
        if p in ("128", "64"):
            return int(p)
        if p in ("U16", "S16"):
            return 16
        if p in ("U8", "S8"):
            return 8
    return 32


@dataclass
class Region:
    """Counts over a range of instructions (a loop, or a whole function)."""

    ex2: int = 0
    ldg: dict[int, int] = field(default_factory=dict)  # bits -> count
    stg: dict[int, int] = field(default_factory=dict)
    local: int = 0  # LDL + STL
    bar: int = 0
    shfl: int = 0

    def add(self, ins: Inst) -> None:
        b = ins.base
        if ins.op.startswith("MUFU.EX2"):
            self.ex2 += 1
        elif b == "LDG":
            bits = global_bits(ins.op)
            self.ldg[bits] = self.ldg.get(bits, 0) + 1
        elif b == "STG":
            bits = global_bits(ins.op)
            self.stg[bits] = self.stg.get(bits, 0) + 1
        elif b in ("LDL", "STL"):
            self.local += 1
        elif b == "BAR":
            self.bar += 1
        elif b == "SHFL":
            self.shfl += 1

    @property
    def has_global(self) -> bool:
        return bool(self.ldg or self.stg)


@dataclass
class Function:
    name: str
    insts: list[Inst]

    def successors(self, i: int) -> list[int]:
        ins = self.insts[i]
        nxt = [i + 1] if i + 1 < len(self.insts) else []
        if ins.base == "BRA":
            m = re.search(
                r"(0x[0-9a-f]+)\s*$", ins.text.split(";")[0].replace("`(", " ").rstrip(")")
            )
            target = self._index.get(int(m.group(1), 16)) if m else None
            conditional = (
                ins.pred is not None or ins.op != "BRA" or re.search(r"BRA(\.U)?\s+!?U?P", ins.text)
            )
            return ([target] if target is not None else []) + (nxt if conditional else [])
        if ins.base in ("EXIT", "RET", "BRX", "JMX", "JMP", "KILL"):
            return nxt if ins.pred is not None else []
        return nxt

    def loops(self) -> list[frozenset[int]]:
        """Instruction indices of every natural loop."""
        self._index = {ins.addr: k for k, ins in enumerate(self.insts)}
        return cfg.natural_loops(len(self.insts), self.successors)

    def innermost_loops(self) -> list[frozenset[int]]:
        return cfg.innermost(self.loops())

    def region(self, indices: frozenset[int] | None = None) -> Region:
        r = Region()
        for k, ins in enumerate(self.insts):
            if indices is None or k in indices:
                r.add(ins)
        return r


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")


def parse(text: str) -> dict[str, Function]:
    funcs: dict[str, Function] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s*:\s*(\S+)", line)
        if m:
            cur = Function(m.group(1), [])
            funcs[cur.name] = cur
            continue
        if cur is None:
            continue
        m = _LINE.search(line)
        if m:
            pred = m.group(2).strip() if m.group(2) else None
            cur.insts.append(Inst(int(m.group(1), 16), pred, m.group(3), m.group(3) + m.group(4)))
    return funcs


def disassemble(cubin: Path) -> dict[str, Function]:
    out = subprocess.run(
        [cuobjdump(), "-sass", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    return parse(out)


@dataclass
class Resources:
    registers: int
    stack: int
    shared: int
    local: int


def resources(cubin: Path) -> dict[str, Resources]:
    out = subprocess.run(
        [cuobjdump(), "-res-usage", str(cubin)], capture_output=True, text=True, check=True
    ).stdout
    res, name = {}, None
    for line in out.splitlines():
        m = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if m:
            name = m.group(1)
            continue
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", line)
        if m and name:
            res[name] = Resources(*(int(g) for g in m.groups()))
            name = None
    return res
