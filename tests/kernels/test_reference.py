"""The math module itself: focal weight, statistics combine, reference vs known losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import tofu_kernels as tk
from tofu_kernels.tofu_math import combine_stats, finalize_stats


def direct_g(p: float, gamma: float) -> float:
    """The paper's formula, evaluated where it is well defined (0 < p < 1)."""
    return (1 - p) ** gamma - gamma * p * (1 - p) ** (gamma - 1) * math.log(p)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 3.0, 4.5])
@pytest.mark.parametrize("p", [1e-30, 1e-6, 0.1, 0.5, 0.9, 1 - 1e-7])
def test_focal_weight_matches_direct_formula(gamma, p):
    g = tk.focal_weight(torch.tensor([math.log(p)], dtype=torch.float64), gamma).item()
    assert g == pytest.approx(direct_g(p, gamma), rel=1e-9, abs=1e-300)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 3.0, 4.5])
def test_focal_weight_limits_are_finite(dtype, gamma):
    lp = torch.tensor([0.0, -1e-30, -1e-7, -math.log(2), -70.0, -1e4, -math.inf], dtype=dtype)
    g = tk.focal_weight(lp, gamma)
    assert torch.isfinite(g).all()
    if gamma == 0:
        assert (g == 1).all()
    else:
        assert g[0] == 0  # p = 1: the focal weight switches the token off
        assert g[-1] == 1 and g[-2] == pytest.approx(1.0)  # p -> 0: g -> 1
    assert (g >= 0).all()


def test_authors_formula_is_nan_at_confident_tokens():
    z = torch.tensor([[60.0, 0.0, 0.0]])
    y = torch.tensor([0])
    # NaN for 0 < gamma < 1 ((1-p)^(gamma-1) = inf times log p = 0). At gamma = 1 torch
    # evaluates 0^0 = 1, so the NaN region is gamma < 1, not gamma <= 1.
    for gamma in (0.25, 0.5):
        assert torch.isnan(tk.authors_tofu_loss(z, y, gamma=gamma)).all()
        assert torch.isfinite(tk.tofu_loss_reference(z, y, gamma=gamma)[0]).all()


def test_reference_gamma0_beta1_is_cross_entropy():
    z = torch.randn(7, 33, dtype=torch.float64)
    y = torch.randint(0, 33, (7,))
    loss, ce = tk.tofu_loss_reference(z, y, gamma=0.0, beta=1.0)
    torch.testing.assert_close(loss, F.cross_entropy(z, y, reduction="none"))
    torch.testing.assert_close(ce, loss)


def test_reference_gradient_is_closed_form():
    """d loss / dz = g * (softmax(z / beta) - onehot), beta cancelling."""
    z = torch.randn(5, 20, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 20, (5,))
    gamma, beta = 3.0, 0.8
    tk.tofu_loss_reference(z, y, gamma, beta)[0].sum().backward()
    with torch.no_grad():
        log_p = torch.log_softmax(z, -1).gather(1, y[:, None]).squeeze(1)
        g = tk.focal_weight(log_p, gamma)
        expect = g[:, None] * (torch.softmax(z / beta, -1) - F.one_hot(y, 20))
    torch.testing.assert_close(z.grad, expect)


def _stats(z: torch.Tensor, y: torch.Tensor, beta: float, start: int = 0) -> torch.Tensor:
    m = z.amax(-1)
    s1 = (z - m[:, None]).exp().sum(-1)
    sb = ((z - m[:, None]) / beta).exp().sum(-1)
    local = y - start
    hit = (local >= 0) & (local < z.shape[1])
    zt = torch.where(hit, z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1), 0.0)
    return torch.stack([m, s1, sb, zt], -1)


@pytest.mark.parametrize("beta", [0.5, 1.0, 1.7])
def test_combine_of_parts_equals_whole(beta):
    z = torch.randn(6, 40, dtype=torch.float64) * 4
    y = torch.randint(0, 40, (6,))
    whole = _stats(z, y, beta)
    parts = torch.stack([_stats(z[:, i : i + 10], y, beta, i) for i in range(0, 40, 10)], 1)
    torch.testing.assert_close(combine_stats(parts, beta, dim=1), whole)
    # a part that saw no column (m = -inf, S = 0) contributes nothing
    empty = torch.tensor([-math.inf, 0.0, 0.0, 0.0], dtype=torch.float64).expand(6, 1, 4)
    torch.testing.assert_close(combine_stats(torch.cat([parts, empty], 1), beta, dim=1), whole)


def test_finalize_matches_reference_and_masks():
    z = torch.randn(5, 12, dtype=torch.float64)
    y = torch.tensor([3, -100, 11, 12, -5])  # valid, ignored, valid, too large, negative
    res = finalize_stats(_stats(z, y, 0.8), y, 3.0, 0.8, -100, 12)
    ref_loss, ref_ce = tk.tofu_loss_reference(z[[0, 2]], y[[0, 2]])
    torch.testing.assert_close(res.loss[[0, 2]], ref_loss)
    torch.testing.assert_close(res.ce[[0, 2]], ref_ce)
    assert res.loss[1] == 0 and res.g[1] == 0 and res.ce[1] == 0
    assert torch.isnan(res.loss[3:]).all() and torch.isnan(res.g[3:]).all()
    for t in (res.m, res.log_sb, res.qt_m1):  # backward scalars stay finite
        assert torch.isfinite(t).all()


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 3.0, 4.5])
def test_spec_and_fast_path_focal_weights_agree(gamma):
    """The spec's term-by-term g and the fast path's log-space g are two derivations of one
    function: they agree to fp64 rounding everywhere, limits included."""
    from tofu_kernels.reference import spec_focal_weight

    lp = torch.tensor(
        [0.0, -1e-300, -1e-30, -1e-7, -0.01, -math.log(2), -5.0, -70.0, -700.0, -1e4, -math.inf],
        dtype=torch.float64,
    )
    spec, fast = spec_focal_weight(lp, gamma), tk.focal_weight(lp, gamma)
    assert torch.isfinite(spec).all()
    torch.testing.assert_close(spec, fast, rtol=1e-12, atol=1e-300)
