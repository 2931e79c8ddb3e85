"""The Triton kernels as torch ops: launch policy, one ``triton_op`` per op, their fakes.

Each op takes the arguments of its CUDA twin (``csrc/tofu_ops.cpp``; the contract and the
fakes are in ``gpu.py``) and launches the kernels of ``triton_kernels.py``. As
``torch.library.triton_op``\\ s, torch.compile traces into them. Under Triton's CPU
interpreter (``TRITON_INTERPRET=1``) no compiler can lower a Triton kernel, so there each op
is an opaque ``torch.library.custom_op`` instead: a compiled graph calls it, and its body
runs the interpreter at run time (the eager result; tracing into a body whose launches need
real tensors would leave the outputs unwritten). The functions named after the ops
(``row_stats`` ... ``rescale``) are what the adaptor calls: the registered op where
torch.compile or fake tensors need it, the op's body directly otherwise (in eager mode the
custom-op dispatch costs tens of microseconds per call, more than a kernel at small shard
widths; benchmarks/NOTES.md).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from torch._library.triton import set_wrap_triton_enabled
from torch._subclasses.fake_tensor import is_fake
from torch.library import custom_op, triton_op, wrap_triton

from ..records import Reduced
from . import gpu
from . import triton_kernels as K

# Launch policy. The tiles, the program target, the rows per iteration of the one-program
# kernels and the rescale grid are the CUDA kernels' (gpu.py, from csrc/tofu_kernels.h): a
# 4096-wide statistics tile keeps 16 fp32 values per thread at 8 warps in flight for the
# online max and two sums without spilling (one-row-per-program kernels spill above ~32K
# values per program on Hopper); the gradient has no loop-carried state: a 2-D grid of tiles.
FWD_BLOCK = gpu.TILE_COLS
BWD_BLOCK = gpu.TILE_COLS
TARGET_PROGRAMS = gpu.TARGET_BLOCKS
EPILOGUE_ROWS = gpu.EPILOGUE_THREADS
RESCALE_PROGRAMS = gpu.RESCALE_BLOCKS
FUSED_BLOCK = 8192  # Triton's own: the fused kernel's tile, one program (16 warps) per row


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _pow2_block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _warps(block: int) -> int:
    return 8 if block >= 4096 else 4


def stats_split(n_rows: int, n_valid: int) -> tuple[int, int]:
    """(programs per row, columns per program) of ``row_stats``: tiles of a power of two."""
    return gpu.split_rows(n_rows, n_valid, _pow2_block(n_valid, FWD_BLOCK), TARGET_PROGRAMS)


def _launch(kernel):
    """Every launch of an op body goes through here: ``wrap_triton(kernel)[grid](...)``
    (tests count the launches by wrapping this function)."""
    return wrap_triton(kernel)


# ------------------------------------------------------------------ op bodies (schemas: csrc/tofu_ops.cpp)


def _row_stats(x: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor, n_rows: int, splits: int, n_inner: int,
               s_outer: int, s_inner: int, n_valid: int, vocab_start: int, chunk: int, ignore_index: int, beta: float,
               write_meta: bool, meta_vocab_end: int, meta_width: int, write_ent: bool) -> None:
    block = _pow2_block(n_valid, FWD_BLOCK)
    _launch(K.stats_kernel)[(n_rows, splits)](
        x, labels, stats, n_inner, s_outer, s_inner, n_valid, vocab_start, chunk, ignore_index, 1.0 / beta,
        meta_vocab_end, meta_width, BLOCK=block, BETA_IS_ONE=beta == 1.0, WRITE_META=write_meta, WRITE_ENT=write_ent,
        num_warps=_warps(block))


def _epilogue(parts: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, ce: torch.Tensor, rec: torch.Tensor,
              red: torch.Tensor, met: torch.Tensor | None, n_rows: int, splits: int, world: int, rank_stride: int,
              has_meta: bool, vocab_size: int, ignore_index: int, gamma: float, beta: float, reduction: int) -> None:
    _launch(K.epilogue_kernel)[(1,)](
        parts, labels, loss, ce, rec, red, red if met is None else met, n_rows, splits, world, rank_stride,
        vocab_size, ignore_index, gamma, beta, 1.0 / beta, HAS_META=has_meta, REDUCTION=reduction,
        GAMMA_ZERO=gamma == 0.0, BETA_IS_ONE=beta == 1.0, BLOCK_R=EPILOGUE_ROWS, HAS_ENT=met is not None, num_warps=8)


def _grad(x: torch.Tensor, out: torch.Tensor, labels: torch.Tensor, rec: torch.Tensor, upstream: torch.Tensor,
          scale: torch.Tensor, up_stride: int, n_inner: int, xs_outer: int, xs_inner: int, os_outer: int,
          os_inner: int, n_valid: int, vocab_start: int, beta: float) -> None:
    width = x.shape[-1]
    block = _pow2_block(width, BWD_BLOCK)
    _launch(K.grad_kernel)[(labels.numel(), gpu.cdiv(width, block))](
        x, out, labels, rec, upstream, scale, up_stride, n_inner, xs_outer, xs_inner, os_outer, os_inner,
        n_valid, width, vocab_start, 1.0 / beta, BLOCK=block, num_warps=_warps(block))


def _grad_inplace(x: torch.Tensor, labels: torch.Tensor, rec: torch.Tensor, upstream: torch.Tensor,
                  scale: torch.Tensor, up_stride: int, n_inner: int, s_outer: int, s_inner: int, n_valid: int,
                  vocab_start: int, beta: float) -> None:
    _grad(x, x, labels, rec, upstream, scale, up_stride, n_inner, s_outer, s_inner, s_outer, s_inner, n_valid,
          vocab_start, beta)


def _fused(x: torch.Tensor, out: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, ce: torch.Tensor,
           red: torch.Tensor, met: torch.Tensor | None, n_inner: int, xs_outer: int, xs_inner: int, os_outer: int,
           os_inner: int, ignore_index: int, gamma: float, beta: float, mean: bool) -> None:
    """The count kernel writes the scale first; the fused kernel reads it, the reduce kernel
    sums the per-row outputs with it."""
    n_rows, width = labels.numel(), x.shape[-1]
    scale = red[Reduced.SCALE:]
    _launch(K.count_kernel)[(1,)](labels, scale, n_rows, ignore_index, MEAN=mean, BLOCK_R=EPILOGUE_ROWS, num_warps=8)
    block = _pow2_block(width, FUSED_BLOCK)
    _launch(K.fused_kernel)[(n_rows,)](
        x, out, labels, loss, ce, scale, loss if met is None else met, n_inner, xs_outer, xs_inner, os_outer,
        os_inner, width, width, ignore_index, gamma, beta, 1.0 / beta, BLOCK=block, BETA_IS_ONE=beta == 1.0,
        GAMMA_ZERO=gamma == 0.0, ENT=met is not None, num_warps=16 if block >= 8192 else 8)
    _launch(K.reduce_kernel)[(1,)](loss, ce, scale, red, n_rows, BLOCK_R=EPILOGUE_ROWS, num_warps=8)


def _fused_inplace(x: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, ce: torch.Tensor, red: torch.Tensor,
                   met: torch.Tensor | None, n_inner: int, s_outer: int, s_inner: int, ignore_index: int, gamma: float,
                   beta: float, mean: bool) -> None:
    _fused(x, x, labels, loss, ce, red, met, n_inner, s_outer, s_inner, s_outer, s_inner, ignore_index, gamma, beta,
           mean)


def _rescale(out: torch.Tensor, grad_out: torch.Tensor, n_rows: int, n_inner: int, s_outer: int,
             s_inner: int) -> None:
    width = out.shape[-1]
    block = _pow2_block(width, BWD_BLOCK)
    tiles = gpu.cdiv(width, block)
    _launch(K.rescale_kernel)[(max(1, min(RESCALE_PROGRAMS, n_rows * tiles)),)](
        out, grad_out, n_rows, n_inner, s_outer, s_inner, width, tiles, BLOCK=block, num_warps=_warps(block))


# ------------------------------------------------------------------ registration


def _eager(body):
    """``body`` with its launches run as plain kernel calls (no tracing wrapper), keeping its
    signature (``custom_op`` reads the schema from the annotations): what the adaptor runs in
    eager mode, and the opaque op's body under the interpreter."""

    @functools.wraps(body)
    def run(*args) -> None:
        with set_wrap_triton_enabled(False):
            body(*args)

    return run


