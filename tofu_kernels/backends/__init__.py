"""Backends: the declared interface, and dispatch written once.

A backend is a module (``torch_backend``, ``triton_backend``, ``cuda_backend``) that
satisfies :class:`Backend`. Each is imported once, when the package is imported, and one
that cannot be (no Triton, no compiled extension) is recorded with the reason: the torch
backend works without the others, and under torch.compile dispatch is a dict lookup.

The two GPU backends have one shape: kernels (``triton_kernels.py``; ``csrc/tofu_kernels.cu``),
their torch ops with one schema for both (``triton_ops.py``; ``csrc/tofu_ops.cpp``), and one
adaptor from the ops to this interface (``gpu.py``), which also holds the ops' fakes and the
launch constants.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Protocol, runtime_checkable

import torch

from .._inputs import RowLayout, Shard
from ..params import BACKENDS, TOFUParams
from ..records import Epilogue, Partials, Reduction

__all__ = ["BACKENDS", "Backend", "extension_loaded", "extension_status", "get_backend"]


@runtime_checkable
class Backend(Protocol):
    """What the core calls, for every backend (``core.py`` holds the order).

    Records are fp32 and named in :mod:`tofu_kernels.records` (``Stat``, ``GradParam``,
    ``Meta``, ``Reduced``); the settings arrive as the call's :class:`TOFUParams`. ``x`` is read through ``lay`` (two strides per row, vocab stride 1) and never
    written, except where ``out is x`` (in-place gradient). The GPU backends run each
    method as one kernel (``fused``: a few), with no torch operations around them.
    """

    NAME: str

    def available(self, device: torch.device) -> tuple[bool, str]:
        """(True, "") if the backend runs on ``device``, else (False, why not)."""

    def row_stats(
        self, x: torch.Tensor, lay: RowLayout, labels: torch.Tensor, shard: Shard, params: TOFUParams, meta: bool,
    ) -> Partials:
        """Partial statistics over the shard's ``n_valid`` columns of each row; with
        ``meta``, this rank's metadata record after them (tensor parallelism)."""

    def epilogue(
        self, parts: Partials, labels: torch.Tensor, params: TOFUParams, vocab_size: int | None,
        reduction: Reduction,
    ) -> Epilogue:
        """Merge every part of each row, then loss, cross entropy, the backward's record and
        the reduction. ``vocab_size`` None: read it from the metadata records."""

    def grad(
        self, x: torch.Tensor, lay: RowLayout, out: torch.Tensor, out_lay: RowLayout, labels: torch.Tensor,
        grad_rec: torch.Tensor, upstream: torch.Tensor, scale: torch.Tensor, shard: Shard, params: TOFUParams,
    ) -> None:
        """Write ``coef * (softmax(z / beta) - onehot)`` into ``out``, 0 in padding columns,
        ``coef = upstream_i * scale * g_i`` (``upstream`` a scalar or one value per row)."""

    def fused(
        self, x: torch.Tensor, lay: RowLayout, out: torch.Tensor, out_lay: RowLayout, labels: torch.Tensor,
        params: TOFUParams, reduction: Reduction,
    ) -> Epilogue:
        """Whole rows: the reduced loss and cross entropy, and into ``out`` the gradient for
        an upstream gradient of 1 (``grad_rec`` of the result is None)."""

    def rescale(self, out: torch.Tensor, out_lay: RowLayout, grad_out: torch.Tensor) -> None:
        """``out *= grad_out`` (a one-element tensor); nothing to do when it is 1."""


_MODULES = {
    "cuda": "tofu_kernels.backends.cuda_backend",
    "triton": "tofu_kernels.backends.triton_backend",
    "torch": "tofu_kernels.backends.torch_backend",
}

_LOADED: dict[str, tuple[ModuleType | None, str]] = {}


def _load(name: str) -> tuple[ModuleType | None, str]:
    # Cached: a lookup here is a plain dict access, which torch.compile traces through
    # (it refuses to trace importlib); every backend is loaded at package import (below).
    if name not in _LOADED:
        try:
            mod = importlib.import_module(_MODULES[name])
        except ImportError as e:  # triton not installed, extension not built, ...
            _LOADED[name] = None, f"{type(e).__name__}: {e}"
        else:
            if not isinstance(mod, Backend):
                raise TypeError(f"tofu_kernels: {_MODULES[name]} does not implement the Backend interface")
            _LOADED[name] = mod, ""
    return _LOADED[name]


def extension_loaded() -> bool:
    """True when the compiled CUDA extension imported (it can load without a GPU).
    :func:`extension_status` says from which file, or why not."""
    mod, _ = _load("cuda")
    return mod is not None


def extension_status() -> str:
    """One line: the compiled extension's file, or why it did not load. The reasons: the
    import error; what the build of the imported package recorded (e.g. pip's isolated
    build, where torch is not importable, skips it; the record says what to run); and, loaded
    or not, whether this ``tofu_kernels`` is a source checkout that shadows an installed
    package (Python run from the checkout's root imports its folder first)."""
    import json
    import os
    from pathlib import Path

    pkg = Path(os.path.realpath(__file__)).parent.parent
    mod, why = _load("cuda")
    shadowed = _shadowed_installs(pkg)
    if mod is not None:
        from .. import _C

        notes = [f"loaded: {_C.__file__}"]
        if shadowed:
            notes.append(f"tofu_kernels imported from {pkg}")
    else:
        notes = [f"not loaded ({why})", f"tofu_kernels imported from {pkg}"]
        info = pkg / "_build_info.json"
        if info.is_file():
            rec = json.loads(info.read_text())
            if rec.get("cuda_extension") != "built":
                notes.append(f"its build did not build the extension: {rec.get('reason')}")
    for installed in shadowed:
        has = "has its" if any(installed.glob("_C.*")) else "has no"
        notes.append(f"this source checkout shadows the installed package in {installed.parent}, which {has} "
                     "compiled extension (Python puts the current directory first): run from another directory "
                     "to use that package")
    return "; ".join(notes)


def _shadowed_installs(pkg) -> list:
    """The installed tofu_kernels folders that ``pkg``, a source checkout's package, hides.

    Every tofu-kernels distribution is looked at, not the first found: a checkout's root may
    hold its own metadata (an egg-info), found first when Python runs from there. An
    editable install of the checkout points at no folder of its own and hides nothing.
    """
    import os
    from importlib import metadata
    from pathlib import Path

    if not (pkg.parent / "setup.py").is_file():  # not a source checkout
        return []
    found = []
    for dist in metadata.distributions(name="tofu-kernels"):
        try:
            installed = Path(os.path.realpath(dist.locate_file("tofu_kernels")))
        except TypeError:  # a distribution without a location
            continue
        if installed != pkg and installed.is_dir() and installed not in found:
            found.append(installed)
    return found


def get_backend(name: str, device: torch.device) -> Backend:
    """Resolve ``backend=`` (a name :class:`TOFUParams` has validated) for tensors on
    ``device``; clear error if unavailable."""
    if name == "auto":
        if device.type == "cuda":
            for candidate in ("cuda", "triton"):
                mod, _ = _load(candidate)
                if mod is not None and mod.available(device)[0]:
                    return mod
        return _load("torch")[0]
    mod, why = _load(name)
    if mod is None:
        raise RuntimeError(f"tofu_loss: backend {name!r} is unavailable: "
                           f"{extension_status() if name == 'cuda' else why}")
    ok, why = mod.available(device)
    if not ok:
        raise RuntimeError(f"tofu_loss: backend {name!r} is unavailable: {why}")
    return mod


for _name in _MODULES:
    _load(_name)
