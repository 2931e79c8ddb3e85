"""The TOFU math, in one place (DESIGN.md section 2).

Every backend produces the same per-row statistics of the logits

    stats[..., 0] = m   = max_j z_j                      (over the columns it saw)
    stats[..., 1] = S1  = sum_j exp(z_j - m)
    stats[..., 2] = Sb  = sum_j exp((z_j - m) / beta)
    stats[..., 3] = z_t = the target logit, 0 when the target is not among its columns

and hands them to :func:`combine_stats` (vocab splits inside one kernel, or the
vocab-parallel ranks) and then :func:`finalize_stats`, which computes the loss, the
focal weight g and the few per-row scalars the backward needs. These O(N) functions are
plain torch, shared by every backend, so the math exists exactly once.

:func:`tofu_loss_reference` is the float64 specification the tests and benchmarks
compare against; :func:`authors_tofu_loss` is the formulation of the paper's PyTorch
code (two fp32 log-softmaxes, autograd through N x V temporaries), kept as a baseline.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "focal_weight",
    "combine_stats",
    "finalize_stats",
    "RowResult",
    "tofu_loss_reference",
    "authors_tofu_loss",
]

N_STATS = 4


def focal_weight(log_p: torch.Tensor, gamma: float) -> torch.Tensor:
    """Detached focal weight g(p) = (1-p)^gamma - gamma p (1-p)^(gamma-1) log p.

    Evaluated in log space so that it is finite everywhere (the direct formula gives
    0 * inf = NaN at p -> 1 for gamma < 1 and 0 * -inf at p -> 0):

        om = 1 - p = -expm1(log p)          (no cancellation near p = 1)
        g  = om^gamma * (1 + gamma * p * r),  r = -log p / om  (-> 1 as p -> 1)

    which is the same expression as om^(gamma-1) * (om - gamma p log p). Limits:
    g = 1 for gamma = 0; g -> 0 as p -> 1 for gamma > 0; p * r -> 0 as p -> 0.
    Computed in the dtype of ``log_p`` (fp32 in the kernels, fp64 in the reference).
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


def combine_stats(stats: torch.Tensor, beta: float, dim: int) -> torch.Tensor:
    """Merge partial row statistics along ``dim`` (vocab splits or TP ranks).

    ``stats[..., 4]`` as described in the module docstring; the result drops ``dim``.
    ``M = max m_r``, ``S1 = sum S1_r exp(m_r - M)``, ``Sb = sum Sb_r exp((m_r - M)/beta)``,
    ``z_t = sum zt_r``. A part that saw no column (m_r = -inf, S = 0) contributes 0.
    """
    m, s1, sb, zt = stats.unbind(-1)
    big_m = m.amax(dim=dim, keepdim=True)
    safe = torch.where(big_m == -math.inf, 0.0, big_m)
    scale = torch.exp(m - safe)
    out_s1 = (s1 * scale).sum(dim)
    if beta == 1.0:
        out_sb = out_s1
    else:
        out_sb = (sb * torch.exp((m - safe) / beta)).sum(dim)
    return torch.stack([big_m.squeeze(dim), out_s1, out_sb, zt.sum(dim)], dim=-1)


class RowResult(NamedTuple):
    """Per-row outputs of :func:`finalize_stats` (all fp32, shape [N])."""

    loss: torch.Tensor  # -g * beta * log q_t; 0 for ignored rows, NaN for invalid labels
    ce: torch.Tensor  # plain cross entropy LSE(z) - z_t (for logging perplexity)
    g: torch.Tensor  # focal weight; 0 for ignored rows, NaN for invalid labels
    m: torch.Tensor  # global row max (0 for ignored rows, so the backward stays finite)
    log_sb: torch.Tensor  # log Sb, so q_j = exp((z_j - m) / beta - log_sb)
    qt_m1: torch.Tensor  # q_t - 1 = expm1(log q_t), exact near q_t = 1


def finalize_stats(
    stats: torch.Tensor,
    labels: torch.Tensor,
    gamma: float,
    beta: float,
    ignore_index: int,
    vocab_size: int | torch.Tensor,
) -> RowResult:
    """Loss, focal weight and backward scalars from combined statistics ``stats[N, 4]``.

    ``labels`` are global ids; a label that is neither ``ignore_index`` nor in
    ``[0, vocab_size)`` yields NaN loss and g (never a plausible number), which is all a
    kernel can do where no host check is possible (CUDA graphs, torch.compile).
    """
    m, s1, sb, zt = stats.unbind(-1)
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


def tofu_loss_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gamma: float = 3.0,
    beta: float = 0.8,
    ignore_index: int = -100,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 specification: per-token (loss, cross entropy), shape of ``labels``.

    Differentiable in ``logits`` with g detached, so autograd of this function is the
    reference gradient g * (q - onehot) * upstream, derived independently of the
    closed form the kernels use. Ignored tokens give 0. ``compute_dtype=torch.float32``
    gives what plain PyTorch achieves in fp32 (the yardstick of the test tolerances).
    """
    z = logits.to(compute_dtype)
    valid = labels != ignore_index
    t = torch.where(valid, labels, 0).unsqueeze(-1)
    log_p = torch.log_softmax(z, dim=-1).gather(-1, t).squeeze(-1)
    log_q = torch.log_softmax(z / beta, dim=-1).gather(-1, t).squeeze(-1)
    g = focal_weight(log_p.detach(), gamma)
    loss = torch.where(valid, -g * beta * log_q, 0.0)
    ce = torch.where(valid, -log_p.detach(), 0.0)
    return loss, ce


def authors_tofu_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gamma: float = 3.0,
    beta: float = 0.8,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The paper's PyTorch formulation (per-token loss), as users would run it today.

    fp32 log-softmax at temperature 1 and beta, direct focal formula (NaN at confident
    tokens for gamma < 1, where (1 - p)^(gamma - 1) = inf multiplies log p = 0),
    autograd through N x V fp32 temporaries. A baseline, not a spec.
    """
    z = logits.float()
    valid = labels != ignore_index
    t = torch.where(valid, labels, 0).unsqueeze(-1)
    log_p = torch.log_softmax(z, dim=-1).gather(-1, t).squeeze(-1)
    log_q = torch.log_softmax(z / beta, dim=-1).gather(-1, t).squeeze(-1)
    with torch.no_grad():
        p = log_p.exp()
        g = (1 - p) ** gamma - gamma * p * (1 - p) ** (gamma - 1) * log_p
    return torch.where(valid, -g * beta * log_q, 0.0)
