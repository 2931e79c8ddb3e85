"""What the two GPU backends share: launch constants, the op contract, and one adaptor.

The CUDA ops (``csrc/tofu_ops.cpp``, ``torch.ops.tofu_kernels.<op>``) and the Triton ops
(``triton_ops.py``, ``torch.ops.tofu_kernels.triton_<op>``) take the same arguments and
write the same buffers. So this module holds, once for both:

- the launch constants of ``csrc/tofu_kernels.h``, read from the compiled extension where
  it is built (these defaults where it is not; a test compares them with the header);
- the contract of each op as its fake implementation: what torch.compile and FakeTensor
  tracing see, with the same buffer checks as the C++ ops' ``TORCH_CHECK``\\ s;
- :class:`GPUBackend`, the Backend methods over either set of ops: allocate the outputs
  ("ops write, wrappers allocate"), call one op, name the records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .._inputs import RowLayout, Shard
from ..params import TOFUParams
from ..records import Epilogue, GradParam, Metric, Partials, Reduced, Reduction

try:
    from .. import _C as EXTENSION  # registers torch.ops.tofu_kernels.* (the CUDA ops)
except ImportError as e:  # not built (no nvcc / CPU-only torch): the CUDA backend says so
    EXTENSION, EXTENSION_ERROR = None, e
else:
    EXTENSION_ERROR = None

# csrc/tofu_kernels.h: kTileCols, kTargetBlocks, kEpilogueThreads, kRescaleBlocks.
HEADER_DEFAULTS = {"TILE_COLS": 4096, "TARGET_BLOCKS": 1024, "EPILOGUE_THREADS": 1024, "RESCALE_BLOCKS": 1056}
# Columns per gradient tile and statistics split; the programs that fill 132 SMs several
# times over (fewer rows get split); rows per iteration of the one-program O(N) kernels;
# the persistent rescale grid (8 per SM).
TILE_COLS, TARGET_BLOCKS, EPILOGUE_THREADS, RESCALE_BLOCKS = (
    getattr(EXTENSION, name, default) for name, default in HEADER_DEFAULTS.items()
)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def split_rows(n_rows: int, n_valid: int, tile: int, target: int) -> tuple[int, int]:
    """(programs per row, columns per program) for the statistics pass.

    One program per row is best when rows are many; when ``n_rows`` alone cannot fill
    the GPU (``target`` programs), each row is split into up to ``n_valid / tile`` column
    chunks whose partial statistics the epilogue merges. A chunk is a multiple of ``tile``
    (every split starts 16-byte aligned).
    """
    tiles = cdiv(max(n_valid, 1), tile)
    splits = max(1, min(tiles, cdiv(target, max(n_rows, 1)), 65535))
    return splits, cdiv(tiles, splits) * tile


def upstream_of(upstream: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(1-D fp32 upstream gradient, elements per row): stride 0 for a scalar, so the kernels
    read ``upstream[row * stride]`` (a copy only for an unusual dtype or layout)."""
    up = upstream.reshape(-1)
    if up.dtype != torch.float32:
        up = up.float()
    return up, (0 if up.numel() == 1 else up.stride(0))


# ------------------------------------------------------------------ the op contract (fakes)


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"tofu_kernels: {what}")


def _f32(t: torch.Tensor, numel: int, name: str) -> None:
    _check(t.dtype == torch.float32 and t.is_contiguous() and t.numel() == numel,
           f"{name} must be a contiguous float32 tensor of {numel} elements")


def _labels(labels: torch.Tensor, n_rows: int) -> None:
    _check(labels.dtype == torch.int64 and labels.is_contiguous() and labels.numel() == n_rows,
           "labels must be a contiguous int64 tensor with one entry per row")


def _fake_row_stats(x, labels, stats, n_rows, splits, n_inner, s_outer, s_inner, n_valid, vocab_start, chunk,
                    ignore_index, beta, write_meta, meta_vocab_end, meta_width, write_ent) -> None:
    _labels(labels, n_rows)
    _check(n_rows > 0 and 0 < splits <= 65535 and chunk > 0, "bad split configuration")
    _f32(stats, Partials(stats, n_rows, splits, has_meta=write_meta, ent=write_ent).per_rank(), "stats")


