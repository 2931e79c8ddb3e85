"""CUDA C++ backend: the ops of the compiled extension ``tofu_kernels._C`` (csrc/).

Importing this module raises ImportError (with the fix) when the extension was not
built, which the dispatch turns into a clear "backend 'cuda' is unavailable" error.
The ops are registered with TORCH_LIBRARY (schemas mark what they write); the fake
implementations below let torch.compile and FakeTensor tracing see through them.
Every Backend method is one op (``fused``: three kernels in one op), from the same
header math (csrc/tofu_math.cuh) that the host harness tests.
The launch constants (tile, blocks) are C++'s, read from the extension module.
"""

from __future__ import annotations

import torch

from .._inputs import RowLayout, Shard
from ..params import TOFUParams
from ..tofu_math import Epilogue, Partials, Reduction, Stat
from ._common import epilogue_buffers, num_splits, split_chunk, upstream_of

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
for _name in ("row_stats", "epilogue", "grad", "grad_inplace", "fused", "fused_inplace", "rescale"):
    torch.library.register_fake(f"tofu_kernels::{_name}")(lambda *args, **kwargs: None)


def row_stats(x, lay: RowLayout, labels, shard: Shard, beta: float, ignore_index: int, meta: bool) -> Partials:
    splits = num_splits(lay.n_rows, shard.n_valid, TILE_COLS, TARGET_BLOCKS)
    chunk = split_chunk(shard.n_valid, splits, TILE_COLS)
    data = torch.empty(lay.n_rows * splits + int(meta), len(Stat), dtype=torch.float32, device=x.device)
    OPS.row_stats(x, labels, data, lay.n_rows, splits, lay.n_inner, lay.s_outer, lay.s_inner, shard.n_valid,
                  shard.vocab_start, chunk, ignore_index, beta, meta, shard.vocab_end, lay.width)
    return Partials(data, lay.n_rows, splits, has_meta=meta)


def epilogue(parts: Partials, labels, params: TOFUParams, vocab_size: int | None, reduction: Reduction) -> Epilogue:
    n = parts.n_rows
    loss, ce, rec, red = epilogue_buffers(n, parts.data.device, with_rec=True)
    OPS.epilogue(parts.data, labels, loss, ce, rec, red, n, parts.splits, parts.world, parts.rank_stride,
                 parts.has_meta, 0 if vocab_size is None else vocab_size, params.ignore_index, params.gamma,
                 params.beta, int(reduction))
    return Epilogue(loss, ce, rec, red[0], red[1], red[2:3])


def grad(x, lay: RowLayout, out, out_lay: RowLayout, labels, grad_rec, upstream, scale, shard: Shard,
         beta: float) -> None:
    up, up_stride = upstream_of(upstream)
    if out is x:
        OPS.grad_inplace(x, labels, grad_rec, up, scale, up_stride, lay.n_inner, lay.s_outer, lay.s_inner,
                         shard.n_valid, shard.vocab_start, beta)
    else:
        OPS.grad(x, out, labels, grad_rec, up, scale, up_stride, lay.n_inner, lay.s_outer, lay.s_inner,
                 out_lay.s_outer, out_lay.s_inner, shard.n_valid, shard.vocab_start, beta)


def fused(x, lay: RowLayout, out, out_lay: RowLayout, labels, params: TOFUParams, reduction: Reduction) -> Epilogue:
    n = lay.n_rows
    loss, ce, _, red = epilogue_buffers(n, x.device, with_rec=False)
    mean = reduction == Reduction.MEAN
    if out is x:
        OPS.fused_inplace(x, labels, loss, ce, red, lay.n_inner, lay.s_outer, lay.s_inner, params.ignore_index,
                          params.gamma, params.beta, mean)
    else:
        OPS.fused(x, out, labels, loss, ce, red, lay.n_inner, lay.s_outer, lay.s_inner, out_lay.s_outer,
                  out_lay.s_inner, params.ignore_index, params.gamma, params.beta, mean)
    return Epilogue(loss, ce, None, red[0], red[1], red[2:3])


def rescale(out, out_lay: RowLayout, grad_out: torch.Tensor) -> None:
    OPS.rescale(out, upstream_of(grad_out)[0], out_lay.n_rows, out_lay.n_inner, out_lay.s_outer, out_lay.s_inner)
