"""The package's shape, held by tests: the backend interface, one parameter object, the
public signatures, the defaults written once, and a fast path that never imports the spec."""

from __future__ import annotations

import ast
import inspect
import math
from pathlib import Path

import pytest
import torch

import tofu_kernels as tk
from tofu_kernels import params as P
from tofu_kernels.backends import Backend, _load

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "tofu_kernels"


@pytest.mark.parametrize("name", ["torch", "triton", "cuda"])
def test_every_backend_implements_the_interface(name):
    mod, why = _load(name)
    if mod is None:
        assert name == "cuda" and not tk.extension_loaded(), why
        pytest.skip(f"the CUDA extension is not built here: {why}")
    assert isinstance(mod, Backend)
    assert mod.NAME == name
    for fn in ("row_stats", "epilogue", "grad", "fused", "rescale"):  # declared, never looked up by getattr
        assert callable(getattr(mod, fn))


def test_public_functions_are_keyword_only_after_labels_in_one_order():
    single = inspect.signature(tk.tofu_loss).parameters
    parallel = inspect.signature(tk.vocab_parallel_tofu_loss).parameters
    for sig in (single, parallel):
        kinds = [p.kind for p in sig.values()]
        assert kinds[:2] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 2
        assert all(k == inspect.Parameter.KEYWORD_ONLY for k in kinds[2:])
    shared = [n for n in list(single)[2:] if n in parallel]
    assert shared == [n for n in list(parallel)[2:] if n in single], "shared keywords in different orders"
    assert shared == ["gamma", "beta", "ignore_index", "reduction", "backend", "inplace_backward",
                      "return_ce", "check_inputs"]
    # the fused linear functions: three positional inputs, then the same keywords in the same order
    for fn in (tk.linear_tofu_loss, tk.vocab_parallel_linear_tofu_loss):
        sig = inspect.signature(fn).parameters
        kinds = [p.kind for p in sig.values()]
        assert kinds[:3] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 3
        assert all(k == inspect.Parameter.KEYWORD_ONLY for k in kinds[3:])
        assert [n for n in list(sig)[3:] if n in single] == [n for n in shared if n != "inplace_backward"]
    assert [n for n in inspect.signature(tk.vocab_parallel_linear_tofu_loss).parameters if n in parallel][-3:] == \
        ["group", "vocab_start", "vocab_end"]
    x, y = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError):
        tk.tofu_loss(x, y, 3.0)  # a positional gamma is refused, not misread
    with pytest.raises(TypeError):
        tk.vocab_parallel_tofu_loss(x, y, 3.0)


def test_defaults_are_written_once():
    defaults = {"gamma": P.DEFAULT_GAMMA, "beta": P.DEFAULT_BETA, "ignore_index": P.DEFAULT_IGNORE_INDEX}
    for fn in (tk.tofu_loss, tk.vocab_parallel_tofu_loss, tk.TOFULoss, tk.tofu_loss_reference,
               tk.authors_tofu_loss, tk.linear_tofu_loss, tk.vocab_parallel_linear_tofu_loss, tk.LinearTOFULoss):
        sig = inspect.signature(fn).parameters
        for name, value in defaults.items():
            assert sig[name].default == value, (fn.__name__, name)
    fields = {f: getattr(P.TOFUParams(), f) for f in defaults}
    assert fields == defaults
    # the literals themselves appear in params.py only
    for path in PKG.rglob("*.py"):
        if path.name == "params.py":
            continue
        text = path.read_text()
        for literal in ("= 3.0", "= 0.8", "= -100"):
            assert literal not in text, f"{path.relative_to(ROOT)} writes a default ({literal!r})"


def test_megatron_flags_use_the_same_defaults_and_rule():
    pytest.importorskip("megatron.core", reason="megatron-core is installed by make test")
    import argparse

    import megatron_patch

    args = megatron_patch.add_arguments(argparse.ArgumentParser()).parse_args([])
    assert (args.tofu_gamma, args.tofu_beta) == (P.DEFAULT_GAMMA, P.DEFAULT_BETA)
    sig = inspect.signature(megatron_patch.apply).parameters
    assert (sig["gamma"].default, sig["beta"].default) == (P.DEFAULT_GAMMA, P.DEFAULT_BETA)
    parser = megatron_patch.add_arguments(argparse.ArgumentParser(exit_on_error=False))
    for flag, bad in (("--tofu-gamma", "-0.5"), ("--tofu-gamma", "nan"), ("--tofu-beta", "0"),
                      ("--tofu-beta", "inf")):
        with pytest.raises(argparse.ArgumentError, match="must be a finite number"):
            parser.parse_args([flag, bad])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [(dict(gamma=math.inf), ValueError, "gamma"), (dict(gamma=True), ValueError, "gamma"),
     (dict(beta=-0.0), ValueError, "beta"), (dict(ignore_index=1.5), TypeError, "ignore_index"),
     (dict(reduction="avg"), ValueError, "reduction"), (dict(backend="xla"), ValueError, "backend")],
)
def test_params_validate_once_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        P.TOFUParams(**kwargs)
    with pytest.raises(dataclasses_frozen_error()):
        P.TOFUParams().gamma = 1.0


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
            names.update(("." * node.level) + a.name for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_fast_path_never_imports_the_reference():
    """reference.py is the fp64 oracle: kernels, backends, autograd and TP code do not use it."""
    for path in PKG.rglob("*.py"):
        if path.name in ("__init__.py", "reference.py") and path.parent == PKG:
            continue  # the package root re-exports the reference for users
        assert not any(n.endswith("reference") for n in _imported_modules(path)), path.relative_to(ROOT)
