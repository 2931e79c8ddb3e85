"""The CUDA backend: the ops of the compiled extension ``tofu_kernels._C`` (``csrc/``) through
``gpu.GPUBackend``; unavailable, saying why, where the extension was not built or holds no
kernel image for the card (``extension.runs_on``)."""

from __future__ import annotations

import torch

from ..extension import extension_loaded, extension_status, runs_on_device
from . import gpu


class CUDABackend(gpu.GPUBackend):
    """The CUDA ops: CUDA tensors on a card the extension's architectures run on, and meta
    tensors (shape-only tracing without a GPU, through the fakes)."""

    name = "cuda"

    def available(self, device: torch.device) -> tuple[bool, str]:
        if not extension_loaded():
            return False, extension_status()
        if device.type == "meta":
            return True, ""
        if device.type == "cuda":
            ok, why = runs_on_device(
                torch.cuda.current_device() if device.index is None else device.index
            )
            return ok, "" if ok else why
        return False, f"the CUDA backend needs CUDA tensors (got {device})"

    def stats_split(self, n_rows: int, n_valid: int) -> tuple[int, int]:
        """Tiles of ``csrc/tofu_kernels.h``'s kTileCols."""
        return gpu.split_rows(n_rows, n_valid, gpu.TILE_COLS, gpu.TARGET_BLOCKS)


gpu.define_cuda_ops()
BACKEND = CUDABackend({name: getattr(torch.ops.tofu_kernels, name) for name in gpu.OPS})
