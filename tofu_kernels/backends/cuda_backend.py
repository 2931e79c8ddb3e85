"""CUDA C++ backend: the ops of the compiled extension ``tofu_kernels._C`` (csrc/) behind the
Backend interface, through the adaptor both GPU backends share (gpu.GPUBackend).

Importing this module raises ImportError (with the fix) when the extension was not
built, which the dispatch turns into a clear "backend 'cuda' is unavailable" error.
The ops are registered in C++ with TORCH_LIBRARY (schemas mark what they write); their
fakes (gpu.FAKES) let torch.compile and FakeTensor tracing see through them. Every
Backend method is one op (``fused``: three kernels in one op), from the same header math
(csrc/tofu_math.cuh) that the host harness tests.
"""

from __future__ import annotations

import functools

import torch

from . import gpu

if gpu.EXTENSION is None:
    raise ImportError(
        "the CUDA extension tofu_kernels._C is not built; install from source on a "
        "machine with nvcc and a CUDA build of torch: "
        "pip install --no-build-isolation .  (see README, 'Install')"
    ) from gpu.EXTENSION_ERROR

NAME = "cuda"


def available(device: torch.device) -> tuple[bool, str]:
    # meta: shape-only tracing (torch.compile / export without a GPU) through the fakes.
    if device.type in ("cuda", "meta"):
        return True, ""
    return False, f"the CUDA backend needs CUDA tensors (got {device})"


gpu.register_fakes("")
_adaptor = gpu.GPUBackend(torch.ops.tofu_kernels,
                          functools.partial(gpu.split_rows, tile=gpu.TILE_COLS, target=gpu.TARGET_BLOCKS))
row_stats, epilogue, grad, fused, rescale = (_adaptor.row_stats, _adaptor.epilogue, _adaptor.grad, _adaptor.fused,
                                             _adaptor.rescale)
