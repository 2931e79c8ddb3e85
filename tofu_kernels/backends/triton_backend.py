"""Triton backend: the Triton ops (triton_ops.py, kernels in triton_kernels.py) behind the
Backend interface, through the adaptor both GPU backends share (gpu.GPUBackend)."""

from __future__ import annotations

import torch

from . import triton_ops
from .gpu import GPUBackend

NAME = "triton"


def available(device: torch.device) -> tuple[bool, str]:
    if device.type == "cuda" or triton_ops.interpreting():
        return True, ""
    return False, (
        f"the Triton backend needs CUDA tensors (got {device}); set TRITON_INTERPRET=1 "
        "before importing tofu_kernels to run the kernels in Triton's CPU interpreter"
    )


_adaptor = GPUBackend(triton_ops, triton_ops.stats_split)
row_stats, epilogue, grad, fused, rescale = (_adaptor.row_stats, _adaptor.epilogue, _adaptor.grad, _adaptor.fused,
                                             _adaptor.rescale)
