"""The Triton backend: launch policy, one torch op per op of ``gpu.OPS``, the backend object.

Each op takes the arguments of its CUDA twin (the schema and the contract are ``gpu.OPS``)
and launches the kernels of ``triton_kernels.py``; its body reads the arguments by name
(``a.gamma``). As ``torch.library.triton_op``\\ s, torch.compile traces into them. Under
Triton's CPU interpreter (``TRITON_INTERPRET=1``) no compiler can lower a Triton kernel, so
there each op is an opaque ``torch.library.custom_op`` instead: a compiled graph calls it,
and its body runs the interpreter at run time (the eager result; tracing into a body whose
launches need real tensors would leave the outputs unwritten). :data:`OPS` holds what the
adaptor calls for each op: the registered op where torch.compile or fake tensors need it,
the op's body directly otherwise (in eager mode the custom-op dispatch costs tens of
microseconds per call, more than a kernel at small shard widths; benchmarks/NOTES.md).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
import triton
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.fake_tensor import is_fake
from torch.library import custom_op, triton_op, wrap_triton

from ..records import Reduced
from . import gpu
from . import triton_kernels as K

# Launch policy: the CUDA kernels' constants under their gpu.py names (module globals, so
# tests can shrink them). A 4096-wide statistics tile keeps 16 fp32 values per thread at 8
# warps without spilling (one-row-per-program kernels spill above ~32K values on Hopper).
TILE_COLS = gpu.TILE_COLS
TARGET_BLOCKS = gpu.TARGET_BLOCKS
EPILOGUE_THREADS = gpu.EPILOGUE_THREADS
RESCALE_BLOCKS = gpu.RESCALE_BLOCKS
ROW_BLOCK = 8192  # Triton's own: grad_in_forward's tile, one program (16 warps) per row


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2_block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _warps(block: int) -> int:
    return 8 if block >= 4096 else 4


def _lanes(block: int, warps: int, x: torch.Tensor, strides: tuple[int, ...]) -> dict:
    """The statistics loop's lanes: one per thread (fewer in a narrow tile), each over vectors of
    16 bytes where the rows are 16-byte aligned (the tensor's start in its storage and every row
    stride divisible by 16 elements, as Triton specializes them), else of one column
    (triton_kernels._row_slice_stats). Only the layout depends on it, never the result."""
    aligned = (x.storage_offset() * x.element_size()) % 16 == 0 and all(
        s % 16 == 0 for s in strides
    )
    vec = 16 // x.element_size() if aligned else 1
    return dict(THREADS=max(1, min(warps * 32, block // vec)), VEC=vec)


def _launch(kernel):
    """Every launch of an op body goes through here: ``wrap_triton(kernel)[grid](...)``
    (tests count the launches by wrapping this function)."""
    return wrap_triton(kernel)


# ------------------------------------------------------------------ op bodies (arguments: gpu.OPS)


def _row_stats(a) -> None:
    block = _pow2_block(a.n_valid, TILE_COLS)
    _launch(K.stats_kernel)[(a.n_rows, a.splits)](
        a.x,
        a.labels,
        a.stats,
        a.n_inner,
        a.s_outer,
        a.s_inner,
        a.n_valid,
        a.vocab_start,
        a.chunk,
        a.ignore_index,
        1.0 / a.beta,
        a.meta_vocab_end,
        a.meta_width,
        BLOCK=block,
        BETA_IS_ONE=a.beta == 1.0,
        WRITE_META=a.write_meta,
        METRICS=a.metrics,
        num_warps=_warps(block),
        **_lanes(block, _warps(block), a.x, (a.s_outer, a.s_inner, a.chunk)),
    )


def _epilogue(a) -> None:
    _launch(K.epilogue_kernel)[(1,)](
        a.parts,
        a.labels,
        a.loss,
        a.ce,
        a.rec,
        a.red,
        a.red if a.met is None else a.met,
        a.n_rows,
        a.splits,
        a.world,
        a.rank_stride,
        a.vocab_size,
        a.ignore_index,
        a.gamma,
        a.beta,
        1.0 / a.beta,
        HAS_META=a.has_meta,
        REDUCTION=a.reduction,
        GAMMA_ZERO=a.gamma == 0.0,
        BETA_IS_ONE=a.beta == 1.0,
        BLOCK_R=EPILOGUE_THREADS,
        METRICS=a.met is not None,
        num_warps=8,
        maxnreg=255,
    )  # one program: every register it can use


def _grad(a) -> None:
    width = a.x.shape[-1]
    block = _pow2_block(width, TILE_COLS)
    _launch(K.grad_kernel)[(a.labels.numel(), gpu.cdiv(width, block))](
        a.x,
        a.out,
        a.labels,
        a.rec,
        a.upstream,
        a.scale,
        a.up_stride,
        a.n_inner,
        a.xs_outer,
        a.xs_inner,
        a.os_outer,
        a.os_inner,
        a.n_valid,
        width,
        a.vocab_start,
        1.0 / a.beta,
        BLOCK=block,
        num_warps=_warps(block),
    )


def _grad_in_forward(a) -> None:
    """The count kernel writes the scale first; the row kernel reads it, the reduce kernel
    sums the per-row outputs with it."""
    n_rows, width = a.labels.numel(), a.x.shape[-1]
    scale = a.red[Reduced.SCALE :]
    _launch(K.count_kernel)[(1,)](
        a.labels, scale, n_rows, a.ignore_index, MEAN=a.mean, BLOCK_R=EPILOGUE_THREADS, num_warps=8
    )
    block = _pow2_block(width, ROW_BLOCK)
    warps = 16 if block >= 8192 else 8
    _launch(K.grad_in_forward_kernel)[(n_rows,)](
        a.x,
        a.out,
        a.labels,
        a.loss,
        a.ce,
        scale,
        a.loss if a.met is None else a.met,
        a.n_inner,
        a.xs_outer,
        a.xs_inner,
        a.os_outer,
        a.os_inner,
        width,
        a.ignore_index,
        a.gamma,
        a.beta,
        1.0 / a.beta,
        BLOCK=block,
        BETA_IS_ONE=a.beta == 1.0,
        GAMMA_ZERO=a.gamma == 0.0,
        METRICS=a.met is not None,
        num_warps=warps,
        **_lanes(block, warps, a.x, (a.xs_outer, a.xs_inner)),
    )
    _launch(K.reduce_kernel)[(1,)](
        a.loss, a.ce, scale, a.red, n_rows, BLOCK_R=EPILOGUE_THREADS, num_warps=8
    )


def _rescale(a) -> None:
    width = a.out.shape[-1]
    block = _pow2_block(width, TILE_COLS)
    tiles = gpu.cdiv(width, block)
    _launch(K.rescale_kernel)[(max(1, min(RESCALE_BLOCKS, a.n_rows * tiles)),)](
        a.out,
        a.grad_out,
        a.n_rows,
        a.n_inner,
        a.s_outer,
        a.s_inner,
        width,
        tiles,
        BLOCK=block,
        num_warps=_warps(block),
    )


_BODIES = {
    "row_stats": _row_stats,
    "epilogue": _epilogue,
    "grad": _grad,
    "grad_inplace": lambda a: _grad(gpu.in_place(a)),
    "grad_in_forward": _grad_in_forward,
    "grad_in_forward_inplace": lambda a: _grad_in_forward(gpu.in_place(a)),
    "rescale": _rescale,
}


# ------------------------------------------------------------------ registration


def _register(op: gpu.Op, body) -> Callable[..., None]:
    """``tofu_kernels::triton_<name>`` with ``op``'s schema and fake, and the function the
    adaptor calls (by keyword): a ``triton_op`` (torch.compile traces into the kernels), or
    under the interpreter an opaque ``custom_op`` whose body runs the launches as plain kernel
    calls (a compiled graph calls the eager body; see the module docstring). The registered
    op runs where torch.compile or fake tensors need it, the body directly otherwise."""

    def traced(*args, **kw) -> None:
        body(op.bind(args, kw))

    def eager(*args, **kw) -> None:
        with set_wrap_triton_enabled(False):
            body(op.bind(args, kw))

    qualname = f"tofu_kernels::triton_{op.name}"
    if interpreting():
        custom_op(qualname, eager, mutates_args=op.writes, schema=op.schema)
    else:
        triton_op(qualname, traced, mutates_args=op.writes, schema=op.schema)
    gpu.register_fake(op, qualname)
    packet = getattr(torch.ops.tofu_kernels, f"triton_{op.name}")
    first = op.args[0]

    def call(**kw) -> None:
        t = kw[first]
        if torch.compiler.is_compiling() or t.is_meta or is_fake(t):
            packet(**kw)
        else:
            eager(**kw)

    call.__name__ = op.name
    return call


OPS: dict[str, Callable[..., None]] = {
    name: _register(op, _BODIES[name]) for name, op in gpu.OPS.items()
}


class TritonBackend(gpu.GPUBackend):
    """The Triton ops behind the Backend interface: CUDA tensors, or any device's under the
    interpreter (``TRITON_INTERPRET=1`` before importing tofu_kernels)."""

    name = "triton"

    def available(self, device: torch.device) -> tuple[bool, str]:
        if device.type == "cuda" or interpreting():
            return True, ""
        return False, (
            f"the Triton backend needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
            "before importing tofu_kernels to run the kernels in Triton's CPU interpreter"
        )

    def stats_split(self, n_rows: int, n_valid: int) -> tuple[int, int]:
        """Tiles of a power of two."""
        return gpu.split_rows(n_rows, n_valid, _pow2_block(n_valid, TILE_COLS), TARGET_BLOCKS)


BACKEND = TritonBackend(OPS)
