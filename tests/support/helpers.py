"""Shared test helpers: logits in chosen confidence regimes, the fp64 reference, the tolerance
table and the asserts that use it (per tensor, and per parameter name)."""

from __future__ import annotations

import math

import torch

import tofu_kernels as tk

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Gradient tolerance per logits dtype, per element: |ours - ref| <= rtol*|ref| + atol*max|ref|.
# The reference is float64 autograd on the same (already rounded) logits, so the only
# error sources are our fp32 arithmetic and the final cast to the logits dtype.
# rtol is one unit in the last place of the dtype: twice PyTorch's own rounding error of
# the exact result (Triton's interpreter casts fp32 -> bf16 by truncation, which
# costs up to one ulp; the GPU rounds to nearest, half an ulp).
# fp32: exp/log in fp32 over arguments up to |(z - m) / beta| ~ 100 give ~1e-6
# relative; atol is relative to the largest gradient entry of the tensor.
GRAD_TOL = {
    torch.float32: (1e-5, 1e-6),
    torch.bfloat16: (2.0**-7, 1e-6),
    torch.float16: (2.0**-10, 1e-6),
}
# The loss is fp32 whatever the logits dtype: statistics in fp32 of exact inputs.
# |log q_t| up to ~100 at hopeless tokens; log(S) of sums of V terms loses ~V*eps/2.
LOSS_RTOL, LOSS_ATOL = 2e-5, 2e-6


def assert_grad_close(
    ours: torch.Tensor,
    ref: torch.Tensor,
    dtype: torch.dtype,
    torch_fp32: torch.Tensor | None = None,
    roundings: int = 1,
) -> None:
    """Per-element bound from GRAD_TOL, or twice plain PyTorch's fp32 error if larger.

    ``torch_fp32`` is the gradient PyTorch computes in fp32 (cast to ``dtype``): where
    fp32 itself cannot resolve the answer (p = 1 - 1e-7 makes 1 + 1e-7 round to 1 in
    every fp32 log-sum-exp), we ask for no more than 2x what PyTorch achieves.
    ``roundings``: how many times the result was cast to ``dtype`` (2 for a gradient made
    in the forward and then multiplied by an upstream gradient other than 1); each cast
    costs up to one ulp (the interpreter truncates).
    """
    rtol, atol = GRAD_TOL[dtype]
    rtol *= roundings
    ours, ref = ours.double(), ref.double()
    scale = ref.abs().max().item()
    # Values below the dtype's smallest subnormal are not representable at all (fp16).
    floor = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    bound = rtol * ref.abs() + atol * scale + floor
    if torch_fp32 is not None:
        bound = bound.clamp(min=2 * (torch_fp32.double() - ref).abs().max().item())
    err = (ours - ref).abs()
    assert torch.isfinite(ours).all(), "non-finite gradient"
    worst = (err / bound).max().item()
    assert worst <= 1.0, f"gradient error {err.max().item():.3e} exceeds tolerance ({worst:.2f}x)"


def assert_loss_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    ours, ref = ours.double(), ref.double()
    assert torch.isfinite(ours).all(), "non-finite loss"
    err = (ours - ref).abs()
    bound = LOSS_RTOL * ref.abs() + LOSS_ATOL
    assert (err <= bound).all(), (
        f"loss error {err.max().item():.3e} (worst at {err.argmax().item()})"
    )


def assert_params_close(
    got,
    want: dict,
    *,
    dtype: torch.dtype | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    norm_rtol: float | None = None,
    at_least: int = 1,
    what: str = "gradient",
) -> None:
    """Tensors by parameter name (gradients, or weights after some steps) against ``want``.

    ``got``: a dict, or a module (its trainable parameters' gradients). The names must be the
    same in both, at least ``at_least`` of them; then each tensor within one bound:
    ``dtype``: ``assert_grad_close``'s per-element table (``want`` is the float64 or fp32
    reference); ``rtol``/``atol``: ``torch.testing.assert_close``; ``norm_rtol``: normwise,
    ``||got - want|| / ||want|| < norm_rtol`` (two roundings of the same low-precision sum).
    """
    if isinstance(got, torch.nn.Module):
        got = {n: p.grad for n, p in got.named_parameters() if p.requires_grad}
    assert set(got) == set(want) and len(got) >= at_least, (
        what,
        sorted(set(got) ^ set(want)),
        len(got),
    )
    assert [dtype is not None, rtol is not None or atol is not None, norm_rtol is not None].count(
        True
    ) == 1
    for name in want:
        if dtype is not None:
            try:
                assert_grad_close(got[name].cpu(), want[name].double().cpu(), dtype)
            except AssertionError as e:
                raise AssertionError(f"{what} {name}: {e}") from None
        elif norm_rtol is not None:
            g, w = got[name].double().cpu(), want[name].double().cpu()
            rel = ((g - w).norm() / w.norm()).item()
            assert rel < norm_rtol, (what, name, rel)
        else:
            torch.testing.assert_close(
                got[name],
                want[name],
                rtol=rtol,
                atol=atol,
                msg=lambda m: f"{what} {name}: {m}",  # noqa: B023
            )


def gpu_backends() -> tuple[str, ...]:
    """The backends a GPU test runs: Triton, and the CUDA extension where it is built."""
    return ("triton",) + (("cuda",) if tk.extension_loaded() else ())


def make_logits(shape, vocab, dtype, regime="random", labels=None, scale=3.0):
    """Logits [*shape, vocab] and labels [*shape] with the target probability set by regime.

    random: N(0, scale^2) logits; confident: target 40 above the rest (p = 1 in fp32);
    near_one: p = 1 - ~1e-7; half: p = 0.5; hopeless: target 40 below the max
    (p ~ 1e-18); tiny: p ~ 1e-30 (target 70 below).
    """
    z = torch.randn(*shape, vocab, dtype=torch.float64) * scale
    if labels is None:
        labels = torch.randint(0, vocab, tuple(shape))
    t = labels.clamp(min=0).unsqueeze(-1)
    others = z.scatter(-1, t, -math.inf)
    lse_others = torch.logsumexp(others, dim=-1, keepdim=True)
    top = others.amax(dim=-1, keepdim=True)
    target = {
        "random": z.gather(-1, t),
        "confident": top + 40.0,
        "near_one": lse_others + 16.0,
        "half": lse_others,
        "hopeless": top - 40.0,
        "tiny": top - 70.0,
    }[regime]
    z = z.scatter(-1, t, target)
    return z.to(dtype), labels


def run(logits, labels, backend, upstream=None, **kw):
    """Our loss per token and d(sum(loss * upstream))/d logits."""
    x = logits.detach().clone().requires_grad_()
    loss = tk.tofu_loss(x, labels, reduction="none", backend=backend, **kw)
    w = torch.ones_like(loss) if upstream is None else upstream
    (loss * w).sum().backward()
    return loss.detach(), x.grad


def reference(logits, labels, upstream=None, compute_dtype=torch.float64, **kw):
    """fp64 (loss, grad, ce); with compute_dtype=float32, what plain PyTorch achieves."""
    x = logits.detach().to(compute_dtype).requires_grad_()
    loss, ce = tk.tofu_loss_reference(x, labels, compute_dtype=compute_dtype, **kw)
    w = torch.ones_like(loss) if upstream is None else upstream.to(compute_dtype)
    (loss * w).sum().backward()
    grad = x.grad if compute_dtype == torch.float64 else x.grad.to(logits.dtype)
    return loss.detach(), grad, ce
