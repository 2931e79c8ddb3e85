"""The TOFU math on the :mod:`~tofu_kernels.records`, in plain torch (docs/design.md section
2): what the torch backend runs, and what ``triton_kernels._finalize`` and ``csrc/tofu_math.cuh``
(tested against it) write again."""

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
    """Per-row outputs of :func:`finalize_stats` (fp32 [N]); ``tofu::RowOut``'s fields."""

    loss: torch.Tensor  # -g * beta * log q_t; 0 for ignored rows, NaN for invalid labels
    ce: torch.Tensor  # plain cross entropy LSE(z) - z_t (for logging perplexity)
    g: torch.Tensor  # focal weight; 0 for ignored rows, NaN for invalid labels
    m: torch.Tensor  # global row max (0 for ignored rows, so the backward stays finite)
    log_sb: torch.Tensor  # log Sb, so q_j = exp((z_j - m) / beta - log_sb)
    qt_m1: torch.Tensor  # q_t - 1 = expm1(log q_t), exact near q_t = 1


def focal_weight(log_p: torch.Tensor, gamma: float) -> torch.Tensor:
    """Focal weight g(p) = (1-p)^gamma - gamma p (1-p)^(gamma-1) log p, in ``log_p``'s dtype.

    Written ``om^gamma * (1 + gamma * p * r)``, ``om = -expm1(log p)``, ``r = -log p / om``
    (-> 1 as p -> 1), finite everywhere where the direct formula gives 0 * inf (the
    derivation and limits: docs/design.md section 2).
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
    """``exp(d) d`` from ``d = z - m`` and ``e = exp(d)`` (no new exponential); 0 at
    ``d = -inf``, the limit, never ``0 * -inf``."""
    return e * d.clamp(min=-torch.finfo(d.dtype).max)


def before_target_max(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """:attr:`MetricAcc.BEFORE` of rows ``z[N, C]``: the largest logit before column
    ``t[N]`` (any integer, relative to ``z``'s first column), -inf if none."""
    cols = torch.arange(z.shape[-1], device=z.device)
    return torch.where(cols < t.unsqueeze(-1), z, -math.inf).amax(dim=-1)


def combine_stats(stats: torch.Tensor, beta: float, dim: int, accs: torch.Tensor | None = None):
    """Merge partial :class:`Stat` records along ``dim`` (vocab splits or TP ranks), which
    the result drops: ``M = max m_r``, ``S1 = sum S1_r exp(m_r - M)``, ``Sb`` likewise at
    ``1 / beta``, ``z_t = sum zt_r``; an empty part adds 0. With ``accs`` (the parts'
    :class:`MetricAcc` records) returns ``(stats, accs)`` merged: ``E = sum exp(m_r - M)
    (E_r + (m_r - M) S1_r)``, ``BEFORE = max BEFORE_r``.
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
    """Loss, focal weight and backward scalars from merged records ``stats[N, len(Stat)]``;
    a global label neither ``ignore_index`` nor in ``[0, vocab_size)`` gives NaN (never a
    plausible number: no host check runs under CUDA graphs or torch.compile)."""
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
    statistics and :class:`~tofu_kernels.records.MetricAcc` records; 0 for ignored rows,
    NaN for invalid labels."""
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
