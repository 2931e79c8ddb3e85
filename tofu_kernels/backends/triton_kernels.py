"""The Triton kernels of the loss: every GPU step as one kernel (their ops: triton_backend.py).

Two-pass path (any upstream gradient; the only path under tensor parallelism):
- ``stats_kernel``, grid (rows, splits): one read of each row slice in BLOCK-wide tiles
  with an online max and two fp32 sums (S1 at temperature 1, Sb at beta: 2 exponentials
  per element, 1 when beta = 1), kept per thread across the tiles and merged once (no
  block-wide reduction in the loop), plus one scalar load of the target logit; writes
  partial ``Stat`` records (and, under TP, this rank's metadata record for the all-gather).
- ``epilogue_kernel``, one program: merges every part of every row (splits x ranks, in a
  fixed order), computes loss, cross entropy, the focal weight and the backward's
  ``GradParam`` record, and the reduction (sum, or mean over non-ignored tokens) on the
  device, so no torch operation runs between the statistics and the gradient.
- ``grad_kernel``, grid (rows, tiles): one read of the logits, one write of
  ``coef * (q_j - [j == t])``, ``coef = upstream_i * scale * g`` folded in fp32 in the kernel;
  rows whose coef is 0 (ignored, loss-masked) write zeros without reading.

Gradient in the forward (a scalar upstream gradient: ``reduction="mean"/"sum"``, single
device): ``count_kernel`` (the mean's token count), ``grad_in_forward_kernel`` (one program per
row: the statistics pass, the loss, then a second pass over the row, in reverse tile order
so that it finds the row's last tiles still in L2, writing the gradient), ``reduce_kernel``
(the loss sums), and in the backward ``rescale_kernel`` (multiplies by the upstream
gradient, and returns at once, on the device, when it is 1). Bytes: 2 read + 2 write per
bf16 element when the re-read hits L2, against 6 for the two-pass path.

Row offsets are int64; rows may be strided (two strides, see ``RowLayout``). Python floats
arrive as fp64 under torch.compile (Inductor's typing), so every float argument is cast to
fp32 first.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..records import GradParam, Meta, Metric, MetricAcc, Reduced, Reduction, Stat

# Record fields (tofu_kernels.records) as compile-time constants.
_ST_M, _ST_S1, _ST_SB, _ST_ZT = (tl.constexpr(int(f)) for f in Stat)
_ST_WIDTH = tl.constexpr(len(Stat))
_GP_G, _GP_M, _GP_LOG_SB, _GP_QT_M1 = (tl.constexpr(int(f)) for f in GradParam)
_GP_WIDTH = tl.constexpr(len(GradParam))
_MT_START, _MT_END, _MT_WIDTH, _MT_ROWS = (tl.constexpr(int(f)) for f in Meta)
_RD_LOSS, _RD_CE, _RD_SCALE = (tl.constexpr(int(f)) for f in Reduced)
_MX_ENTROPY, _MX_TOP1 = (tl.constexpr(int(f)) for f in Metric)
_MX_WIDTH = tl.constexpr(len(Metric))
_MA_E, _MA_BEFORE = (tl.constexpr(int(f)) for f in MetricAcc)
_MA_WIDTH = tl.constexpr(len(MetricAcc))
_FLT_MAX = tl.constexpr(3.4028234663852886e38)
_MEAN = tl.constexpr(int(Reduction.MEAN))


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
def _merge(
    m, s1, sb, e, m2, s12, sb2, e2, inv_beta, BETA_IS_ONE: tl.constexpr, METRICS: tl.constexpr
):
    """Merge two partial statistics (scalars or vectors); empty parts are (-inf, 0, 0, 0).
    With METRICS also the entropy accumulators: E = sum_r exp(m_r - M) (E_r + (m_r - M) S1_r)."""
    new_m = tl.maximum(m, m2)
    shift = tl.where(new_m == -float("inf"), 0.0, new_m)
    a = tl.exp(m - shift)
    b = tl.exp(m2 - shift)
    if METRICS:  # before s1 changes; an empty part (a or b = 0, E = S1 = 0) adds 0, never -inf * 0
        e = a * (e + tl.where(m == -float("inf"), 0.0, m - shift) * s1) + b * (
            e2 + tl.where(m2 == -float("inf"), 0.0, m2 - shift) * s12
        )
    s1 = s1 * a + s12 * b
    if BETA_IS_ONE:
        sb = s1
    else:
        sb = sb * tl.exp((m - shift) * inv_beta) + sb2 * tl.exp((m2 - shift) * inv_beta)
    return new_m, s1, sb, e


@triton.jit
def _metrics(m, s1, zt, e, before, label, ignore_index, vocab_size):
    """Entropy log S1 - E / S1 and top-1 (z_t == m, every column before the target below m)
    of a merged row (tofu_math.row_metrics): 0 for ignored rows, NaN for invalid labels."""
    ignored = label == ignore_index
    invalid = (~ignored) & ((label < 0) | (label >= vocab_size))
    keep = ~(ignored | invalid)
    s1 = tl.where(keep, s1, 1.0)
    entropy = tl.log(s1) - tl.where(keep, e, 0.0) / s1
    top1 = tl.where((zt >= m) & (zt > before), 1.0, 0.0)
    nan = float("nan")
    entropy = tl.where(invalid, nan, tl.where(keep, entropy, 0.0))
    top1 = tl.where(invalid, nan, tl.where(keep, top1, 0.0))
    return entropy, top1


@triton.jit
def _finalize(
    m, s1, sb, zt, label, ignore_index, vocab_size, gamma, beta, inv_beta, GAMMA_ZERO: tl.constexpr
):
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
def _row_slice_stats(
    x,
    n,
    span,
    t,
    inv_beta,
    BLOCK: tl.constexpr,
    THREADS: tl.constexpr,
    VEC: tl.constexpr,
    BETA_IS_ONE: tl.constexpr,
    METRICS: tl.constexpr,
):
    """(m, S1, Sb, E, BEFORE) of columns [0, n) of ``x`` (a row slice) in BLOCK-wide tiles
    (``span`` >= n columns visited; n <= 0 reads nothing): an online max and two fp32 sums,
    and with METRICS the entropy accumulator E = sum exp(z - m) (z - m) from the same
    exponentials and BEFORE, the max of the columns before column ``t`` (records.MetricAcc;
    0 and -inf otherwise).

    A tile is ``[BLOCK // (THREADS * VEC), THREADS, VEC]``: each of the THREADS lanes (one per
    thread) holds its own statistics, over its vectors of VEC columns (16 bytes on 16-byte-
    aligned rows, else 1 column), across the tiles; the lanes are merged once, at the end. So
    the loop has no block-wide reduction, and one rescale of each lane's sums per tile."""
    K: tl.constexpr = BLOCK // (THREADS * VEC)
    offs = (
        tl.arange(0, K)[:, None, None] * (THREADS * VEC)
        + tl.arange(0, THREADS)[None, :, None] * VEC
        + tl.arange(0, VEC)[None, None, :]
    )
    m = tl.full([THREADS], -float("inf"), tl.float32)
    s1 = tl.zeros([THREADS], tl.float32)
    sb = tl.zeros([THREADS], tl.float32)
    e = tl.zeros([THREADS], tl.float32)
    before = tl.full([THREADS], -float("inf"), tl.float32)
    for start in range(0, span, BLOCK):
        cols = start + offs
        z = tl.load(x + cols, mask=cols < n, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(tl.max(z, axis=2), axis=0))
        # An all -inf prefix keeps m = -inf: shift by 0 instead so exp() stays 0, not NaN.
        shift = tl.where(m_new == -float("inf"), 0.0, m_new)
        a = tl.exp(m - shift)
        d = z - shift[None, :, None]
        ex = tl.exp(d)
        if (
            METRICS
        ):  # moved to the new max (with the old S1), then this tile's terms; -inf columns add 0
            e = a * (e + tl.where(m == -float("inf"), 0.0, m - shift) * s1)
            e += tl.sum(tl.sum(ex * tl.maximum(d, -_FLT_MAX), axis=2), axis=0)
            before = tl.maximum(
                before, tl.max(tl.max(tl.where(cols < t, z, -float("inf")), axis=2), axis=0)
            )
        s1 = s1 * a + tl.sum(tl.sum(ex, axis=2), axis=0)
        if not BETA_IS_ONE:
            sb = sb * tl.exp((m - shift) * inv_beta) + tl.sum(
                tl.sum(tl.exp(d * inv_beta), axis=2), axis=0
            )
        m = m_new
    # the one merge of the lanes (a lane that saw no column is (-inf, 0, 0, 0, -inf))
    mm = tl.max(m, axis=0)
    shift = tl.where(mm == -float("inf"), 0.0, mm)
    a = tl.exp(m - shift)
    if METRICS:
        e = tl.sum(a * (e + tl.where(m == -float("inf"), 0.0, m - shift) * s1), axis=0)
        before = tl.max(before, axis=0)
    else:
        e = 0.0
        before = -float("inf")
    s1_all = tl.sum(s1 * a, axis=0)
    if BETA_IS_ONE:
        sb_all = s1_all
    else:
        sb_all = tl.sum(sb * tl.exp((m - shift) * inv_beta), axis=0)
    return mm, s1_all, sb_all, e, before


