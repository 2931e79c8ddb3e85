"""The TOFU math of the fast path, in one place (docs/design.md section 2).

Every backend computes, in one read of the logits, the per-row statistics record
(:class:`~tofu_kernels.records.Stat`: m, S1, Sb, z_t), merges partial records with
:func:`combine_stats` (vocab splits inside one kernel, or tensor-parallel ranks), and turns
the merged record into the loss, the focal weight and the backward's per-row record with
:func:`finalize_stats`. Here they are plain torch, which the torch backend runs; the Triton
kernels write the same formulas (``triton_kernels._finalize``) and ``csrc/tofu_math.cuh`` is
their CUDA twin (same records, same formulas; ``tests/kernels/test_cuda_ext.py`` ties the two
together). The records themselves are named in :mod:`tofu_kernels.records`.

The float64 specification the tests compare against is elsewhere
(:mod:`tofu_kernels.reference`); nothing in the fast path imports it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .records import Metric, MetricAcc, Stat

__all__ = [
    "RowResult",
    "before_target_max",
    "combine_stats",
    "entropy_terms",
    "finalize_stats",
    "focal_weight",
    "row_metrics",
]


class RowResult(NamedTuple):
    """Per-row outputs of :func:`finalize_stats` (fp32, shape [N]); ``tofu::RowOut`` in
    ``csrc/tofu_math.cuh`` has the same fields in the same order."""

    loss: torch.Tensor  # -g * beta * log q_t; 0 for ignored rows, NaN for invalid labels
    ce: torch.Tensor  # plain cross entropy LSE(z) - z_t (for logging perplexity)
    g: torch.Tensor  # focal weight; 0 for ignored rows, NaN for invalid labels
    m: torch.Tensor  # global row max (0 for ignored rows, so the backward stays finite)
    log_sb: torch.Tensor  # log Sb, so q_j = exp((z_j - m) / beta - log_sb)
    qt_m1: torch.Tensor  # q_t - 1 = expm1(log q_t), exact near q_t = 1


def focal_weight(log_p: torch.Tensor, gamma: float) -> torch.Tensor:
    """Detached focal weight g(p) = (1-p)^gamma - gamma p (1-p)^(gamma-1) log p.

    Evaluated in log space so that it is finite everywhere (the direct formula gives
    0 * inf = NaN at p -> 1 for gamma < 1 and 0 * -inf at p -> 0):

        om = 1 - p = -expm1(log p)          (no cancellation near p = 1)
        g  = om^gamma * (1 + gamma * p * r),  r = -log p / om  (-> 1 as p -> 1)

    which is the same expression as om^(gamma-1) * (om - gamma p log p). Limits:
    g = 1 for gamma = 0; g -> 0 as p -> 1 for gamma > 0; p * r -> 0 as p -> 0.
    Computed in the dtype of ``log_p`` (fp32 in the kernels).
    """
    if gamma == 0.0:
        return torch.ones_like(log_p)
    lp = log_p.clamp(max=0.0)
    p = lp.exp()
    om = -torch.expm1(lp)
    pos = om > 0
    r = torch.where(pos, -lp / torch.where(pos, om, 1.0), 1.0)
    pr = torch.where(p > 0, p * r, 0.0)  # p == 0 only when log p == -inf: p * r -> 0
    return torch.exp(gamma * torch.log(om)) * (1.0 + gamma * pr)


def entropy_terms(d: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """The entropy accumulator's terms ``exp(z_j - m) (z_j - m)`` from ``d = z_j - m`` and
    ``e = exp(d)``: no new exponential. ``d = -inf`` (a -inf logit, a masked column) gives 0,
    the limit, never ``0 * -inf``."""
    return e * d.clamp(min=-torch.finfo(d.dtype).max)


def before_target_max(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """:attr:`MetricAcc.BEFORE` of rows ``z[N, C]``: the largest logit among the columns
    before each row's target column ``t[N]`` (relative to ``z``'s first column; any
    integer: all columns count when ``t >= C``, none when ``t <= 0``), -inf if none."""
    cols = torch.arange(z.shape[-1], device=z.device)
    return torch.where(cols < t.unsqueeze(-1), z, -math.inf).amax(dim=-1)


def combine_stats(stats: torch.Tensor, beta: float, dim: int, accs: torch.Tensor | None = None):
    """Merge partial :class:`Stat` records along ``dim`` (vocab splits or TP ranks).

    ``M = max m_r``, ``S1 = sum S1_r exp(m_r - M)``, ``Sb = sum Sb_r exp((m_r - M)/beta)``,
    ``z_t = sum zt_r``. A part that saw no column (m_r = -inf, S = 0) contributes 0.
    The result drops ``dim``. With ``accs`` (the parts' :class:`MetricAcc` records, ``stats``'
    shape with a last dim of ``len(MetricAcc)``), also the merged accumulators: returns
    ``(stats, acc)`` with ``E = sum exp(m_r - M) (E_r + (m_r - M) S1_r)`` (each part's
    ``E_r = sum exp(z - m_r) (z - m_r)`` moved to the common max) and ``BEFORE = max_r
    BEFORE_r``.
    """
    m, s1, sb, zt = (stats[..., f] for f in Stat)
    big_m = m.amax(dim=dim, keepdim=True)
    safe = torch.where(big_m == -math.inf, 0.0, big_m)
    scale = torch.exp(m - safe)
    out_s1 = (s1 * scale).sum(dim)
    if beta == 1.0:
        out_sb = out_s1
    else:
        out_sb = (sb * torch.exp((m - safe) / beta)).sum(dim)
    out = torch.stack([big_m.squeeze(dim), out_s1, out_sb, zt.sum(dim)], dim=-1)
    if accs is None:
        return out
    # each part's accumulator moved to the common max; an empty part (m_r = -inf) adds 0
    moved = scale * (accs[..., MetricAcc.E] + torch.where(m == -math.inf, 0.0, m - safe) * s1)
    fields = {MetricAcc.E: moved.sum(dim), MetricAcc.BEFORE: accs[..., MetricAcc.BEFORE].amax(dim)}
    return out, torch.stack([fields[f] for f in MetricAcc], dim=-1)


def finalize_stats(
    stats: torch.Tensor,
    labels: torch.Tensor,
    gamma: float,
    beta: float,
    ignore_index: int,
    vocab_size: int | torch.Tensor,
) -> RowResult:
    """Loss, focal weight and backward scalars from merged records ``stats[N, len(Stat)]``.

    ``labels`` are global ids; a label that is neither ``ignore_index`` nor in
    ``[0, vocab_size)`` yields NaN loss and g (never a plausible number), which is all a
    kernel can do where no host check is possible (CUDA graphs, torch.compile).
    """
    m, s1, sb, zt = (stats[..., f] for f in Stat)
    ignored = labels == ignore_index
    invalid = ~ignored & ((labels < 0) | (labels >= vocab_size))
    keep = ~(ignored | invalid)
    m = torch.where(keep, m, 0.0)
    zt_m = torch.where(keep, zt - m, 0.0)  # exact: both are fp32 copies of logits
    log_s1 = torch.where(keep, torch.log(s1), 0.0)
    log_sb = torch.where(keep, torch.log(sb), 0.0)
    log_p = zt_m - log_s1
    log_qt = zt_m / beta - log_sb
    g = focal_weight(log_p, gamma)
    nan = torch.full_like(m, math.nan)

    def mask(x: torch.Tensor) -> torch.Tensor:
        return torch.where(invalid, nan, torch.where(ignored, 0.0, x))

    return RowResult(
        loss=mask(-g * beta * log_qt),
        ce=mask(-log_p),
        g=mask(g),
        m=m,
        log_sb=log_sb,
        qt_m1=torch.where(keep, torch.expm1(log_qt), 0.0),
    )


def row_metrics(
    stats: torch.Tensor,
    accs: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    vocab_size: int | torch.Tensor,
) -> torch.Tensor:
    """The :class:`~tofu_kernels.records.Metric` records ``[N, len(Metric)]`` from merged
    statistics and :class:`~tofu_kernels.records.MetricAcc` records: entropy
    ``log S1 - E / S1`` (of the untempered softmax: ``-sum p log p`` with
    ``log p_j = (z_j - m) - log S1``), and top-1 ``z_t == m and BEFORE < m`` (the target is
    the first maximum: ``argmax == target``). 0 for ignored rows, NaN for invalid labels (as
    :func:`finalize_stats`)."""
    m, s1, zt = stats[..., Stat.M], stats[..., Stat.S1], stats[..., Stat.ZT]
    e, before = accs[..., MetricAcc.E], accs[..., MetricAcc.BEFORE]
    ignored = labels == ignore_index
    invalid = ~ignored & ((labels < 0) | (labels >= vocab_size))
    keep = ~(ignored | invalid)
    s1 = torch.where(keep, s1, 1.0)
    entropy = torch.log(s1) - torch.where(keep, e, 0.0) / s1
    top1 = ((zt >= m) & (zt > before)).to(torch.float32)
    fields = {Metric.ENTROPY: entropy, Metric.TOP1: top1}
    out = torch.stack([fields[f] for f in Metric], dim=-1)
    return torch.where(invalid.unsqueeze(-1), math.nan, torch.where(keep.unsqueeze(-1), out, 0.0))
