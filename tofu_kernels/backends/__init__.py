"""Backend dispatch, written once.

A backend is a module with ``NAME``, ``available(device) -> (bool, why_not)``,
``row_stats(x, lay, labels, vocab_start, n_valid, beta, ignore_index) -> fp32 [N, 4]``
and ``grad(x, lay, out, out_lay, labels, params, vocab_start, n_valid, beta)``.
Backends are imported lazily, so the torch backend works without Triton or the
compiled extension.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")

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
            _LOADED[name] = importlib.import_module(_MODULES[name]), ""
        except ImportError as e:  # triton not installed, extension not built, ...
            _LOADED[name] = None, f"{type(e).__name__}: {e}"
    return _LOADED[name]


def extension_loaded() -> bool:
    """True when the compiled CUDA extension imported (it can load without a GPU)."""
    mod, _ = _load("cuda")
    return mod is not None


def get_backend(name: str, device: torch.device) -> ModuleType:
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
