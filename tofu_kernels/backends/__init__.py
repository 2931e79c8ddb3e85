"""Backends: the registry of backend objects, and dispatch written once.

A backend is an instance of :class:`~tofu_kernels.backends.base.Backend`, made in the
module that defines it (``torch_backend``, ``triton_backend``, ``cuda_backend``) and
registered here when the package is imported: the torch backend always, the Triton backend
where Triton imports, the CUDA backend always (unavailable, saying why, where the compiled
extension did not load). Under torch.compile dispatch is a dict lookup.

The two GPU backends have one shape: kernels (``triton_kernels.py``; ``csrc/tofu_kernels.cu``),
torch ops with one schema each for both (``gpu.OPS``; the Triton ops in ``triton_backend.py``,
the CUDA kernels registered by ``csrc/tofu_ops.cpp``), and one adaptor from the ops to the
interface (``gpu.GPUBackend``), with the launch constants.
"""

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
    """Resolve ``backend=`` (a name :class:`TOFUParams` has validated) for tensors on
    ``device``; clear error if unavailable. ``"auto"``: CUDA, then Triton, on CUDA tensors
    where they run (CUDA: the extension loaded and holds a kernel image for the card, a cubin
    or PTX, ``extension.runs_on``); the torch backend otherwise."""
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
