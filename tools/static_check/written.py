"""Which tensors each Triton op writes, by Inductor's own analysis of the kernels it
launches (``identify_accessed_tensors``: the TTIR's stores traced back to arguments; it
needs an active driver, here the stand-in), held against the op's schema: the ``(a!)``
arguments of ``gpu.OPS`` must be exactly the tensors its kernels store to. Where the
analysis fails, Inductor assumes every input is written; that is reported, not passed."""

from __future__ import annotations

import logging

import torch
from torch._higher_order_ops.triton_kernel_wrap import identify_accessed_tensors

from tofu_kernels.backends import gpu

from .triton_aot import Launch

_LOG = "torch._higher_order_ops.triton_kernel_wrap"


class _Failures(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _storage(t) -> int | None:
    return t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) else None


def kernel_writes(ln: Launch) -> set[str]:
    """The kernel arguments (by name) the launch's kernel stores to, by Inductor's analysis."""
    kwargs = {k: v for k, v in ln.bound().items() if k in ln.kernel.arg_names}
    handler = _Failures()
    logger = logging.getLogger(_LOG)
    logger.addHandler(handler)
    try:
        acc = identify_accessed_tensors(ln.kernel, kwargs, {})
    finally:
        logger.removeHandler(handler)
    if handler.messages:
        raise RuntimeError(
            f"Inductor's analysis of {ln.kernel.fn.__name__} failed: {handler.messages[0]}"
        )
    return {dep.name for dep in acc.read_writes.writes}


def compare(launches: list[Launch]) -> list[dict]:
    """Per op call: the arguments its kernels write (kernel arguments mapped to the op's
    by storage), and those its schema marks written (an optional output passed as None
    left out)."""
    calls: dict[int, dict] = {}
    cache: dict[tuple, set[str]] = {}
    for ln in launches:
        e = calls.setdefault(
            id(ln.op_args), {"op": ln.op, "case": ln.case, "args": ln.op_args, "written": set()}
        )
        bound = ln.bound()
        key = (
            ln.kernel.fn.__name__,
            tuple(
                sorted(
                    (k, repr(v))
                    for k, v in bound.items()
                    if k.isupper() and not isinstance(v, torch.Tensor)
                )
            ),
        )
        if key not in cache:
            cache[key] = kernel_writes(ln)
        by_storage = {}
        for name, value in ln.op_args.items():
            if isinstance(value, torch.Tensor):
                by_storage.setdefault(_storage(value), name)
        e["written"] |= {by_storage.get(_storage(bound[k]), f"?{k}") for k in cache[key]}
    out = []
    for e in calls.values():
        schema = {n for n in gpu.OPS[e["op"]].writes if e["args"].get(n) is not None}
        out.append(
            {
                "op": e["op"],
                "case": e["case"],
                "written": sorted(e["written"]),
                "schema": sorted(schema),
            }
        )
    return out