def _metrics_out(met, n_rows: int) -> None:
    if met is not None:
        _f32(met, n_rows * len(Metric), "met")


def _fake_epilogue(parts, labels, loss, ce, rec, red, met, n_rows, splits, world, rank_stride, has_meta, vocab_size,
                   ignore_index, gamma, beta, reduction) -> None:
    _labels(labels, n_rows)
    per_rank = Partials(parts, n_rows, splits, has_meta=has_meta, ent=met is not None).per_rank()
    _check(world >= 1 and (world == 1 or rank_stride >= per_rank), "bad partial-statistics layout")
    _f32(parts, per_rank if world == 1 else world * rank_stride, "parts")
    for t, numel, name in ((loss, n_rows, "loss"), (ce, n_rows, "ce"), (rec, n_rows * len(GradParam), "rec"),
                           (red, len(Reduced), "red")):
        _f32(t, numel, name)
    _metrics_out(met, n_rows)
    _check(reduction in tuple(Reduction), "bad reduction")


def _fake_grad(x, out, labels, rec, upstream, scale, up_stride, n_inner, xs_outer, xs_inner, os_outer, os_inner,
               n_valid, vocab_start, beta) -> None:
    n_rows = labels.numel()
    _labels(labels, n_rows)
    _f32(rec, n_rows * len(GradParam), "rec")
    _check(upstream.dtype == torch.float32 and upstream.dim() == 1 and upstream.numel() >= 1
           and (up_stride == 0 or (up_stride == upstream.stride(0) and upstream.numel() == n_rows)),
           "upstream must be a 1-D float32 tensor: one element (up_stride 0) or one per row")
    _f32(scale, 1, "scale")
    _check(out.dtype == x.dtype, "out must match logits")


def _fake_grad_inplace(x, labels, rec, upstream, scale, up_stride, n_inner, s_outer, s_inner, n_valid, vocab_start,
                       beta) -> None:
    _fake_grad(x, x, labels, rec, upstream, scale, up_stride, n_inner, s_outer, s_inner, s_outer, s_inner, n_valid,
               vocab_start, beta)


def _fake_fused(x, out, labels, loss, ce, red, met, n_inner, xs_outer, xs_inner, os_outer, os_inner, ignore_index,
                gamma, beta, mean) -> None:
    n_rows = labels.numel()
    _labels(labels, n_rows)
    _check(out.dtype == x.dtype, "out must match logits")
    for t, numel, name in ((loss, n_rows, "loss"), (ce, n_rows, "ce"), (red, len(Reduced), "red")):
        _f32(t, numel, name)
    _metrics_out(met, n_rows)
    _check(n_rows > 0, "fused needs at least one row")


def _fake_fused_inplace(x, labels, loss, ce, red, met, n_inner, s_outer, s_inner, ignore_index, gamma, beta,
                        mean) -> None:
    _fake_fused(x, x, labels, loss, ce, red, met, n_inner, s_outer, s_inner, s_outer, s_inner, ignore_index, gamma,
                beta, mean)


def _fake_rescale(out, grad_out, n_rows, n_inner, s_outer, s_inner) -> None:
    _f32(grad_out, 1, "grad_out")


# Each op and its fake: the ops only write into buffers the adaptor allocated.
FAKES: dict[str, Callable[..., None]] = {
    "row_stats": _fake_row_stats,
    "epilogue": _fake_epilogue,
    "grad": _fake_grad,
    "grad_inplace": _fake_grad_inplace,
    "fused": _fake_fused,
    "fused_inplace": _fake_fused_inplace,
    "rescale": _fake_rescale,
}


def register_fakes(prefix: str) -> None:
    """Register every op's fake for ``tofu_kernels::<prefix><op>``."""
    for name, fake in FAKES.items():
        torch.library.register_fake(f"tofu_kernels::{prefix}{name}")(fake)


# ------------------------------------------------------------------ the adaptor


def _outputs(n_rows: int, device: torch.device, with_rec: bool, with_metrics: bool):
    """What an epilogue (or the fused forward) writes: per-row loss and cross entropy, the
    backward's record (or None), the :class:`Reduced` values and the :class:`Metric`
    records (or None)."""
    f32 = dict(dtype=torch.float32, device=device)
    rec = torch.empty(n_rows, len(GradParam), **f32) if with_rec else None
    met = torch.empty(n_rows, len(Metric), **f32) if with_metrics else None
    return torch.empty(n_rows, **f32), torch.empty(n_rows, **f32), rec, torch.empty(len(Reduced), **f32), met


