"""The registry of backend objects and :func:`get_backend` (docs/design.md section 5,
"Backends are objects"): torch always, Triton where it imports, CUDA always (unavailable,
saying why, where the extension did not load)."""

from __future__ import annotations

import torch

from ..params import BACKENDS
from .base import Backend
from .cuda_backend import BACKEND as _CUDA
from .torch_backend import BACKEND as _TORCH

__all__ = ["BACKENDS", "Backend", "REGISTRY", "get_backend"]

REGISTRY: dict[str, Backend] = {b.name: b for b in (_CUDA, _TORCH)}
_MISSING: dict[str, str] = {}  # backends whose module could not be imported, and why
try:
    from .triton_backend import BACKEND as _TRITON
except ImportError as e:  # Triton not installed
    _MISSING["triton"] = f"{type(e).__name__}: {e}"
else:
    REGISTRY[_TRITON.name] = _TRITON


def get_backend(name: str, device: torch.device) -> Backend:
    """The backend named ``name`` (validated by :class:`TOFUParams`) for tensors on
    ``device``, or a clear error. ``"auto"``: on CUDA tensors CUDA, then Triton, where they
    run (``extension.runs_on``); torch otherwise."""
    if name == "auto":
        if device.type == "cuda":
            for candidate in ("cuda", "triton"):
                backend = REGISTRY.get(candidate)
                if backend is not None and backend.available(device)[0]:
                    return backend
        return REGISTRY["torch"]
    if name in _MISSING:
        raise RuntimeError(f"tofu_loss: backend {name!r} is unavailable: {_MISSING[name]}")
    ok, why = REGISTRY[name].available(device)
    if not ok:
        raise RuntimeError(f"tofu_loss: backend {name!r} is unavailable: {why}")
    return REGISTRY[name]
