"""Triton backend: the statistics forward and the fused gradient backward.

Forward (``_stats_kernel``): grid (rows, splits). Each program streams its slice of one
row once in BLOCK-wide tiles with an online max, keeping two running sums in fp32
(S1 at temperature 1 and Sb at temperature beta: 2 exponentials per element, 1 when
beta == 1), and loads the target logit with one scalar load. Splitting a row over
several programs keeps the GPU busy when rows are few; the partial statistics are
merged by the same ``combine_stats`` that merges vocab-parallel ranks.

Backward (``_grad_kernel``): grid (rows, tiles). One read of the logits, one write of
the gradient ``coef * (q_j - [j == t])`` with ``coef = upstream * g`` folded in fp32
before the cast; the target column takes the precomputed ``q_t - 1 = expm1(log q_t)``.
Rows whose coef is 0 (ignored or loss-masked tokens) write zeros without reading.

Bytes: forward reads N*V*elt, backward reads and writes N*V*elt: 6 B/element in bf16.
Row offsets are int64; rows may be strided (two strides, see ``RowLayout``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._inputs import RowLayout, Shard
from ..tofu_math import GradParam, Stat
from ._common import finalize_in_torch as finalize  # noqa: F401  (Backend.finalize)
from ._common import merge_splits, num_splits, split_chunk

NAME = "triton"

# Record fields (tofu_math.Stat, tofu_math.GradParam) as compile-time constants.
_ST_M, _ST_S1, _ST_SB, _ST_ZT = (tl.constexpr(int(f)) for f in Stat)
_ST_WIDTH = tl.constexpr(len(Stat))
_GP_COEF, _GP_M, _GP_LOG_SB, _GP_QT_M1 = (tl.constexpr(int(f)) for f in GradParam)
_GP_WIDTH = tl.constexpr(len(GradParam))


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda" or interpreting():
        return True, ""
    return False, (
        f"the Triton backend needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
        "before importing tofu_kernels to run the kernels in Triton's CPU interpreter"
    )


@triton.jit
def _row_offset(row, n_inner, s_outer, s_inner):
    return (row // n_inner) * s_outer + (row % n_inner) * s_inner


@triton.jit
def _stats_kernel(
    X,
    LABELS,
    STATS,  # fp32 [rows, splits, len(Stat)]
    n_inner,
    s_outer,
    s_inner,
    n_valid,  # columns [0, n_valid) are real; the rest of the row is padding
    vocab_start,
    chunk,  # columns per split, a multiple of BLOCK
    ignore_index,
    inv_beta,
    BLOCK: tl.constexpr,
    BETA_IS_ONE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    x_row = X + _row_offset(row, n_inner, s_outer, s_inner)
    label = tl.load(LABELS + row).to(tl.int64)
    active = label != ignore_index  # ignored rows are not read; finalize masks them
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_valid)
    m = -float("inf")
    s1 = 0.0
    sb = 0.0
    for start in range(0, chunk, BLOCK):
        cols = lo + start + tl.arange(0, BLOCK)
        z = tl.load(x_row + cols, mask=(cols < hi) & active, other=-float("inf"))
        z = z.to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # An all -inf prefix keeps m = -inf: shift by 0 instead so exp() stays 0, not NaN.
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        s1 = s1 * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        if not BETA_IS_ONE:
            sb = sb * tl.exp((m - shift) * inv_beta) + tl.sum(tl.exp((z - shift) * inv_beta), axis=0)
        m = m_new
    if BETA_IS_ONE:
        sb = s1
    t = label - vocab_start
    hit = active & (t >= lo) & (t < hi)
    zt = tl.load(x_row + t, mask=hit, other=0.0).to(tl.float32)
    out = STATS + (row * tl.num_programs(1) + split) * _ST_WIDTH
    tl.store(out + _ST_M, m)
    tl.store(out + _ST_S1, s1)
    tl.store(out + _ST_SB, sb)
    tl.store(out + _ST_ZT, zt)


@triton.jit
def _grad_kernel(
    X,
    OUT,  # may alias X (in-place backward): each element is read before it is written
    LABELS,
    PARAMS,  # fp32 [rows, len(GradParam)]
    n_inner,
    xs_outer,
    xs_inner,
    os_outer,
    os_inner,
    n_valid,
    width,
    vocab_start,
    inv_beta,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    p = PARAMS + row * _GP_WIDTH
    coef = tl.load(p + _GP_COEF)
    m = tl.load(p + _GP_M)
    log_sb = tl.load(p + _GP_LOG_SB)
    qt_m1 = tl.load(p + _GP_QT_M1)
    t = tl.load(LABELS + row).to(tl.int64) - vocab_start
    t = tl.where((t >= 0) & (t < n_valid), t, -1)  # target elsewhere (other rank, padding)
    x_row = X + _row_offset(row, n_inner, xs_outer, xs_inner)
    limit = tl.where(coef != 0.0, n_valid, 0)  # coef == 0: nothing to read
    z = tl.load(x_row + cols, mask=cols < limit, other=-float("inf"))
    q = tl.exp((z.to(tl.float32) - m) * inv_beta - log_sb)
    q = tl.where(cols == t, qt_m1, q)
    o_row = OUT + _row_offset(row, n_inner, os_outer, os_inner)
    tl.store(o_row + cols, (coef * q).to(OUT.dtype.element_ty), mask=cols < width)


# Forward tile: 4096 fp32 values in flight per program (16 per thread at 8 warps) keeps
# the online max and two sums in registers without spilling; one-row-per-program
# kernels spill above ~32K values per program on Hopper. The backward has no
# loop-carried state, so it uses a 2-D grid of tiles.
FWD_BLOCK = 4096
BWD_BLOCK = 4096
# Enough programs to fill 132 SMs several times over before splitting rows further.
TARGET_PROGRAMS = 1024


def _pow2_block(n_valid: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n_valid, 1))))


def row_stats(
    x: torch.Tensor, lay: RowLayout, labels: torch.Tensor, shard: Shard, beta: float, ignore_index: int
) -> torch.Tensor:
    """fp32 [N, len(Stat)] statistics over columns [0, n_valid) of each row."""
    n_valid = shard.n_valid
    block = _pow2_block(n_valid, FWD_BLOCK)
    splits = num_splits(lay.n_rows, n_valid, block, TARGET_PROGRAMS)
    chunk = split_chunk(n_valid, splits, block)
    stats = torch.empty(lay.n_rows, splits, len(Stat), dtype=torch.float32, device=x.device)
    _stats_kernel[(lay.n_rows, splits)](
        x,
        labels,
        stats,
        lay.n_inner,
        lay.s_outer,
        lay.s_inner,
        n_valid,
        shard.vocab_start,
        chunk,
        ignore_index,
        1.0 / beta,
        BLOCK=block,
        BETA_IS_ONE=beta == 1.0,
        num_warps=8 if block >= 4096 else 4,
    )
    return merge_splits(stats, beta)


def grad(
    x: torch.Tensor,
    lay: RowLayout,
    out: torch.Tensor,
    out_lay: RowLayout,
    labels: torch.Tensor,
    grad_params: torch.Tensor,
    shard: Shard,
    beta: float,
) -> None:
    """Write ``coef * (softmax(z/beta) - onehot)`` into ``out`` (may alias ``x``)."""
    assert out_lay.n_inner == lay.n_inner, "out must share x's row grouping"
    block = _pow2_block(lay.width, BWD_BLOCK)
    grid = (lay.n_rows, triton.cdiv(lay.width, block))
    _grad_kernel[grid](
        x,
        out,
        labels,
        grad_params,
        lay.n_inner,
        lay.s_outer,
        lay.s_inner,
        out_lay.s_outer,
        out_lay.s_inner,
        shard.n_valid,
        lay.width,
        shard.vocab_start,
        1.0 / beta,
        BLOCK=block,
        num_warps=8 if block >= 4096 else 4,
    )