class GPUBackend:
    """The Backend methods over one set of GPU ops (``ops.row_stats(...)`` etc., the
    contract above), each one op call; ``stats_split(n_rows, n_valid)`` is the backend's
    (programs per row, columns per program) for the statistics pass."""

    def __init__(self, ops: Any, stats_split: Callable[[int, int], tuple[int, int]]):
        self.ops, self.stats_split = ops, stats_split

    def row_stats(self, x: torch.Tensor, lay: RowLayout, labels: torch.Tensor, shard: Shard, params: TOFUParams,
                  meta: bool) -> Partials:
        splits, chunk = self.stats_split(lay.n_rows, shard.n_valid)
        parts = Partials(x, lay.n_rows, splits, has_meta=meta, ent=params.return_metrics)
        data = torch.empty(parts.per_rank(), dtype=torch.float32, device=x.device)
        self.ops.row_stats(x, labels, data, lay.n_rows, splits, lay.n_inner, lay.s_outer, lay.s_inner, shard.n_valid,
                           shard.vocab_start, chunk, params.ignore_index, params.beta, meta, shard.vocab_end,
                           lay.width, parts.ent)
        return parts._replace(data=data)

    def epilogue(self, parts: Partials, labels: torch.Tensor, params: TOFUParams, vocab_size: int | None,
                 reduction: Reduction) -> Epilogue:
        loss, ce, rec, red, met = _outputs(parts.n_rows, parts.data.device, with_rec=True, with_metrics=parts.ent)
        self.ops.epilogue(parts.data, labels, loss, ce, rec, red, met, parts.n_rows, parts.splits, parts.world,
                          parts.rank_stride, parts.has_meta, 0 if vocab_size is None else vocab_size,
                          params.ignore_index, params.gamma, params.beta, int(reduction))
        return Epilogue.of(loss, ce, rec, red, met)

    def grad(self, x: torch.Tensor, lay: RowLayout, out: torch.Tensor, out_lay: RowLayout, labels: torch.Tensor,
             grad_rec: torch.Tensor, upstream: torch.Tensor, scale: torch.Tensor, shard: Shard,
             params: TOFUParams) -> None:
        assert out_lay.n_inner == lay.n_inner, "out must share x's row grouping"
        up, up_stride = upstream_of(upstream)
        if out is x:
            self.ops.grad_inplace(x, labels, grad_rec, up, scale, up_stride, lay.n_inner, lay.s_outer, lay.s_inner,
                                  shard.n_valid, shard.vocab_start, params.beta)
        else:
            self.ops.grad(x, out, labels, grad_rec, up, scale, up_stride, lay.n_inner, lay.s_outer, lay.s_inner,
                          out_lay.s_outer, out_lay.s_inner, shard.n_valid, shard.vocab_start, params.beta)

    def fused(self, x: torch.Tensor, lay: RowLayout, out: torch.Tensor, out_lay: RowLayout, labels: torch.Tensor,
              params: TOFUParams, reduction: Reduction) -> Epilogue:
        loss, ce, _, red, met = _outputs(lay.n_rows, x.device, with_rec=False, with_metrics=params.return_metrics)
        mean = reduction == Reduction.MEAN
        if out is x:
            self.ops.fused_inplace(x, labels, loss, ce, red, met, lay.n_inner, lay.s_outer, lay.s_inner,
                                   params.ignore_index, params.gamma, params.beta, mean)
        else:
            self.ops.fused(x, out, labels, loss, ce, red, met, lay.n_inner, lay.s_outer, lay.s_inner, out_lay.s_outer,
                           out_lay.s_inner, params.ignore_index, params.gamma, params.beta, mean)
        return Epilogue.of(loss, ce, None, red, met)

    def rescale(self, out: torch.Tensor, out_lay: RowLayout, grad_out: torch.Tensor) -> None:
        self.ops.rescale(out, upstream_of(grad_out)[0], out_lay.n_rows, out_lay.n_inner, out_lay.s_outer,
                         out_lay.s_inner)
