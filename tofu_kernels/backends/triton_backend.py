"""Triton backend: every GPU step of the loss as a Triton kernel, registered as torch ops.

Two-pass path (any upstream gradient; the only path under tensor parallelism):
- ``_stats_kernel``, grid (rows, splits): one read of each row slice in BLOCK-wide tiles
  with an online max and two fp32 sums (S1 at temperature 1, Sb at beta: 2 exponentials
  per element, 1 when beta = 1) plus one scalar load of the target logit; writes partial
  ``Stat`` records (and, under TP, this rank's metadata record for the all-gather).
- ``_epilogue_kernel``, one program: merges every part of every row (splits x ranks, in a
  fixed order), computes loss, cross entropy, the focal weight and the backward's
  ``GradParam`` record, and the reduction (sum, or mean over non-ignored tokens) on the
  device. It replaces ~60 small torch operations.
- ``_grad_kernel``, grid (rows, tiles): one read of the logits, one write of
  ``coef * (q_j - [j == t])``, ``coef = upstream_i * scale * g`` folded in fp32 in the kernel;
  rows whose coef is 0 (ignored, loss-masked) write zeros without reading.

Gradient in the forward (a scalar upstream gradient: ``reduction="mean"/"sum"``, single
device): ``_count_kernel`` (the mean's token count), ``_fused_kernel`` (one program per
row: the statistics pass, the loss, then a second pass over the row, in reverse tile order
so that it finds the row's last tiles still in L2, writing the gradient), ``_reduce_kernel``
(the loss sums), and in the backward ``_rescale_kernel`` (multiplies by the upstream
gradient, and returns at once, on the device, when it is 1). Bytes: 2 read + 2 write per
bf16 element when the re-read hits L2, against 6 for the two-pass path.

All launchers are ``torch.library.triton_op``s, so torch.compile traces them.
Row offsets are int64; rows may be strided (two strides, see ``RowLayout``).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch._library.triton import set_wrap_triton_enabled
from torch.library import triton_op, wrap_triton

from .._inputs import RowLayout, Shard
from ..params import TOFUParams
from ..tofu_math import Epilogue, GradParam, Meta, Partials, Reduction, Stat
from ._common import cdiv, epilogue_buffers, num_splits, split_chunk, upstream_of

NAME = "triton"

# Record fields (tofu_math.Stat, GradParam, Meta) as compile-time constants.
_ST_M, _ST_S1, _ST_SB, _ST_ZT = (tl.constexpr(int(f)) for f in Stat)
_ST_WIDTH = tl.constexpr(len(Stat))
_GP_G, _GP_M, _GP_LOG_SB, _GP_QT_M1 = (tl.constexpr(int(f)) for f in GradParam)
_GP_WIDTH = tl.constexpr(len(GradParam))
_MT_START, _MT_END, _MT_WIDTH, _MT_ROWS = (tl.constexpr(int(f)) for f in Meta)
_LOG2E = tl.constexpr(1.4426950408889634)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda" or interpreting():
        return True, ""
    return False, (
        f"the Triton backend needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
        "before importing tofu_kernels to run the kernels in Triton's CPU interpreter"
    )


def _launch(kernel, t: torch.Tensor):
    """``wrap_triton(kernel)``, or None where Triton's CPU interpreter meets fake tensors
    (torch.compile's tracing on a machine without a GPU): the interpreter cannot run on
    them, and the op's declared mutations are all a fake implementation needs."""
    if interpreting():
        from torch._subclasses.fake_tensor import is_fake

        if t.is_meta or is_fake(t):
            return None
    return wrap_triton(kernel)


# ------------------------------------------------------------------ shared device math


@triton.jit
def _row_offset(row, n_inner, s_outer, s_inner):
    return (row // n_inner) * s_outer + (row % n_inner) * s_inner


@triton.jit
def _expm1(x):
    """expm1 from exp and log (Kahan): accurate near 0, where exp(x) - 1 cancels."""
    u = tl.exp(x)
    um1 = u - 1.0
    safe = (um1 != 0.0) & (u != float("inf"))
    r = tl.where(safe, um1 * x / tl.log(tl.where(safe, u, 2.0)), x)
    return tl.where(um1 == -1.0, -1.0, tl.where(u == float("inf"), u, r))


@triton.jit
def _merge(m, s1, sb, m2, s12, sb2, inv_beta, BETA_IS_ONE: tl.constexpr):
    """Merge two partial statistics (scalars or vectors); empty parts are (-inf, 0, 0)."""
    new_m = tl.maximum(m, m2)
    shift = tl.where(new_m == -float("inf"), 0.0, new_m)
    a = tl.exp(m - shift)
    b = tl.exp(m2 - shift)
    s1 = s1 * a + s12 * b
    if BETA_IS_ONE:
        sb = s1
    else:
        sb = sb * tl.exp((m - shift) * inv_beta) + sb2 * tl.exp((m2 - shift) * inv_beta)
    return new_m, s1, sb


@triton.jit
def _finalize(m, s1, sb, zt, label, ignore_index, vocab_size, gamma, beta, inv_beta,
              GAMMA_ZERO: tl.constexpr):
    """Per-row loss, ce, g, m, log Sb, q_t - 1 (tofu_math.finalize_stats, in fp32).

    Ignored rows give zeros; labels outside [0, vocab_size) give NaN loss and g.
    """
    ignored = label == ignore_index
    invalid = (~ignored) & ((label < 0) | (label >= vocab_size))
    keep = ~(ignored | invalid)
    m = tl.where(keep, m, 0.0)
    zt_m = tl.where(keep, zt - m, 0.0)
    log_s1 = tl.where(keep, tl.log(tl.where(keep, s1, 1.0)), 0.0)
    log_sb = tl.where(keep, tl.log(tl.where(keep, sb, 1.0)), 0.0)
    log_p = tl.minimum(zt_m - log_s1, 0.0)
    log_qt = zt_m * inv_beta - log_sb
    if GAMMA_ZERO:
        g = tl.where(keep, 1.0, 0.0)
    else:
        # g = om^gamma * (1 + gamma * p * r), om = -expm1(log p), r = -log p / om
        p = tl.exp(log_p)
        om = -_expm1(log_p)
        r = tl.where(om > 0.0, -log_p / tl.where(om > 0.0, om, 1.0), 1.0)
        pr = tl.where(p > 0.0, p * r, 0.0)
        pos = om > 0.0  # om = 0 (p = 1): g = 0 for gamma > 0
        g = tl.where(pos, tl.exp(gamma * tl.log(tl.where(pos, om, 1.0))), 0.0) * (1.0 + gamma * pr)
    nan = float("nan")
    loss = tl.where(invalid, nan, tl.where(ignored, 0.0, -g * beta * log_qt))
    ce = tl.where(invalid, nan, tl.where(ignored, 0.0, -log_p))
    g = tl.where(invalid, nan, tl.where(ignored, 0.0, g))
    qt_m1 = tl.where(keep, _expm1(log_qt), 0.0)
    return loss, ce, g, m, log_sb, qt_m1


@triton.jit
def _row_slice_stats(x_row, lo, hi, span, active, inv_beta, BLOCK: tl.constexpr, BETA_IS_ONE: tl.constexpr):
    """(m, S1, Sb) of columns [lo, hi) of one row in BLOCK-wide tiles (``span`` >= hi - lo
    columns visited): an online max and two fp32 sums; nothing is read unless ``active``."""
    m = -float("inf")
    s1 = 0.0
    sb = 0.0
    for start in range(0, span, BLOCK):
        cols = lo + start + tl.arange(0, BLOCK)
        z = tl.load(x_row + cols, mask=(cols < hi) & active, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        # An all -inf prefix keeps m = -inf: shift by 0 instead so exp() stays 0, not NaN.
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        s1 = s1 * tl.exp(m - shift) + tl.sum(tl.exp(z - shift), axis=0)
        if not BETA_IS_ONE:
            sb = sb * tl.exp((m - shift) * inv_beta) + tl.sum(tl.exp((z - shift) * inv_beta), axis=0)
        m = m_new
    if BETA_IS_ONE:
        sb = s1
    return m, s1, sb


# ------------------------------------------------------------------ two-pass path


@triton.jit
def _stats_kernel(
    X,
    LABELS,
    STATS,  # fp32 [rows, splits, len(Stat)] (+ one metadata record under TP)
    n_inner,
    s_outer,
    s_inner,
    n_valid,  # columns [0, n_valid) are real; the rest of the row is padding
    vocab_start,
    chunk,  # columns per split, a multiple of BLOCK
    ignore_index,
    inv_beta,
    meta_vocab_end,
    meta_width,
    BLOCK: tl.constexpr,
    BETA_IS_ONE: tl.constexpr,
    WRITE_META: tl.constexpr,
):
    inv_beta = tl.cast(inv_beta, tl.float32)  # under torch.compile, Inductor passes Python floats as fp64
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    x_row = X + _row_offset(row, n_inner, s_outer, s_inner)
    label = tl.load(LABELS + row).to(tl.int64)
    active = label != ignore_index  # ignored rows are not read; the epilogue masks them
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_valid)
    m, s1, sb = _row_slice_stats(x_row, lo, hi, chunk, active, inv_beta, BLOCK, BETA_IS_ONE)
    t = label - vocab_start
    hit = active & (t >= lo) & (t < hi)
    zt = tl.load(x_row + t, mask=hit, other=0.0).to(tl.float32)
    n_splits = tl.num_programs(1)
    out = STATS + (row * n_splits + split) * _ST_WIDTH
    tl.store(out + _ST_M, m)
    tl.store(out + _ST_S1, s1)
    tl.store(out + _ST_SB, sb)
    tl.store(out + _ST_ZT, zt)
    if WRITE_META:
        if (row == 0) & (split == 0):  # this rank's metadata record, as int32 bits
            meta = STATS + tl.num_programs(0).to(tl.int64) * n_splits * _ST_WIDTH
            idx = tl.arange(0, 4)
            zero = tl.zeros([4], dtype=tl.int32)
            vals = tl.where(idx == _MT_START, zero + vocab_start,
                            tl.where(idx == _MT_END, zero + meta_vocab_end,
                                     tl.where(idx == _MT_WIDTH, zero + meta_width, zero + tl.num_programs(0))))
            tl.store(meta + idx, vals.to(tl.float32, bitcast=True))


@triton.jit
def _epilogue_kernel(
    PARTS,  # fp32 Partials.data
    LABELS,
    LOSS,  # fp32 [rows]
    CE,  # fp32 [rows]
    REC,  # fp32 [rows, len(GradParam)]
    RED,  # fp32 [3]: reduced loss, reduced ce, scale
    n_rows,
    splits,
    world,
    rank_stride,  # floats between ranks' blocks of PARTS
    vocab_size,  # used when HAS_META is false
    ignore_index,
    gamma,
    beta,
    inv_beta,
    HAS_META: tl.constexpr,
    REDUCTION: tl.constexpr,  # tofu_math.Reduction
    GAMMA_ZERO: tl.constexpr,
    BETA_IS_ONE: tl.constexpr,
    BLOCK_R: tl.constexpr,
):
    gamma, beta, inv_beta = tl.cast(gamma, tl.float32), tl.cast(beta, tl.float32), tl.cast(inv_beta, tl.float32)
    if HAS_META:  # global vocab size: the largest vocab_end of the ranks' metadata records
        meta_off = n_rows * splits * _ST_WIDTH
        vs = tl.load(PARTS + meta_off + _MT_END).to(tl.int32, bitcast=True)
        for w in range(1, world):
            end = tl.load(PARTS + w * rank_stride + meta_off + _MT_END).to(tl.int32, bitcast=True)
            vs = tl.maximum(vs, end)
    else:
        vs = vocab_size
    acc_loss = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_ce = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_n = tl.zeros([BLOCK_R], dtype=tl.int32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        ok = rows < n_rows
        m = tl.full([BLOCK_R], -float("inf"), tl.float32)
        s1 = tl.zeros([BLOCK_R], dtype=tl.float32)
        sb = tl.zeros([BLOCK_R], dtype=tl.float32)
        zt = tl.zeros([BLOCK_R], dtype=tl.float32)
        for w in range(0, world):
            for s in range(0, splits):
                rec = PARTS + w * rank_stride + (rows * splits + s) * _ST_WIDTH
                pm = tl.load(rec + _ST_M, mask=ok, other=-float("inf"))
                ps1 = tl.load(rec + _ST_S1, mask=ok, other=0.0)
                psb = tl.load(rec + _ST_SB, mask=ok, other=0.0)
                zt += tl.load(rec + _ST_ZT, mask=ok, other=0.0)
                m, s1, sb = _merge(m, s1, sb, pm, ps1, psb, inv_beta, BETA_IS_ONE)
        label = tl.load(LABELS + rows, mask=ok, other=ignore_index).to(tl.int64)
        loss, ce, g, mm, log_sb, qt_m1 = _finalize(m, s1, sb, zt, label, ignore_index, vs, gamma, beta,
                                                   inv_beta, GAMMA_ZERO)
        tl.store(LOSS + rows, loss, mask=ok)
        tl.store(CE + rows, ce, mask=ok)
        rec_out = REC + rows * _GP_WIDTH
        tl.store(rec_out + _GP_G, g, mask=ok)
        tl.store(rec_out + _GP_M, mm, mask=ok)
        tl.store(rec_out + _GP_LOG_SB, log_sb, mask=ok)
        tl.store(rec_out + _GP_QT_M1, qt_m1, mask=ok)
        acc_loss += tl.where(ok, loss, 0.0)
        acc_ce += tl.where(ok, ce, 0.0)
        acc_n += (ok & (label != ignore_index)).to(tl.int32)
    if REDUCTION == 2:  # mean over non-ignored tokens, at least one
        scale = 1.0 / tl.maximum(tl.sum(acc_n, axis=0), 1).to(tl.float32)
    else:
        scale = 1.0
    tl.store(RED + 0, tl.sum(acc_loss, axis=0) * scale)
    tl.store(RED + 1, tl.sum(acc_ce, axis=0) * scale)
    tl.store(RED + 2, scale)


@triton.jit
def _grad_kernel(
    X,
    OUT,  # may alias X (in-place backward): each element is read before it is written
    LABELS,
    REC,  # fp32 [rows, len(GradParam)]
    UPSTREAM,  # fp32: d(output) / d(per-token loss), element row * up_stride
    SCALE,  # fp32 [1]: 1 / token count for a mean, else 1
    up_stride,
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
    inv_beta = tl.cast(inv_beta, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    p = REC + row * _GP_WIDTH
    coef = tl.load(UPSTREAM + row * up_stride).to(tl.float32) * tl.load(SCALE) * tl.load(p + _GP_G)
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


# ------------------------------------------------------------------ gradient in the forward


@triton.jit
def _count_kernel(LABELS, SCALE, n_rows, ignore_index, MEAN: tl.constexpr, BLOCK_R: tl.constexpr):
    acc = tl.zeros([BLOCK_R], dtype=tl.int32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        label = tl.load(LABELS + rows, mask=rows < n_rows, other=ignore_index)
        acc += (label != ignore_index).to(tl.int32)
    if MEAN:
        tl.store(SCALE, 1.0 / tl.maximum(tl.sum(acc, axis=0), 1).to(tl.float32))
    else:
        tl.store(SCALE, 1.0)


@triton.jit
def _fused_kernel(
    X,
    OUT,  # the gradient: may alias X (every element is read in pass 2 before it is written)
    LABELS,
    LOSS,  # fp32 [rows]
    CE,  # fp32 [rows]
    SCALE,  # fp32 [1] from _count_kernel
    n_inner,
    xs_outer,
    xs_inner,
    os_outer,
    os_inner,
    n_valid,
    width,
    ignore_index,
    gamma,
    beta,
    inv_beta,
    BLOCK: tl.constexpr,
    BETA_IS_ONE: tl.constexpr,
    GAMMA_ZERO: tl.constexpr,
):
    gamma, beta, inv_beta = tl.cast(gamma, tl.float32), tl.cast(beta, tl.float32), tl.cast(inv_beta, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    x_row = X + _row_offset(row, n_inner, xs_outer, xs_inner)
    o_row = OUT + _row_offset(row, n_inner, os_outer, os_inner)
    label = tl.load(LABELS + row).to(tl.int64)
    active = label != ignore_index
    # pass 1: the statistics
    m, s1, sb = _row_slice_stats(x_row, 0, n_valid, n_valid, active, inv_beta, BLOCK, BETA_IS_ONE)
    hit = active & (label >= 0) & (label < n_valid)
    zt = tl.load(x_row + label, mask=hit, other=0.0).to(tl.float32)
    loss, ce, g, mm, log_sb, qt_m1 = _finalize(m, s1, sb, zt, label, ignore_index, n_valid, gamma, beta,
                                               inv_beta, GAMMA_ZERO)
    tl.store(LOSS + row, loss)
    tl.store(CE + row, ce)
    coef = tl.load(SCALE) * g
    limit = tl.where(coef != 0.0, n_valid, 0)
    t = tl.where(hit, label, -1)
    n_tiles = tl.cdiv(width, BLOCK)
    for k in range(0, n_tiles):  # pass 2: the gradient, last tile first (still in L2)
        cols = (n_tiles - 1 - k) * BLOCK + tl.arange(0, BLOCK)
        z = tl.load(x_row + cols, mask=cols < limit, other=-float("inf")).to(tl.float32)
        q = tl.exp((z - mm) * inv_beta - log_sb)
        q = tl.where(cols == t, qt_m1, q)
        tl.store(o_row + cols, (coef * q).to(OUT.dtype.element_ty), mask=cols < width)


@triton.jit
def _reduce_kernel(LOSS, CE, SCALE, RED, n_rows, BLOCK_R: tl.constexpr):
    acc_loss = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_ce = tl.zeros([BLOCK_R], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        acc_loss += tl.load(LOSS + rows, mask=rows < n_rows, other=0.0)
        acc_ce += tl.load(CE + rows, mask=rows < n_rows, other=0.0)
    scale = tl.load(SCALE)
    tl.store(RED + 0, tl.sum(acc_loss, axis=0) * scale)
    tl.store(RED + 1, tl.sum(acc_ce, axis=0) * scale)
    tl.store(RED + 2, scale)


@triton.jit
def _rescale_kernel(OUT, GRAD_OUT, n_rows, n_inner, os_outer, os_inner, width, n_tiles, BLOCK: tl.constexpr):
    """OUT *= grad_out, over a persistent grid; returns at once when grad_out == 1."""
    s = tl.load(GRAD_OUT).to(tl.float32)
    if s != 1.0:
        for work in range(tl.program_id(0), n_rows * n_tiles, tl.num_programs(0)):
            row = (work // n_tiles).to(tl.int64)
            cols = (work % n_tiles) * BLOCK + tl.arange(0, BLOCK)
            o_row = OUT + _row_offset(row, n_inner, os_outer, os_inner)
            v = tl.load(o_row + cols, mask=cols < width, other=0.0).to(tl.float32)
            tl.store(o_row + cols, (v * s).to(OUT.dtype.element_ty), mask=cols < width)


# ------------------------------------------------------------------ launch policy

# Statistics tile: 4096 fp32 values in flight per program (16 per thread at 8 warps) keep
# the online max and two sums in registers without spilling; one-row-per-program kernels
# spill above ~32K values per program on Hopper. The gradient has no loop-carried state:
# a 2-D grid of tiles. Enough programs to fill 132 SMs several times over before splitting.
FWD_BLOCK = 4096
BWD_BLOCK = 4096
FUSED_BLOCK = 8192
TARGET_PROGRAMS = 1024
EPILOGUE_ROWS = 1024  # rows per iteration of the one-program O(N) kernels
RESCALE_PROGRAMS = 1056  # 8 per SM on a 132-SM GPU


def _pow2_block(n: int, cap: int) -> int:
    return max(16, min(cap, triton.next_power_of_2(max(n, 1))))


def _warps(block: int) -> int:
    return 8 if block >= 4096 else 4


# ------------------------------------------------------------------ ops (torch.library.triton_op, below)


def _row_stats_op(x: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor, n_rows: int, splits: int,
                  n_inner: int, s_outer: int, s_inner: int, n_valid: int, vocab_start: int, chunk: int,
                  block: int, ignore_index: int, beta: float, write_meta: bool, meta_vocab_end: int,
                  meta_width: int) -> None:
    k = _launch(_stats_kernel, stats)
    if k is not None:
        k[(n_rows, splits)](x, labels, stats, n_inner, s_outer, s_inner, n_valid, vocab_start, chunk,
                            ignore_index, 1.0 / beta, meta_vocab_end, meta_width, BLOCK=block,
                            BETA_IS_ONE=beta == 1.0, WRITE_META=write_meta, num_warps=_warps(block))


def _epilogue_op(parts: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, ce: torch.Tensor,
                 rec: torch.Tensor, red: torch.Tensor, n_rows: int, splits: int, world: int, rank_stride: int,
                 has_meta: bool, vocab_size: int, ignore_index: int, gamma: float, beta: float,
                 reduction: int) -> None:
    k = _launch(_epilogue_kernel, red)
    if k is not None:
        k[(1,)](parts, labels, loss, ce, rec, red, n_rows, splits, world, rank_stride, vocab_size, ignore_index,
                gamma, beta, 1.0 / beta, HAS_META=has_meta, REDUCTION=reduction, GAMMA_ZERO=gamma == 0.0,
                BETA_IS_ONE=beta == 1.0, BLOCK_R=EPILOGUE_ROWS, num_warps=8)


def _grad_op(x: torch.Tensor, out: torch.Tensor, labels: torch.Tensor, rec: torch.Tensor, upstream: torch.Tensor,
             scale: torch.Tensor, up_stride: int, n_rows: int, n_inner: int, xs_outer: int, xs_inner: int,
             os_outer: int, os_inner: int, n_valid: int, width: int, vocab_start: int, beta: float) -> None:
    block = _pow2_block(width, BWD_BLOCK)
    k = _launch(_grad_kernel, out)
    if k is not None:
        k[(n_rows, cdiv(width, block))](x, out, labels, rec, upstream, scale, up_stride, n_inner, xs_outer,
                                        xs_inner, os_outer, os_inner, n_valid, width, vocab_start, 1.0 / beta,
                                        BLOCK=block, num_warps=_warps(block))


def _grad_inplace_op(x: torch.Tensor, labels: torch.Tensor, rec: torch.Tensor, upstream: torch.Tensor,
                     scale: torch.Tensor, up_stride: int, n_rows: int, n_inner: int, s_outer: int, s_inner: int,
                     n_valid: int, width: int, vocab_start: int, beta: float) -> None:
    block = _pow2_block(width, BWD_BLOCK)
    k = _launch(_grad_kernel, x)
    if k is not None:
        k[(n_rows, cdiv(width, block))](x, x, labels, rec, upstream, scale, up_stride, n_inner, s_outer, s_inner,
                                        s_outer, s_inner, n_valid, width, vocab_start, 1.0 / beta,
                                        BLOCK=block, num_warps=_warps(block))


def _fused_op(x: torch.Tensor, out: torch.Tensor, labels: torch.Tensor, loss: torch.Tensor, ce: torch.Tensor,
              red: torch.Tensor, n_rows: int, n_inner: int, xs_outer: int, xs_inner: int, os_outer: int,
              os_inner: int, width: int, ignore_index: int, gamma: float, beta: float, mean: bool) -> None:
    """red: fp32 [3] = reduced loss, reduced ce, scale (written first, by the count kernel)."""
    count = _launch(_count_kernel, red)
    if count is None:
        return
    scale = red[2:]
    count[(1,)](labels, scale, n_rows, ignore_index, MEAN=mean, BLOCK_R=EPILOGUE_ROWS, num_warps=8)
    block = _pow2_block(width, FUSED_BLOCK)
    _launch(_fused_kernel, out)[(n_rows,)](
        x, out, labels, loss, ce, scale, n_inner, xs_outer, xs_inner, os_outer, os_inner, width, width,
        ignore_index, gamma, beta, 1.0 / beta, BLOCK=block, BETA_IS_ONE=beta == 1.0, GAMMA_ZERO=gamma == 0.0,
        num_warps=16 if block >= 8192 else 8)
    _launch(_reduce_kernel, red)[(1,)](loss, ce, scale, red, n_rows, BLOCK_R=EPILOGUE_ROWS, num_warps=8)


def _rescale_op(out: torch.Tensor, grad_out: torch.Tensor, n_rows: int, n_inner: int, os_outer: int,
                os_inner: int, width: int) -> None:
    block = _pow2_block(width, BWD_BLOCK)
    tiles = cdiv(width, block)
    k = _launch(_rescale_kernel, out)
    if k is not None:
        k[(max(1, min(RESCALE_PROGRAMS, n_rows * tiles)),)](out, grad_out, n_rows, n_inner, os_outer, os_inner,
                                                            width, tiles, BLOCK=block, num_warps=_warps(block))


# Registered as torch ops (torch.compile traces them); eager calls take the functions
# directly (_run). The op of each: name, the arguments it writes.
triton_op("tofu_kernels::triton_row_stats", _row_stats_op, mutates_args={"stats"})
triton_op("tofu_kernels::triton_epilogue", _epilogue_op, mutates_args={"loss", "ce", "rec", "red"})
triton_op("tofu_kernels::triton_grad", _grad_op, mutates_args={"out"})
triton_op("tofu_kernels::triton_grad_inplace", _grad_inplace_op, mutates_args={"x"})
triton_op("tofu_kernels::triton_fused", _fused_op, mutates_args={"out", "loss", "ce", "red"})
triton_op("tofu_kernels::triton_rescale", _rescale_op, mutates_args={"out"})

OPS = torch.ops.tofu_kernels


def _run(op, impl, *args) -> None:
    """Call a registered op where torch.compile or fake tensors need it, else its body
    directly: in eager mode the custom-op dispatch costs tens of microseconds per call,
    more than a kernel at small shard widths (benchmarks/NOTES.md)."""
    from torch._subclasses.fake_tensor import is_fake

    t = args[0]
    if torch.compiler.is_compiling() or t.is_meta or is_fake(t):
        op(*args)
    else:
        with set_wrap_triton_enabled(False):
            impl(*args)


# ------------------------------------------------------------------ Backend interface


def row_stats(x: torch.Tensor, lay: RowLayout, labels: torch.Tensor, shard: Shard, beta: float,
              ignore_index: int, meta: bool) -> Partials:
    n_valid = shard.n_valid
    block = _pow2_block(n_valid, FWD_BLOCK)
    splits = num_splits(lay.n_rows, n_valid, block, TARGET_PROGRAMS)
    chunk = split_chunk(n_valid, splits, block)
    data = torch.empty(lay.n_rows * splits + int(meta), len(Stat), dtype=torch.float32, device=x.device)
    _run(OPS.triton_row_stats, _row_stats_op, x, labels, data, lay.n_rows, splits, lay.n_inner, lay.s_outer, lay.s_inner, n_valid,
                         shard.vocab_start, chunk, block, ignore_index, beta, meta, shard.vocab_end, lay.width)
    return Partials(data, lay.n_rows, splits, has_meta=meta)


def epilogue(parts: Partials, labels: torch.Tensor, params: TOFUParams, vocab_size: int | None,
             reduction: Reduction) -> Epilogue:
    n = parts.n_rows
    loss, ce, rec, red = epilogue_buffers(n, parts.data.device, with_rec=True)
    _run(OPS.triton_epilogue, _epilogue_op, parts.data, labels, loss, ce, rec, red, n, parts.splits, parts.world, parts.rank_stride,
                        parts.has_meta, 0 if vocab_size is None else vocab_size, params.ignore_index,
                        params.gamma, params.beta, int(reduction))
    return Epilogue(loss, ce, rec, red[0], red[1], red[2:3])


def grad(x, lay: RowLayout, out, out_lay: RowLayout, labels, grad_rec, upstream, scale, shard: Shard,
         beta: float) -> None:
    assert out_lay.n_inner == lay.n_inner, "out must share x's row grouping"
    up, up_stride = upstream_of(upstream)
    if out is x:
        _run(OPS.triton_grad_inplace, _grad_inplace_op, x, labels, grad_rec, up, scale, up_stride, lay.n_rows, lay.n_inner, lay.s_outer,
                                lay.s_inner, shard.n_valid, lay.width, shard.vocab_start, beta)
    else:
        _run(OPS.triton_grad, _grad_op, x, out, labels, grad_rec, up, scale, up_stride, lay.n_rows, lay.n_inner, lay.s_outer,
                        lay.s_inner, out_lay.s_outer, out_lay.s_inner, shard.n_valid, lay.width, shard.vocab_start,
                        beta)


def fused(x, lay: RowLayout, out, out_lay: RowLayout, labels, params: TOFUParams, reduction: Reduction) -> Epilogue:
    n = lay.n_rows
    loss, ce, _, red = epilogue_buffers(n, x.device, with_rec=False)
    _run(OPS.triton_fused, _fused_op, x, out, labels, loss, ce, red, n, lay.n_inner, lay.s_outer, lay.s_inner, out_lay.s_outer,
                     out_lay.s_inner, lay.width, params.ignore_index, params.gamma, params.beta,
                     reduction == Reduction.MEAN)
    return Epilogue(loss, ce, None, red[0], red[1], red[2:3])


def rescale(out, out_lay: RowLayout, grad_out: torch.Tensor) -> None:
    _run(OPS.triton_rescale, _rescale_op, out, upstream_of(grad_out)[0], out_lay.n_rows, out_lay.n_inner, out_lay.s_outer, out_lay.s_inner,
                       out_lay.width)


__all__ = ["NAME", "available", "row_stats", "epilogue", "grad", "fused", "rescale"]