# ------------------------------------------------------------------ two-pass path


@triton.jit
def stats_kernel(
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
    THREADS: tl.constexpr,  # the statistics' lanes and columns per vector (_row_slice_stats)
    VEC: tl.constexpr,
    BETA_IS_ONE: tl.constexpr,
    WRITE_META: tl.constexpr,
    METRICS: tl.constexpr,  # the metric accumulators after the records (records.Partials)
):
    inv_beta = tl.cast(
        inv_beta, tl.float32
    )  # under torch.compile, Inductor passes Python floats as fp64
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    x_row = X + _row_offset(row, n_inner, s_outer, s_inner)
    label = tl.load(LABELS + row).to(tl.int64)
    active = label != ignore_index  # ignored rows are not read; the epilogue masks them
    lo = tl.cast(split, tl.int64) * chunk  # int64: no 32-bit product feeds the address
    hi = tl.minimum(lo + chunk, n_valid)
    n = tl.where(active, hi - lo, 0).to(
        tl.int32
    )  # columns this program reads (<= chunk; <= 0: none)
    t = label - vocab_start
    t_here = tl.minimum(tl.maximum(t - lo, -1), chunk).to(
        tl.int32
    )  # the target's column in the slice
    m, s1, sb, e, before = _row_slice_stats(
        x_row + lo, n, chunk, t_here, inv_beta, BLOCK, THREADS, VEC, BETA_IS_ONE, METRICS
    )
    hit = active & (t >= lo) & (t < hi)
    zt = tl.load(x_row + t, mask=hit, other=0.0).to(tl.float32)
    n_splits = tl.num_programs(1)
    out = STATS + (row * n_splits + split) * _ST_WIDTH
    tl.store(out + _ST_M, m)
    tl.store(out + _ST_S1, s1)
    tl.store(out + _ST_SB, sb)
    tl.store(out + _ST_ZT, zt)
    if METRICS:
        n_parts = tl.num_programs(0).to(tl.int64) * n_splits
        acc = STATS + (n_parts + WRITE_META) * _ST_WIDTH + (row * n_splits + split) * _MA_WIDTH
        tl.store(acc + _MA_E, e)
        tl.store(acc + _MA_BEFORE, before)
    if WRITE_META:
        if (row == 0) & (split == 0):  # this rank's metadata record, as int32 bits
            meta = STATS + tl.num_programs(0).to(tl.int64) * n_splits * _ST_WIDTH
            idx = tl.arange(0, _ST_WIDTH)
            zero = tl.zeros([_ST_WIDTH], dtype=tl.int32)
            vals = tl.where(
                idx == _MT_START,
                zero + vocab_start,
                tl.where(
                    idx == _MT_END,
                    zero + meta_vocab_end,
                    tl.where(idx == _MT_WIDTH, zero + meta_width, zero + tl.num_programs(0)),
                ),
            )
            tl.store(meta + idx, vals.to(tl.float32, bitcast=True))


