"""What a call costs, counted without a GPU: torch.distributed collectives, Triton kernel
launches, and every operator call (a dispatch mode that sees each tensor an operator makes).
"""

from __future__ import annotations

import contextlib
import math
from collections import Counter

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

# Every torch.distributed collective the package or Megatron could call.
COLLECTIVES = (
    "all_gather_single",
    "all_gather_into_tensor",
    "all_gather",
    "all_reduce",
    "broadcast",
    "reduce_scatter_tensor",
    "all_to_all_single",
    "barrier",
    "reduce",
)


@contextlib.contextmanager
def count_collectives():
    """Counts the calls of each torch.distributed collective (``COLLECTIVES``) made while the
    block runs, looked up through the module as the package does: a ``Counter`` by name
    (``clear()`` it between the steps counted; ``total()`` is every collective)."""
    calls: Counter[str] = Counter()
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name, fn):
        def wrapper(*a, **k):
            calls[name] += 1
            return fn(*a, **k)

        return wrapper

    for name, fn in originals.items():
        setattr(dist, name, counting(name, fn))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def gathers(calls: Counter) -> int:
    """The all-gathers among ``count_collectives``' calls, whichever function made them."""
    return sum(n for name, n in calls.items() if name.startswith("all_gather"))


_IN_LAUNCH = [0]  # > 0 while a counted Triton kernel runs: the CPU interpreter's own host copies


@contextlib.contextmanager
def count_triton_launches():
    """The Triton kernel launches of the backend while the block runs (every launch goes
    through ``triton_backend._launch``): the kernels' names, in order. Operators the CPU
    interpreter calls inside a launch are not the backend's: ``DispatchSpy`` leaves them out
    of its operator lists."""
    from tofu_kernels.backends import triton_backend

    launches: list[str] = []
    real = triton_backend._launch

    def counting(kernel):
        k = real(kernel)

        class Counted:
            def __getitem__(self, grid):
                def run(*a, **kw):
                    launches.append(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel))
                    _IN_LAUNCH[0] += 1
                    try:
                        return k[grid](*a, **kw)
                    finally:
                        _IN_LAUNCH[0] -= 1

                return run

        return Counted()

    triton_backend._launch = counting
    try:
        yield launches
    finally:
        triton_backend._launch = real


# Metadata-only operations: no kernel on any device.
FREE = {
    "empty.memory_format",
    "empty_strided.default",
    "view.default",
    "_unsafe_view.default",
    "select.int",
    "slice.Tensor",
    "as_strided.default",
    "expand.default",
    "transpose.int",
    "t.default",
    "alias.default",
    "detach.default",
    "unsqueeze.default",
    "squeeze.dim",
    "reshape.default",
    "permute.default",
}


class DispatchSpy(TorchDispatchMode):
    """Every operator call while active.

    ``shapes``: the shape of every tensor any operator returns (all of them, inside kernel
    launches too); ``largest``: the most elements of one of them. By name, the calls outside
    counted Triton launches (on a GPU a launch makes none): ``ours`` (``tofu_kernels::*``),
    ``collectives`` (``c10d::*``) and ``torch_ops`` (the rest, except metadata-only ``FREE``).
    """

    def __init__(self):
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []
        self.ours: list[str] = []
        self.collectives: list[str] = []
        self.torch_ops: list[str] = []

    @property
    def largest(self) -> int:
        return max((math.prod(s) for s in self.shapes), default=0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"{func._schema.name.split('::')[-1]}.{func._overloadname}"
        if _IN_LAUNCH[0]:
            pass
        elif func.namespace == "tofu_kernels":
            self.ours.append(func._schema.name.split("::")[-1])
        elif func.namespace == "c10d":
            self.collectives.append(name)
        elif name not in FREE:
            self.torch_ops.append(name)
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


class GemmFlops(TorchDispatchMode):
    """Counts the floating-point operations of every matrix product while active, 2 M N K
    per product: ``mm``, ``addmm``, the in-place ``addmm_`` (which torch's FlopCounterMode
    misses) and their batched forms; ``flops`` is the total. ``dim``: only the products one of
    whose sizes is ``dim`` (e.g. a model's vocabulary: its output layer's GEMMs)."""

    _PRODUCTS = {
        "mm": (0, 1),
        "addmm": (1, 2),
        "addmm_": (1, 2),
        "bmm": (0, 1),
        "baddbmm": (1, 2),
        "baddbmm_": (1, 2),
    }

    def __init__(self, dim: int | None = None):
        super().__init__()
        self.flops, self.dim = 0, dim

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        which = self._PRODUCTS.get(func.overloadpacket.__name__)
        if which is not None:
            a, b = args[which[0]], args[which[1]]
            m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
            if self.dim is None or self.dim in (m, k, n):
                self.flops += 2 * math.prod(a.shape[:-2]) * m * k * n
        return func(*args, **(kwargs or {}))


def spy_kernel_entries(monkeypatch, module) -> list[tuple]:
    """Wrap ``module``'s ``loss_of_logits`` and ``loss_of_hidden`` (the kernels' entry points
    that take a ready TOFUParams); returns the list that each call appends its
    ``(params, chunk_size)`` to."""
    seen = []

    def spy(real, at):
        def call(*args, **kwargs):
            seen.append((args[at], kwargs.get("chunk_size")))
            return real(*args, **kwargs)

        return call

    monkeypatch.setattr(module, "loss_of_logits", spy(module.loss_of_logits, 2))
    monkeypatch.setattr(module, "loss_of_hidden", spy(module.loss_of_hidden, 3))
    return seen
