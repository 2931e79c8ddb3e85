"""The float64 specification of the TOFU loss (the oracle every backend is tested against;
it shares no code with the fast path, and nothing in the fast path imports it) and the
paper authors' formulation (a baseline, not a spec)."""

from __future__ import annotations

import torch

from .params import DEFAULT_BETA, DEFAULT_GAMMA, DEFAULT_IGNORE_INDEX

__all__ = ["spec_focal_weight", "tofu_loss_reference", "authors_tofu_loss"]


def spec_focal_weight(log_p: torch.Tensor, gamma: float) -> torch.Tensor:
    """g(p) = (1-p)^gamma - gamma p (1-p)^(gamma-1) log p term by term, in ``log_p``'s dtype,
    with ``1 - p = -expm1(log p)`` and the limits explicit: g = 0 at p = 1 (gamma > 0),
    g = 1 at p = 0 or gamma = 0."""
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
    """Float64 spec: per-token (loss, cross entropy) in ``labels``' shape, 0 at ignored
    tokens. Differentiable with g detached: its autograd is the reference gradient.
    ``compute_dtype=torch.float32``: plain PyTorch in fp32 (the tests' yardstick)."""
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
    """The paper's PyTorch formulation (per-token loss): fp32 log-softmaxes, the direct
    focal formula (NaN at confident tokens for gamma < 1), autograd through N x V fp32
    temporaries."""
    z = logits.float()
    valid = labels != ignore_index
    t = torch.where(valid, labels, 0).unsqueeze(-1)
    log_p = torch.log_softmax(z, dim=-1).gather(-1, t).squeeze(-1)
    log_q = torch.log_softmax(z / beta, dim=-1).gather(-1, t).squeeze(-1)
    with torch.no_grad():
        p = log_p.exp()
        g = (1 - p) ** gamma - gamma * p * (1 - p) ** (gamma - 1) * log_p
    return torch.where(valid, -g * beta * log_q, 0.0)
