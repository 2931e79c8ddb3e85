"""tofu_loss against the float64 reference, every backend that runs here.

The Triton kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, see conftest),
so shapes stay small; the ``tiling`` fixture (tests/kernels/conftest.py) shrinks the kernels' tile sizes instead,
so a 300-column row still crosses several tiles and several vocab splits.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tofu_kernels as tk
from tests.support.helpers import (
    DTYPES,
    assert_grad_close,
    assert_loss_close,
    make_logits,
    reference,
    run,
)
from tests.support.megatron_utils import require_megatron_core

BACKENDS = ["torch", "triton"]
GAMMAS = [0.0, 0.5, 1.0, 3.0, 4.5]
BETAS = [0.5, 0.8, 1.0, 1.5]


# Shapes: one row (the smallest grid), an odd vocab just above a power of two, and a
# vocab of 300 that the `tiling` fixture cuts into 5-10 tiles and splits.
SHAPES = [((1,), 17), ((13,), 257), ((5,), 300)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,vocab", SHAPES)
def test_matches_reference_shapes(backend, dtype, shape, vocab):
    logits, labels = make_logits(shape, vocab, dtype)
    loss, grad = run(logits, labels, backend)
    ref_loss, ref_grad, _ = reference(logits, labels)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,vocab", SHAPES)
def test_triton_tilings(dtype, shape, vocab, tiling):
    logits, labels = make_logits(shape, vocab, dtype)
    labels[0] = vocab - 1  # target in the last (partial) tile
    loss, grad = run(logits, labels, "triton")
    ref_loss, ref_grad, _ = reference(logits, labels)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gamma", GAMMAS)
@pytest.mark.parametrize("beta", BETAS)
def test_gamma_beta_grid(backend, dtype, gamma, beta):
    logits, labels = make_logits((6,), 97, dtype)
    loss, grad = run(logits, labels, backend, gamma=gamma, beta=beta)
    ref_loss, ref_grad, _ = reference(logits, labels, gamma=gamma, beta=beta)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("regime", ["confident", "near_one", "half", "hopeless", "tiny"])
@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 3.0])
def test_confidence_regimes(backend, dtype, regime, gamma):
    """p = 1 (fp32), 1 - 1e-7, 0.5, 1e-18, 1e-30: finite everywhere, matches fp64."""
    logits, labels = make_logits((4,), 131, dtype, regime=regime)
    loss, grad = run(logits, labels, backend, gamma=gamma, beta=0.8)
    ref_loss, ref_grad, _ = reference(logits, labels, gamma=gamma, beta=0.8)
    _, torch_fp32, _ = reference(logits, labels, gamma=gamma, beta=0.8, compute_dtype=torch.float32)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, dtype, torch_fp32=torch_fp32)


def test_authors_formula_nan_where_ours_is_finite():
    """The paper's direct formula gives NaN at p = 1 for gamma < 1; ours gives g = 0."""
    logits, labels = make_logits((4,), 64, torch.float32, regime="confident")
    assert torch.isnan(tk.authors_tofu_loss(logits, labels, gamma=0.5)).all()
    ours = tk.tofu_loss(logits, labels, gamma=0.5, reduction="none")
    assert torch.isfinite(ours).all() and (ours == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gamma0_beta1_is_cross_entropy(backend, dtype):
    logits, labels = make_logits((9,), 203, dtype)
    labels[2] = -100
    x = logits.clone().requires_grad_()
    ours = tk.tofu_loss(x, labels, gamma=0.0, beta=1.0, backend=backend)
    ours.backward()
    xr = logits.double().requires_grad_()
    ref = F.cross_entropy(xr, labels, ignore_index=-100)
    ref.backward()
    assert_loss_close(ours, ref)
    assert_grad_close(x.grad, xr.grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_side_output(backend):
    logits, labels = make_logits((7,), 150, torch.bfloat16)
    labels[0] = -100
    loss, ce = tk.tofu_loss(logits, labels, backend=backend, reduction="none", return_ce=True)
    _, ref_ce = tk.tofu_loss_reference(logits, labels)
    assert_loss_close(ce, ref_ce)
    assert not ce.requires_grad
    ref_mean = F.cross_entropy(logits.double(), labels)
    mean_loss, mean_ce = tk.tofu_loss(logits, labels, backend=backend, return_ce=True)
    assert_loss_close(mean_ce, ref_mean)
    assert mean_loss.shape == mean_ce.shape == ()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_token_upstream_and_ignored(backend, dtype):
    """reduction='none' with arbitrary per-token weights, some tokens ignored."""
    logits, labels = make_logits((11,), 120, dtype)
    labels[[0, 5, 10]] = -100
    w = torch.randn(11)
    loss, grad = run(logits, labels, backend, upstream=w)
    ref_loss, ref_grad, _ = reference(logits, labels, upstream=w)
    assert (loss[[0, 5, 10]] == 0).all()
    assert (grad[[0, 5, 10]] == 0).all()
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index(backend):
    logits, labels = make_logits((6,), 50, torch.float32)
    labels[1] = 7777
    loss = tk.tofu_loss(logits, labels, ignore_index=7777, backend=backend, reduction="none")
    ref, _ = tk.tofu_loss_reference(logits, labels, ignore_index=7777)
    assert_loss_close(loss, ref)
    assert loss[1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions(backend, reduction):
    logits, labels = make_logits((3, 4), 90, torch.float32)
    labels[0, :3] = -100
    x = logits.clone().requires_grad_()
    out = tk.tofu_loss(x, labels, backend=backend, reduction=reduction)
    out.backward()
    xr = logits.double().requires_grad_()
    per_token, _ = tk.tofu_loss_reference(xr, labels)
    ref = per_token.sum() / (9 if reduction == "mean" else 1)
    ref.backward()
    assert out.dtype == torch.float32 and out.shape == ()
    assert_loss_close(out, ref)
    assert_grad_close(x.grad, xr.grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_ignored(backend, reduction):
    logits, _ = make_logits((5,), 40, torch.bfloat16)
    labels = torch.full((5,), -100)
    x = logits.clone().requires_grad_()
    out = tk.tofu_loss(x, labels, backend=backend, reduction=reduction)
    out.sum().backward()
    assert (out == 0).all() and torch.isfinite(out).all()
    assert (x.grad == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend):
    x = torch.randn(0, 33, requires_grad=True)
    labels = torch.zeros(0, dtype=torch.long)
    out = tk.tofu_loss(x, labels, backend=backend)
    out.backward()
    assert out.item() == 0.0 and x.grad.shape == (0, 33)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_sbv_transposed_view(backend, dtype):
    """Megatron's [s, b, v] logits seen as [b, s, v]: a strided view, read without a copy."""
    s, b, v = 5, 3, 77
    base, _ = make_logits((s, b), v, dtype)
    labels = torch.randint(0, v, (b, s))
    view = base.transpose(0, 1)
    assert not view.is_contiguous()
    w = torch.randn(b, s)
    loss, grad = run(view, labels, backend, upstream=w)
    ref_loss, ref_grad, _ = reference(view, labels, upstream=w)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "make_view",
    [
        pytest.param(lambda t: t[:, :, 3:80], id="vocab_slice"),  # row stride > width
        pytest.param(lambda t: t[::2], id="step_rows"),  # outer stride doubled
        pytest.param(lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2), id="col_major"),
        pytest.param(lambda t: t.permute(1, 0, 2)[:, ::2], id="three_groups"),  # copied once
    ],
)
def test_strided_inputs(backend, make_view):
    base, _ = make_logits((6, 4), 90, torch.float32)
    view = make_view(base)
    labels = torch.randint(0, view.shape[-1], view.shape[:-1])
    loss, grad = run(view, labels, backend)
    ref_loss, ref_grad, _ = reference(view, labels)
    assert_loss_close(loss, ref_loss)
    assert_grad_close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_not_modified(backend):
    logits, labels = make_logits((4, 3), 70, torch.bfloat16)
    x = logits.clone().requires_grad_()
    lab = labels.clone()
    tk.tofu_loss(x, lab, backend=backend).backward()
    assert torch.equal(x.detach(), logits) and torch.equal(lab, labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_inplace_backward(backend, dtype):
    """The gradient lands in the logits' storage and is still the right gradient."""
    logits, labels = make_logits((8,), 100, dtype)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1  # a non-leaf whose storage may be reused, as in Megatron
    loss = tk.tofu_loss(x, labels, backend=backend, inplace_backward=True)
    loss.backward()
    xr = logits.double().requires_grad_()
    per_token, _ = tk.tofu_loss_reference(xr, labels)
    per_token.mean().backward()
    assert_grad_close(leaf.grad, xr.grad, dtype)
    assert torch.equal(x.detach(), leaf.grad)  # storage now holds the gradient


def test_inplace_backward_refuses_a_leaf():
    """A leaf that requires grad is the user's own tensor (a parameter, an input): writing
    its gradient into it would silently change its values."""
    logits, labels = make_logits((4,), 30, torch.float32)
    leaf = logits.clone().requires_grad_()
    for fn in (
        lambda: tk.tofu_loss(leaf, labels, inplace_backward=True),
        lambda: tk.TOFULoss(inplace_backward=True)(leaf, labels),
        lambda: tk.vocab_parallel_tofu_loss(leaf, labels, inplace_backward=True),
    ):
        with pytest.raises(
            ValueError, match="inplace_backward=True would overwrite the values of `logits`"
        ):
            fn()
    assert torch.equal(leaf.detach(), logits) and leaf.grad is None
    tk.tofu_loss(
        leaf.detach(), labels, inplace_backward=True
    )  # no gradient wanted: nothing is written


@pytest.mark.parametrize(
    "grad_in_forward,match",
    [(False, "modified by an inplace operation"), (None, "computed in the forward")],
)
def test_second_backward_fails_loudly(grad_in_forward, match):
    """In place (two-pass), or with the gradient made in the forward: no silent wrong answer."""
    logits, labels = make_logits((3,), 20, torch.float32)
    x = logits.clone().requires_grad_() * 1
    loss = tk.tofu_loss(
        x, labels, inplace_backward=grad_in_forward is False, grad_in_forward=grad_in_forward
    )
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match=match):
        loss.backward()


# ----------------------------------------------------- gradient in the forward


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("upstream", [1.0, 0.37])
@pytest.mark.parametrize("inplace", [False, True])
def test_grad_in_forward_matches_reference(backend, dtype, reduction, upstream, inplace):
    """The fused path: loss and gradient vs fp64, an upstream of 1 (the rescale is skipped)
    and of 0.37 (it multiplies), ignored tokens, in place or into a new buffer."""
    logits, labels = make_logits((9,), 300, dtype)
    labels[[1, 4]] = -100
    leaf = logits.clone().requires_grad_()
    x = leaf * 1 if inplace else leaf
    loss = tk.tofu_loss(
        x,
        labels,
        backend=backend,
        reduction=reduction,
        inplace_backward=inplace,
        grad_in_forward=True,
        gamma=3.0,
        beta=0.8,
    )
    (loss * upstream).backward()
    xr = logits.double().requires_grad_()
    per_token, _ = tk.tofu_loss_reference(xr, labels)
    ref = per_token.sum() / (7 if reduction == "mean" else 1)
    (ref * upstream).backward()
    assert_loss_close(loss, ref)
    assert_grad_close(leaf.grad, xr.grad, dtype, roundings=1 if upstream == 1.0 else 2)
    assert (leaf.grad[[1, 4]] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("regime", ["confident", "near_one", "hopeless"])
@pytest.mark.parametrize("gamma,beta", [(0.0, 1.0), (0.5, 1.5), (3.0, 0.8)])
def test_grad_in_forward_regimes(backend, regime, gamma, beta, tiling):
    logits, labels = make_logits((5,), 300, torch.bfloat16, regime=regime)
    x = logits.clone().requires_grad_()
    loss, ce = tk.tofu_loss(
        x, labels, backend=backend, gamma=gamma, beta=beta, grad_in_forward=True, return_ce=True
    )
    loss.backward()
    xr = logits.double().requires_grad_()
    per_token, ref_ce = tk.tofu_loss_reference(xr, labels, gamma=gamma, beta=beta)
    per_token.mean().backward()
    torch_fp32 = (
        reference(logits, labels, compute_dtype=torch.float32, gamma=gamma, beta=beta)[1] / 5
    )
    assert_loss_close(loss, per_token.mean())
    assert_loss_close(ce, ref_ce.mean())
    assert_grad_close(x.grad, xr.grad, torch.bfloat16, torch_fp32=torch_fp32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_in_forward_on_sbv_view_in_place(backend):
    """Megatron-style [s, b, v] storage seen as [b, s, v], the gradient written into it."""
    s_, b, v = 4, 3, 77
    base, _ = make_logits((s_, b), v, torch.bfloat16)
    labels = torch.randint(0, v, (b, s_))
    leaf = base.clone().requires_grad_()
    view = (leaf * 1).transpose(0, 1)
    tk.tofu_loss(
        view, labels, backend=backend, inplace_backward=True, grad_in_forward=True
    ).backward()
    xr = base.double().transpose(0, 1).requires_grad_()
    tk.tofu_loss_reference(xr, labels)[0].mean().backward()
    assert_grad_close(leaf.grad.transpose(0, 1), xr.grad, torch.bfloat16)


def test_grad_in_forward_used_by_default_only_where_possible():
    from tofu_kernels import core
    from tofu_kernels.params import TOFUParams
    from tofu_kernels.vocab_parallel import TensorParallel

    x = torch.randn(3, 10, requires_grad=True)
    labels = torch.tensor([0, 1, 2])

    def path(params, t=x, tp=None):  # the core's plan decides the path, once per call
        return core.plan(params, labels, t.shape[-1], t.device, tp, (t,)).grad_in_forward

    assert path(TOFUParams())
    assert not path(TOFUParams(reduction="none"))  # per-token upstream
    assert not path(TOFUParams(grad_in_forward=False))
    assert not path(TOFUParams(), x.detach())  # no gradient wanted
    assert not path(TOFUParams(), tp=TensorParallel(vocab_start=0, vocab_end=8))  # padding columns
    with torch.no_grad():
        assert not path(TOFUParams())
    for bad in (TOFUParams(reduction="none", grad_in_forward=True),):
        with pytest.raises(ValueError, match="grad_in_forward=True needs"):
            path(bad)


def test_module_wrapper():
    logits, labels = make_logits((6,), 40, torch.float32)
    crit = tk.TOFULoss(gamma=1.0, beta=0.5, reduction="sum")
    assert "gamma=1.0" in repr(crit)
    assert_loss_close(
        crit(logits, labels), tk.tofu_loss_reference(logits, labels, 1.0, 0.5)[0].sum()
    )


def test_auto_backend_on_cpu_is_torch():
    from tofu_kernels.backends import get_backend

    assert get_backend("auto", torch.device("cpu")).name == "torch"


# ----------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(gamma=-0.1), ValueError, "gamma"),
        (dict(gamma=float("nan")), ValueError, "gamma"),
        (dict(beta=0.0), ValueError, "beta"),
        (dict(beta=-1.0), ValueError, "beta"),
        (dict(beta=float("inf")), ValueError, "beta"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(backend="cudnn"), ValueError, "backend"),
        # flags take booleans only (bool("no") is True: "no" returned a tuple)
        (dict(return_ce="no"), TypeError, "return_ce must be True or False, got 'no'"),
        (dict(grad_in_forward="yes"), TypeError, "grad_in_forward must be True, False or None"),
        (dict(inplace_backward=1), TypeError, "inplace_backward must be True or False"),
        (dict(check_inputs=None), TypeError, "check_inputs must be True or False"),
        (dict(return_metrics="False"), TypeError, "return_metrics must be True or False"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    logits, labels = make_logits((3,), 10, torch.float32)
    with pytest.raises(exc, match=match):
        tk.tofu_loss(logits, labels, **kwargs)


@pytest.mark.hf
@pytest.mark.megatron
def test_flags_of_the_other_entry_points_take_booleans_only():
    hidden, weight, labels = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(TypeError, match="return_ce must be True or False"):
        tk.linear_tofu_loss(hidden, weight, labels, return_ce="yes")
    with pytest.raises(TypeError, match="reduce_hidden_grad must be True or False"):
        tk.vocab_parallel_linear_tofu_loss(hidden, weight, labels, reduce_hidden_grad="no")
    with pytest.raises(TypeError, match="inplace_backward must be True or False"):
        tk.TOFULoss(inplace_backward="no")
    transformers = pytest.importorskip("transformers")
    from tofu_kernels import hf

    cfg = transformers.LlamaConfig(
        vocab_size=10,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=4,
    )
    with pytest.raises(TypeError, match="fused_linear must be True or False"):
        hf.apply_tofu(transformers.LlamaForCausalLM(cfg), fused_linear="no")
    require_megatron_core()
    import megatron_patch

    with pytest.raises(TypeError, match="fused_linear must be True or False"):
        megatron_patch.apply(fused_linear="no")  # refused before anything is patched


def test_bad_tensors():
    logits, labels = make_logits((3,), 10, torch.float32)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        tk.tofu_loss(logits.long(), labels)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        tk.tofu_loss(logits.double(), labels)
    with pytest.raises(TypeError, match="labels must be int64"):
        tk.tofu_loss(logits, labels.float())
    with pytest.raises(ValueError, match="shape"):
        tk.tofu_loss(logits, labels[:2])
    with pytest.raises(ValueError, match="shape"):
        tk.tofu_loss(logits[0], labels)
    with pytest.raises(ValueError, match="empty vocab"):
        tk.tofu_loss(logits[:, :0], labels)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [10, -1, -99, 10**9])
def test_labels_out_of_range(backend, bad):
    logits, labels = make_logits((4,), 10, torch.float32)
    labels[2] = bad
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        tk.tofu_loss(logits, labels, backend=backend)
    # Without the host check (as under graph capture) the token is NaN, never plausible.
    x = logits.clone().requires_grad_()
    loss = tk.tofu_loss(x, labels, backend=backend, reduction="none", check_inputs=False)
    loss.sum().backward()
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()
    assert torch.isnan(x.grad[2]).all() and torch.isfinite(x.grad[[0, 1, 3]]).all()


def test_unavailable_backends(monkeypatch):
    logits, labels = make_logits((3,), 10, torch.float32)
    if not tk.extension_loaded():
        with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable.*not built"):
            tk.tofu_loss(logits, labels, backend="cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="Triton backend needs CUDA tensors"):
        tk.tofu_loss(logits, labels, backend="triton")


@pytest.mark.parametrize("grad_in_forward", [None, False])
def test_a_second_derivative_is_refused(grad_in_forward):
    """create_graph=True (a gradient penalty, a Hessian-vector product) raises naming why,
    on both paths and in the fused linear loss, instead of returning a gradient that silently
    has no derivative; create_graph=False gives the gradient as usual."""
    logits = torch.randn(6, 11, requires_grad=True)
    labels = torch.randint(0, 11, (6,))
    loss = tk.tofu_loss(logits, labels, grad_in_forward=grad_in_forward)
    with pytest.raises(
        RuntimeError, match=r"tofu_loss: a second derivative \(backward with create_graph=True\)"
    ):
        torch.autograd.grad(loss, logits, create_graph=True)
    (g,) = torch.autograd.grad(
        tk.tofu_loss(logits, labels, grad_in_forward=grad_in_forward), logits
    )
    assert g.shape == logits.shape and not g.requires_grad
    h, w = torch.randn(6, 4, requires_grad=True), torch.randn(11, 4, requires_grad=True)
    reduction = "mean" if grad_in_forward is None else "none"
    loss = tk.linear_tofu_loss(h, w, labels, reduction=reduction).sum()
    with pytest.raises(RuntimeError, match="linear_tofu_loss: a second derivative"):
        torch.autograd.grad(loss, h, create_graph=True)


def test_errors_name_the_argument_the_user_typed():
    """A bad setting is named as the caller's user wrote it (apply_tofu's
    and TOFUSFTTrainer's errors said tofu_loss and gamma); a 0-dim tensor or numpy scalar is a
    number (it said 'got tensor(2.)')."""
    import numpy as np

    # TOFUSFTTrainer's words (tofu_kernels.hf.trainer.trainer_params, which needs TRL, makes them so)
    err = dict(who="TOFUSFTTrainer", names={"gamma": "tofu_gamma", "beta": "tofu_beta"})
    with pytest.raises(
        ValueError, match=r"^TOFUSFTTrainer: tofu_gamma must be a finite number >= 0, got -1.0$"
    ):
        tk.TOFUParams(gamma=-1.0, **err)
    with pytest.raises(
        ValueError, match=r"^TOFUSFTTrainer: tofu_beta must be a finite number > 0, got 0$"
    ):
        tk.TOFUParams(beta=0, **err)
    with pytest.raises(ValueError, match=r"^tofu_loss: gamma must be a finite number >= 0"):
        tk.tofu_loss(torch.randn(2, 3), torch.tensor([0, 1]), gamma=-1)
    p = tk.TOFUParams(gamma=torch.tensor(2.0), beta=np.float32(0.5))
    assert (p.gamma, p.beta) == (2.0, 0.5) and type(p.gamma) is float and type(p.beta) is float
    assert p == tk.TOFUParams(gamma=2.0, beta=0.5)
    loss = tk.tofu_loss(torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), gamma=torch.tensor(2.0))
    assert torch.isfinite(loss)
