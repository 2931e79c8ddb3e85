"""CUDA C++ backend: the ops of the compiled extension ``tofu_kernels._C`` (csrc/).

Importing this module raises ImportError (with the fix) when the extension was not
built, which the dispatch turns into a clear "backend 'cuda' is unavailable" error.
The ops are registered with TORCH_LIBRARY (schemas mark what they write); the fake
implementations below let torch.compile and FakeTensor tracing see through them.
Besides the two kernels every backend has, it provides ``finalize``: the per-row
epilogue (focal weight, loss, backward scalars) as one fused kernel instead of ~20
small torch ops, from the same header math that the host harness tests.
The launch constants (tile, blocks) are C++'s, read from the extension module.
"""

from __future__ import annotations

import torch

from .._inputs import RowLayout, Shard
from ..params import TOFUParams
from ..tofu_math import RowResult, Stat
from ._common import merge_splits, num_splits, split_chunk

try:
    from .. import _C  # registers torch.ops.tofu_kernels.*
except ImportError as e:
    raise ImportError(
        "the CUDA extension tofu_kernels._C is not built; install from source on a "
        "machine with nvcc and a CUDA build of torch: "
        "pip install --no-build-isolation .  (see README, 'Install')"
    ) from e

NAME = "cuda"
OPS = torch.ops.tofu_kernels
TILE_COLS = _C.TILE_COLS  # columns per gradient block / statistics split (csrc/tofu_kernels.h)
TARGET_BLOCKS = _C.TARGET_BLOCKS


def available(device: torch.device) -> tuple[bool, str]:
    # meta: shape-only tracing (torch.compile / export without a GPU) via the fakes below.
    if device.type in ("cuda", "meta"):
        return True, ""
    return False, f"the CUDA backend needs CUDA tensors (got {device})"


# Fake implementations: the ops only write into tensors the wrappers allocated.
for _name in ("row_stats", "grad", "grad_inplace", "finalize"):
    torch.library.register_fake(f"tofu_kernels::{_name}")(lambda *args, **kwargs: None)


def row_stats(x, lay: RowLayout, labels, shard: Shard, beta: float, ignore_index: int):
    splits = num_splits(lay.n_rows, shard.n_valid, TILE_COLS, TARGET_BLOCKS)
    chunk = split_chunk(shard.n_valid, splits, TILE_COLS)
    stats = torch.empty(lay.n_rows, splits, len(Stat), dtype=torch.float32, device=x.device)
    OPS.row_stats(
        x, labels, stats, lay.n_inner, lay.s_outer, lay.s_inner, shard.n_valid, shard.vocab_start,
        chunk, ignore_index, beta,
    )
    return merge_splits(stats, beta)


def grad(x, lay: RowLayout, out, out_lay: RowLayout, labels, grad_params, shard: Shard, beta: float):
    grad_params = grad_params.contiguous()
    if out is x:
        OPS.grad_inplace(
            x, labels, grad_params, lay.n_inner, lay.s_outer, lay.s_inner, shard.n_valid,
            shard.vocab_start, beta,
        )
    else:
        OPS.grad(
            x, out, labels, grad_params, lay.n_inner, lay.s_outer, lay.s_inner, out_lay.s_outer,
            out_lay.s_inner, shard.n_valid, shard.vocab_start, beta,
        )


def finalize(stats, labels, params: TOFUParams, vocab_size) -> RowResult:
    out = torch.empty(len(RowResult._fields), labels.numel(), dtype=torch.float32, device=stats.device)
    args = (params.gamma, params.beta, params.ignore_index)
    if isinstance(vocab_size, torch.Tensor):  # vocab-parallel: global V known on device only
        OPS.finalize(stats.contiguous(), labels, vocab_size.reshape(1), out, 0, *args)
    else:
        OPS.finalize(stats.contiguous(), labels, None, out, vocab_size, *args)
    return RowResult(*out.unbind(0))