def _register(name: str, body, mutates: set[str]):
    """``tofu_kernels::triton_<name>`` with its fake, and the function the adaptor calls: a
    ``triton_op`` (torch.compile traces into the kernels), or under the interpreter an opaque
    ``custom_op`` (a compiled graph calls the eager body; see the module docstring)."""
    eager = _eager(body)
    if interpreting():
        op = custom_op(f"tofu_kernels::triton_{name}", eager, mutates_args=mutates)
    else:
        op = triton_op(f"tofu_kernels::triton_{name}", body, mutates_args=mutates)
    op.register_fake(gpu.FAKES[name])
    packet = getattr(torch.ops.tofu_kernels, f"triton_{name}")

    def call(*args) -> None:
        t = args[0]
        if torch.compiler.is_compiling() or t.is_meta or is_fake(t):
            packet(*args)
        else:
            eager(*args)

    call.__name__ = name
    return call


row_stats = _register("row_stats", _row_stats, {"stats"})
epilogue = _register("epilogue", _epilogue, {"loss", "ce", "rec", "red", "met"})
grad = _register("grad", _grad, {"out"})
grad_inplace = _register("grad_inplace", _grad_inplace, {"x"})
fused = _register("fused", _fused, {"out", "loss", "ce", "red", "met"})
fused_inplace = _register("fused_inplace", _fused_inplace, {"x", "loss", "ce", "red", "met"})
rescale = _register("rescale", _rescale, {"out"})
