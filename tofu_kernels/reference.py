"""The float64 specification of the TOFU loss, and the paper authors' formulation.

:func:`tofu_loss_reference` is the oracle the tests and benchmarks compare every backend
against: two float64 log-softmaxes and the paper's focal weight written term by term, so
it shares no code with the fast path (:mod:`tofu_kernels.tofu_math`, the kernels).
:func:`authors_tofu_loss` is the formulation of the paper's PyTorch code (two fp32
log-softmaxes, autograd through N x V temporaries), kept as a baseline, not a spec.
Nothing in the fast path imports this module.
"""

from __future__ import annotations

import torch

from .params import DEFAULT_BETA, DEFAULT_GAMMA, DEFAULT_IGNORE_INDEX

__all__ = ["spec_focal_weight", "tofu_loss_reference", "authors_tofu_loss"]


def spec_focal_weight(log_p: torch.Tensor, gamma: float) -> torch.Tensor:
    """g(p) = (1-p)^gamma - gamma p (1-p)^(gamma-1) log p, term by term, with its limits.

    In the dtype of ``log_p`` (float64 for the spec). ``1 - p`` is ``-expm1(log p)`` so it
    is exact near p = 1. Where a term is 0 * inf the limit is taken explicitly: p = 1
    gives g = 0 (gamma > 0), p = 0 gives g = 1 (p log p -> 0); gamma = 0 gives g = 1.
    """
    if gamma == 0.0:
        return torch.ones_like(log_p)
    p = log_p.exp()
    om = -torch.expm1(log_p)
    g = om.pow(gamma) - gamma * p * om.pow(gamma - 1.0) * log_p
    g = torch.where(om == 0, 0.0, g)
    return torch.where(p == 0, 1.0, g)


def tofu_loss_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
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
    g = spec_focal_weight(log_p.detach(), gamma)
    loss = torch.where(valid, -g * beta * log_q, 0.0)
    ce = torch.where(valid, -log_p.detach(), 0.0)
    return loss, ce


def authors_tofu_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
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