@triton.jit
def epilogue_kernel(
    PARTS,  # fp32 Partials.data
    LABELS,
    LOSS,  # fp32 [rows]
    CE,  # fp32 [rows]
    REC,  # fp32 [rows, len(GradParam)]
    RED,  # fp32 [len(Reduced)]
    MET,  # fp32 [rows, len(Metric)] (METRICS)
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
    REDUCTION: tl.constexpr,  # records.Reduction
    GAMMA_ZERO: tl.constexpr,
    BETA_IS_ONE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    METRICS: tl.constexpr,  # PARTS carries the metric accumulators, MET is written
):
    gamma, beta, inv_beta = (
        tl.cast(gamma, tl.float32),
        tl.cast(beta, tl.float32),
        tl.cast(inv_beta, tl.float32),
    )
    n_parts = tl.cast(n_rows, tl.int64) * splits  # int64: no 32-bit product feeds an address
    acc_off = (n_parts + HAS_META) * _ST_WIDTH
    if HAS_META:  # global vocab size: the largest vocab_end of the ranks' metadata records
        meta_off = n_parts * _ST_WIDTH
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
        e = tl.zeros([BLOCK_R], dtype=tl.float32)
        before = tl.full([BLOCK_R], -float("inf"), tl.float32)
        for w in range(0, world):
            for s in range(0, splits):
                rec = PARTS + w * rank_stride + (rows * splits + s) * _ST_WIDTH
                pm = tl.load(rec + _ST_M, mask=ok, other=-float("inf"))
                ps1 = tl.load(rec + _ST_S1, mask=ok, other=0.0)
                psb = tl.load(rec + _ST_SB, mask=ok, other=0.0)
                zt += tl.load(rec + _ST_ZT, mask=ok, other=0.0)
                pe = 0.0
                if METRICS:
                    acc = PARTS + w * rank_stride + acc_off + (rows * splits + s) * _MA_WIDTH
                    pe = tl.load(acc + _MA_E, mask=ok, other=0.0)
                    before = tl.maximum(
                        before, tl.load(acc + _MA_BEFORE, mask=ok, other=-float("inf"))
                    )
                m, s1, sb, e = _merge(
                    m, s1, sb, e, pm, ps1, psb, pe, inv_beta, BETA_IS_ONE, METRICS
                )
        label = tl.load(LABELS + rows, mask=ok, other=ignore_index).to(tl.int64)
        loss, ce, g, mm, log_sb, qt_m1 = _finalize(
            m, s1, sb, zt, label, ignore_index, vs, gamma, beta, inv_beta, GAMMA_ZERO
        )
        if METRICS:
            entropy, top1 = _metrics(m, s1, zt, e, before, label, ignore_index, vs)
            tl.store(MET + rows * _MX_WIDTH + _MX_ENTROPY, entropy, mask=ok)
            tl.store(MET + rows * _MX_WIDTH + _MX_TOP1, top1, mask=ok)
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
    if REDUCTION == _MEAN:  # mean over non-ignored tokens, at least one
        scale = 1.0 / tl.maximum(tl.sum(acc_n, axis=0), 1).to(tl.float32)
    else:
        scale = 1.0
    tl.store(RED + _RD_LOSS, tl.sum(acc_loss, axis=0) * scale)
    tl.store(RED + _RD_CE, tl.sum(acc_ce, axis=0) * scale)
    tl.store(RED + _RD_SCALE, scale)


