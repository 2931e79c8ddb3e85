"""CUDA C++ backend: the ops of the compiled extension ``tofu_kernels._C`` (csrc/).

Importing this module raises ImportError (with the fix) when the extension was not
built, which the dispatch turns into a clear "backend 'cuda' is unavailable" error.
The ops are registered with TORCH_LIBRARY (schemas mark what they write); the fake
implementations below let torch.compile and FakeTensor tracing see through them.
Besides the two kernels every backend has, it provides ``finalize``: the per-row
epilogue (focal weight, loss, backward scalars) as one fused kernel instead of ~20
small torch ops, from the same header math that the host harness tests.
"""

from __future__ import annotations

import torch

from .._inputs import RowLayout
from ..reference import RowResult
from ._common import merge_splits, num_splits, split_chunk

try:
    from .. import _C  # noqa: F401  (registers torch.ops.tofu_kernels.*)
except ImportError as e:
    raise ImportError(
        "the CUDA extension tofu_kernels._C is not built; install from source on a "
        "machine with nvcc and a CUDA build of torch: "
        "pip install --no-build-isolation .  (see README, 'Install')"
    ) from e

NAME = "cuda"
OPS = torch.ops.tofu_kernels
# Columns per CTA tile: 256 threads x 16-byte vectors x 2 in flight = 4096 bf16 values.
TILE = 4096
TARGET_PROGRAMS = 1024


def available(device: torch.device) -> tuple[bool, str]:
    # meta: shape-only tracing (torch.compile / export without a GPU) via the fakes below.
    if device.type in ("cuda", "meta"):
        return True, ""
    return False, f"the CUDA backend needs CUDA tensors (got {device})"


# Fake implementations: the ops only write into tensors the wrappers allocated.
for _name in ("row_stats", "grad", "grad_inplace", "finalize"):
    torch.library.register_fake(f"tofu_kernels::{_name}")(lambda *args, **kwargs: None)


def row_stats(x, lay: RowLayout, labels, vocab_start, n_valid, beta, ignore_index):
    splits = num_splits(lay.n_rows, n_valid, TILE, TARGET_PROGRAMS)
    chunk = split_chunk(n_valid, splits, TILE)
    stats = torch.empty(lay.n_rows, splits, 4, dtype=torch.float32, device=x.device)
    OPS.row_stats(
        x, labels, stats, lay.n_inner, lay.s_outer, lay.s_inner, n_valid, vocab_start, chunk,
        ignore_index, beta,
    )
    return merge_splits(stats, beta)


def grad(x, lay: RowLayout, out, out_lay: RowLayout, labels, params, vocab_start, n_valid, beta):
    params = params.contiguous()
    if out is x:
        OPS.grad_inplace(
            x, labels, params, lay.n_inner, lay.s_outer, lay.s_inner, n_valid, vocab_start, TILE, beta
        )
    else:
        OPS.grad(
            x, out, labels, params, lay.n_inner, lay.s_outer, lay.s_inner, out_lay.s_outer,
            out_lay.s_inner, n_valid, vocab_start, TILE, beta,
        )


def finalize(stats, labels, gamma, beta, ignore_index, vocab_size) -> RowResult:
    out = torch.empty(6, labels.numel(), dtype=torch.float32, device=stats.device)
    if isinstance(vocab_size, torch.Tensor):  # vocab-parallel: global V known on device only
        OPS.finalize(stats.contiguous(), labels, vocab_size.reshape(1), out, 0, gamma, beta, ignore_index)
    else:
        OPS.finalize(stats.contiguous(), labels, None, out, vocab_size, gamma, beta, ignore_index)
    return RowResult(*out.unbind(0))
