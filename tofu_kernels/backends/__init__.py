"""Backends: the declared interface, and dispatch written once.

A backend is a module (``torch_backend``, ``triton_backend``, ``cuda_backend``) that
satisfies :class:`Backend`. Backends are imported lazily, so the torch backend works
without Triton or the compiled extension.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Protocol, runtime_checkable

import torch

from .._inputs import RowLayout, Shard
from ..params import BACKENDS, TOFUParams
from ..tofu_math import RowResult

__all__ = ["BACKENDS", "Backend", "extension_loaded", "get_backend"]


@runtime_checkable
class Backend(Protocol):
    """What the autograd Function calls, in this order, for every backend.

    Records are fp32 and named in :mod:`tofu_kernels.tofu_math` (``Stat``, ``GradParam``).
    ``x`` is read through ``lay`` (two strides per row, vocab stride 1) and never written,
    except by ``grad`` when ``out is x`` (in-place backward).
    """

    NAME: str

    def available(self, device: torch.device) -> tuple[bool, str]:
        """(True, "") if the backend runs on ``device``, else (False, why not)."""

    def row_stats(
        self, x: torch.Tensor, lay: RowLayout, labels: torch.Tensor, shard: Shard, beta: float,
        ignore_index: int,
    ) -> torch.Tensor:
        """``[N, len(Stat)]`` statistics over the shard's ``n_valid`` columns of each row."""

    def finalize(
        self, stats: torch.Tensor, labels: torch.Tensor, params: TOFUParams, vocab_size: int | torch.Tensor
    ) -> RowResult:
        """Loss, focal weight and the backward's scalars from merged statistics.

        Every backend declares it; the default, for backends that do not fuse this O(N)
        step into a kernel of their own, is ``_common.finalize_in_torch``.
        """

    def grad(
        self, x: torch.Tensor, lay: RowLayout, out: torch.Tensor, out_lay: RowLayout,
        labels: torch.Tensor, grad_params: torch.Tensor, shard: Shard, beta: float,
    ) -> None:
        """Write ``coef * (softmax(z / beta) - onehot)`` into ``out`` (which may be ``x``),
        0 in padding columns; ``grad_params`` is ``[N, len(GradParam)]``."""


_MODULES = {
    "cuda": "tofu_kernels.backends.cuda_backend",
    "triton": "tofu_kernels.backends.triton_backend",
    "torch": "tofu_kernels.backends.torch_backend",
}

_LOADED: dict[str, tuple[ModuleType | None, str]] = {}


def _load(name: str) -> tuple[ModuleType | None, str]:
    # Cached: a lookup here is a plain dict access, which torch.compile traces through
    # (it refuses to trace importlib), so only the first call in a process imports.
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
    """True when the compiled CUDA extension imported (it can load without a GPU)."""
    mod, _ = _load("cuda")
    return mod is not None


def get_backend(name: str, device: torch.device) -> Backend:
    """Resolve ``backend=`` for tensors on ``device``; clear error if unavailable."""
    if name not in BACKENDS:
        raise ValueError(f"tofu_loss: backend must be one of {BACKENDS}, got {name!r}")
    if name == "auto":
        if device.type == "cuda":
            for candidate in ("cuda", "triton"):
                mod, _ = _load(candidate)
                if mod is not None and mod.available(device)[0]:
                    return mod
        return _load("torch")[0]
    mod, why = _load(name)
    if mod is None:
        raise RuntimeError(f"tofu_loss: backend {name!r} is unavailable ({why})")
    ok, why = mod.available(device)
    if not ok:
        raise RuntimeError(f"tofu_loss: backend {name!r} is unavailable: {why}")
    return mod