@triton.jit
def grad_kernel(
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
    os_inner,  # row layouts of X and OUT (RowLayout)
    n_valid,
    width,
    vocab_start,  # the shard: real columns [0, n_valid) of width, global id of column 0
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
def count_kernel(LABELS, SCALE, n_rows, ignore_index, MEAN: tl.constexpr, BLOCK_R: tl.constexpr):
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
def grad_in_forward_kernel(
    X,
    OUT,  # the gradient: may alias X (every element is read in pass 2 before it is written)
    LABELS,
    LOSS,  # fp32 [rows]
    CE,  # fp32 [rows]
    SCALE,  # fp32 [1] from count_kernel
    MET,  # fp32 [rows, len(Metric)] (METRICS)
    n_inner,
    xs_outer,
    xs_inner,
    os_outer,
    os_inner,  # row layouts of X and OUT (RowLayout)
    width,  # whole rows
    ignore_index,
    gamma,
    beta,
    inv_beta,
    BLOCK: tl.constexpr,
    THREADS: tl.constexpr,  # the statistics' lanes and columns per vector (_row_slice_stats)
    VEC: tl.constexpr,
    BETA_IS_ONE: tl.constexpr,
    GAMMA_ZERO: tl.constexpr,
    METRICS: tl.constexpr,  # the metric accumulators, MET written
):
    gamma, beta, inv_beta = (
        tl.cast(gamma, tl.float32),
        tl.cast(beta, tl.float32),
        tl.cast(inv_beta, tl.float32),
    )
    row = tl.program_id(0).to(tl.int64)
    x_row = X + _row_offset(row, n_inner, xs_outer, xs_inner)
    o_row = OUT + _row_offset(row, n_inner, os_outer, os_inner)
    label = tl.load(LABELS + row).to(tl.int64)
    active = label != ignore_index
    # pass 1: the statistics
    t_here = tl.minimum(tl.maximum(label, -1), width).to(tl.int32)
    m, s1, sb, e, before = _row_slice_stats(
        x_row,
        tl.where(active, width, 0),
        width,
        t_here,
        inv_beta,
        BLOCK,
        THREADS,
        VEC,
        BETA_IS_ONE,
        METRICS,
    )
    hit = active & (label >= 0) & (label < width)
    zt = tl.load(x_row + label, mask=hit, other=0.0).to(tl.float32)
    loss, ce, g, mm, log_sb, qt_m1 = _finalize(
        m, s1, sb, zt, label, ignore_index, width, gamma, beta, inv_beta, GAMMA_ZERO
    )
    if METRICS:
        entropy, top1 = _metrics(m, s1, zt, e, before, label, ignore_index, width)
        tl.store(MET + row * _MX_WIDTH + _MX_ENTROPY, entropy)
        tl.store(MET + row * _MX_WIDTH + _MX_TOP1, top1)
    tl.store(LOSS + row, loss)
    tl.store(CE + row, ce)
    coef = tl.load(SCALE) * g
    limit = tl.where(coef != 0.0, width, 0)
    t = tl.where(hit, label, -1)
    n_tiles = tl.cdiv(width, BLOCK)
    for k in range(0, n_tiles):  # pass 2: the gradient, last tile first (still in L2)
        cols = (n_tiles - 1 - k) * BLOCK + tl.arange(0, BLOCK)
        z = tl.load(x_row + cols, mask=cols < limit, other=-float("inf")).to(tl.float32)
        q = tl.exp((z - mm) * inv_beta - log_sb)
        q = tl.where(cols == t, qt_m1, q)
        tl.store(o_row + cols, (coef * q).to(OUT.dtype.element_ty), mask=cols < width)


@triton.jit
def reduce_kernel(LOSS, CE, SCALE, RED, n_rows, BLOCK_R: tl.constexpr):
    acc_loss = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc_ce = tl.zeros([BLOCK_R], dtype=tl.float32)
    for r0 in range(0, n_rows, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        acc_loss += tl.load(LOSS + rows, mask=rows < n_rows, other=0.0)
        acc_ce += tl.load(CE + rows, mask=rows < n_rows, other=0.0)
    scale = tl.load(SCALE)
    tl.store(RED + _RD_LOSS, tl.sum(acc_loss, axis=0) * scale)
    tl.store(RED + _RD_CE, tl.sum(acc_ce, axis=0) * scale)
    tl.store(RED + _RD_SCALE, scale)


@triton.jit
def rescale_kernel(
    OUT, GRAD_OUT, n_rows, n_inner, os_outer, os_inner, width, n_tiles, BLOCK: tl.constexpr
):
    """OUT *= grad_out, over a persistent grid; returns at once when grad_out == 1. The work
    items (row, tile) are counted in int64: no 32-bit product feeds an address."""
    s = tl.load(GRAD_OUT).to(tl.float32)
    if s != 1.0:
        cols = tl.arange(0, BLOCK)
        for work in range(
            tl.program_id(0).to(tl.int64), tl.cast(n_rows, tl.int64) * n_tiles, tl.num_programs(0)
        ):
            start = (work % n_tiles) * BLOCK
            o_tile = OUT + _row_offset(work // n_tiles, n_inner, os_outer, os_inner) + start
            left = (width - start).to(tl.int32)  # the row's columns from this tile on
            v = tl.load(o_tile + cols, mask=cols < left, other=0.0).to(tl.float32)
            tl.store(o_tile + cols, (v * s).to(OUT.dtype.element_ty), mask=cols < left)
