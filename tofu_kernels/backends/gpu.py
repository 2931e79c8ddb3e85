"""What the two GPU backends share (docs/design.md section 5): the launch constants of
``csrc/tofu_kernels.h``, :data:`OPS` (one schema and contract per op, for the CUDA ops
``tofu_kernels::<op>`` and the Triton ops ``tofu_kernels::triton_<op>``) and the adaptor
:class:`GPUBackend`."""

from __future__ import annotations

import functools
from abc import abstractmethod
from collections.abc import Callable
from types import SimpleNamespace
from typing import NamedTuple

import torch

from ..extension import EXTENSION
from ..layout import RowLayout, Shard
from ..params import TOFUParams
from ..records import Epilogue, GradParam, Metric, Partials, Reduced, Reduction
from .base import Backend

# csrc/tofu_kernels.h: kTileCols, kTargetBlocks, kEpilogueThreads, kRescaleBlocks; read from
# the extension where it is built (a test compares these defaults with the header).
HEADER_DEFAULTS = {
    "TILE_COLS": 4096,
    "TARGET_BLOCKS": 1024,
    "EPILOGUE_THREADS": 1024,
    "RESCALE_BLOCKS": 1056,
}
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


# ------------------------------------------------------------------ the ops: one spec each


class Op(NamedTuple):
    """One op of both GPU backends: its torch.library schema, written here once, and its
    contract (the fake: what torch.compile and FakeTensor tracing see, with the buffer checks
    of the C++ op's ``TORCH_CHECK``\\ s). The CUDA op ``tofu_kernels::<name>`` is defined
    from the schema (:func:`define_cuda_ops`; torch checks the C++ kernel's signature
    against it when the extension registers it) and the Triton op
    ``tofu_kernels::triton_<name>`` is made from it (``triton_backend.py``). Ops write,
    wrappers allocate: every op only writes into buffers the adaptor allocated (the ``!``
    arguments)."""

    name: str
    schema: str
    fake: Callable[[SimpleNamespace], None]

    @property
    def args(self) -> tuple[str, ...]:
        return _signature(self.schema)[0]

    @property
    def writes(self) -> frozenset[str]:
        return _signature(self.schema)[1]

    def bind(self, args: tuple, kwargs: dict) -> SimpleNamespace:
        """The arguments of one call by name (the dispatcher passes them by position)."""
        return SimpleNamespace(**dict(zip(self.args, args)), **kwargs)


@functools.cache
def _signature(schema: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """The argument names of ``schema`` and those it writes, parsed once per schema (every
    eager op call binds its arguments by these names)."""
    arguments = torch._C.parse_schema(f"tofu_kernels::op{schema}").arguments
    return (
        tuple(a.name for a in arguments),
        frozenset(a.name for a in arguments if a.alias_info is not None and a.alias_info.is_write),
    )


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise RuntimeError(f"tofu_kernels: {what}")


def _f32(t: torch.Tensor, numel: int, name: str) -> None:
    _check(
        t.dtype == torch.float32 and t.is_contiguous() and t.numel() == numel,
        f"{name} must be a contiguous float32 tensor of {numel} elements",
    )


def _labels(labels: torch.Tensor, n_rows: int) -> None:
    _check(
        labels.dtype == torch.int64 and labels.is_contiguous() and labels.numel() == n_rows,
        "labels must be a contiguous int64 tensor with one entry per row",
    )


def _metrics_out(met, n_rows: int) -> None:
    if met is not None:
        _f32(met, n_rows * len(Metric), "met")


def _fake_row_stats(a) -> None:
    _labels(a.labels, a.n_rows)
    _check(a.n_rows > 0 and 0 < a.splits <= 65535 and a.chunk > 0, "bad split configuration")
    _f32(
        a.stats,
        Partials(a.stats, a.n_rows, a.splits, has_meta=a.write_meta, metrics=a.metrics).per_rank(),
        "stats",
    )


def _fake_epilogue(a) -> None:
    _labels(a.labels, a.n_rows)
    per_rank = Partials(
        a.parts, a.n_rows, a.splits, has_meta=a.has_meta, metrics=a.met is not None
    ).per_rank()
    _check(
        a.world >= 1 and (a.world == 1 or a.rank_stride >= per_rank),
        "bad partial-statistics layout",
    )
    _f32(a.parts, per_rank if a.world == 1 else a.world * a.rank_stride, "parts")
    for t, numel, name in (
        (a.loss, a.n_rows, "loss"),
        (a.ce, a.n_rows, "ce"),
        (a.rec, a.n_rows * len(GradParam), "rec"),
        (a.red, len(Reduced), "red"),
    ):
        _f32(t, numel, name)
    _metrics_out(a.met, a.n_rows)
    _check(a.reduction in tuple(Reduction), "bad reduction")


def in_place(a: SimpleNamespace) -> SimpleNamespace:
    """An ``_inplace`` twin's arguments as its out-of-place op's (``out`` is ``x``)."""
    a.out, a.os_outer, a.os_inner = a.x, a.xs_outer, a.xs_inner
    return a


def _fake_grad(a) -> None:
    x, out = a.x, a.out
    n_rows = a.labels.numel()
    _labels(a.labels, n_rows)
    _f32(a.rec, n_rows * len(GradParam), "rec")
    up = a.upstream
    _check(
        up.dtype == torch.float32
        and up.dim() == 1
        and up.numel() >= 1
        and (a.up_stride == 0 or (a.up_stride == up.stride(0) and up.numel() == n_rows)),
        "upstream must be a 1-D float32 tensor: one element (up_stride 0) or one per row",
    )
    _f32(a.scale, 1, "scale")
    _check(out.dtype == x.dtype, "out must match logits")


def _fake_grad_in_forward(a) -> None:
    x, out = a.x, a.out
    n_rows = a.labels.numel()
    _labels(a.labels, n_rows)
    _check(out.dtype == x.dtype, "out must match logits")
    for t, numel, name in (
        (a.loss, n_rows, "loss"),
        (a.ce, n_rows, "ce"),
        (a.red, len(Reduced), "red"),
    ):
        _f32(t, numel, name)
    _metrics_out(a.met, n_rows)
    _check(n_rows > 0, "grad_in_forward needs at least one row")


def _fake_rescale(a) -> None:
    _f32(a.grad_out, 1, "grad_out")


# The ``_inplace`` twins write the gradient over the logits (``x`` read, then written; the
# strides of ``x`` serve as the output's).
OPS: dict[str, Op] = {
    op.name: op
    for op in (
        Op(
            "row_stats",
            "(Tensor x, Tensor labels, Tensor(a!) stats, int n_rows, int splits, int n_inner, int "
            "s_outer, int s_inner, int n_valid, int vocab_start, int chunk, int ignore_index, "
            "float beta, bool write_meta, int meta_vocab_end, int meta_width, bool metrics) -> ()",
            _fake_row_stats,
        ),
        Op(
            "epilogue",
            "(Tensor parts, Tensor labels, Tensor(a!) loss, Tensor(b!) ce, Tensor(c!) rec, "
            "Tensor(d!) red, Tensor(e!)? met, int n_rows, int splits, int world, int rank_stride, "
            "bool has_meta, int vocab_size, int ignore_index, float gamma, float beta, int "
            "reduction) -> ()",
            _fake_epilogue,
        ),
        Op(
            "grad",
            "(Tensor x, Tensor(a!) out, Tensor labels, Tensor rec, Tensor upstream, Tensor scale, "
            "int up_stride, int n_inner, int xs_outer, int xs_inner, int os_outer, int os_inner, "
            "int n_valid, int vocab_start, float beta) -> ()",
            _fake_grad,
        ),
        Op(
            "grad_inplace",
            "(Tensor(a!) x, Tensor labels, Tensor rec, Tensor upstream, Tensor scale, int "
            "up_stride, int n_inner, int xs_outer, int xs_inner, int n_valid, int vocab_start, "
            "float beta) -> ()",
            lambda a: _fake_grad(in_place(a)),
        ),
        Op(
            "grad_in_forward",
            "(Tensor x, Tensor(a!) out, Tensor labels, Tensor(b!) loss, Tensor(c!) ce, Tensor(d!) "
            "red, Tensor(e!)? met, int n_inner, int xs_outer, int xs_inner, int os_outer, int "
            "os_inner, int ignore_index, float gamma, float beta, bool mean) -> ()",
            _fake_grad_in_forward,
        ),
        Op(
            "grad_in_forward_inplace",
            "(Tensor(a!) x, Tensor labels, Tensor(b!) loss, Tensor(c!) ce, Tensor(d!) red, "
            "Tensor(e!)? met, int n_inner, int xs_outer, int xs_inner, int ignore_index, float "
            "gamma, float beta, bool mean) -> ()",
            lambda a: _fake_grad_in_forward(in_place(a)),
        ),
        Op(
            "rescale",
            "(Tensor(a!) out, Tensor grad_out, int n_rows, int n_inner, int s_outer, int s_inner) -> ()",
            _fake_rescale,
        ),
    )
}

_LIBRARY = torch.library.Library("tofu_kernels", "FRAGMENT")


def register_fake(op: Op, qualname: str) -> None:
    """``op``'s contract as the fake of the registered op ``qualname``."""
    torch.library.register_fake(
        qualname, lambda *args, **kw: op.fake(op.bind(args, kw)), lib=_LIBRARY
    )


def define_cuda_ops() -> None:
    """Define ``tofu_kernels::<name>`` for every op, with its fake. The extension registers
    the CUDA kernels (``csrc/tofu_ops.cpp``: ``TORCH_LIBRARY_IMPL`` only); torch compares each
    C++ function's signature with the schema here and refuses a mismatch."""
    for op in OPS.values():
        _LIBRARY.define(f"{op.name}{op.schema}")
        register_fake(op, f"tofu_kernels::{op.name}")


# ------------------------------------------------------------------ the adaptor


def _outputs(n_rows: int, device: torch.device, with_rec: bool, with_metrics: bool):
    """What an epilogue (or the gradient in the forward) writes: per-row loss and cross
    entropy, the backward's record (or None), the :class:`Reduced` values and the
    :class:`Metric` records (or None)."""
    f32 = dict(dtype=torch.float32, device=device)
    rec = torch.empty(n_rows, len(GradParam), **f32) if with_rec else None
    met = torch.empty(n_rows, len(Metric), **f32) if with_metrics else None
    return (
        torch.empty(n_rows, **f32),
        torch.empty(n_rows, **f32),
        rec,
        torch.empty(len(Reduced), **f32),
        met,
    )


class GPUBackend(Backend):
    """The Backend methods over one set of GPU ops (``ops[name]`` per :data:`OPS` entry,
    called by keyword): allocate the outputs (:class:`Op`), call the op, name the records. A
    subclass says where it runs (``available``) and how it splits rows (``stats_split``)."""

    def __init__(self, ops: dict[str, Callable[..., None]]):
        assert set(ops) == set(OPS), "one callable per op"
        self.ops = ops

    @abstractmethod
    def stats_split(self, n_rows: int, n_valid: int) -> tuple[int, int]:
        """(programs per row, columns per program) of the statistics pass."""

    def row_stats(
        self,
        x: torch.Tensor,
        lay: RowLayout,
        labels: torch.Tensor,
        shard: Shard,
        params: TOFUParams,
        meta: bool,
    ) -> Partials:
        splits, chunk = self.stats_split(lay.n_rows, shard.n_valid)
        parts = Partials(x, lay.n_rows, splits, has_meta=meta, metrics=params.return_metrics)
        data = torch.empty(parts.per_rank(), dtype=torch.float32, device=x.device)
        self.ops["row_stats"](
            x=x,
            labels=labels,
            stats=data,
            n_rows=lay.n_rows,
            splits=splits,
            n_inner=lay.n_inner,
            s_outer=lay.s_outer,
            s_inner=lay.s_inner,
            n_valid=shard.n_valid,
            vocab_start=shard.vocab_start,
            chunk=chunk,
            ignore_index=params.ignore_index,
            beta=params.beta,
            write_meta=meta,
            meta_vocab_end=shard.vocab_end,
            meta_width=lay.width,
            metrics=parts.metrics,
        )
        return parts._replace(data=data)

    def epilogue(
        self,
        parts: Partials,
        labels: torch.Tensor,
        params: TOFUParams,
        vocab_size: int | None,
        reduction: Reduction,
    ) -> Epilogue:
        loss, ce, rec, red, met = _outputs(
            parts.n_rows, parts.data.device, with_rec=True, with_metrics=parts.metrics
        )
        self.ops["epilogue"](
            parts=parts.data,
            labels=labels,
            loss=loss,
            ce=ce,
            rec=rec,
            red=red,
            met=met,
            n_rows=parts.n_rows,
            splits=parts.splits,
            world=parts.world,
            rank_stride=parts.rank_stride,
            has_meta=parts.has_meta,
            vocab_size=0 if vocab_size is None else vocab_size,
            ignore_index=params.ignore_index,
            gamma=params.gamma,
            beta=params.beta,
            reduction=int(reduction),
        )
        return Epilogue.of(loss, ce, rec, red, met)

    def grad(
        self,
        x: torch.Tensor,
        lay: RowLayout,
        out: torch.Tensor,
        out_lay: RowLayout,
        labels: torch.Tensor,
        grad_rec: torch.Tensor,
        upstream: torch.Tensor,
        scale: torch.Tensor,
        shard: Shard,
        params: TOFUParams,
    ) -> None:
        assert out_lay.n_inner == lay.n_inner, "out must share x's row grouping"
        up, up_stride = upstream_of(upstream)
        kw = dict(
            x=x,
            labels=labels,
            rec=grad_rec,
            upstream=up,
            scale=scale,
            up_stride=up_stride,
            n_inner=lay.n_inner,
            xs_outer=lay.s_outer,
            xs_inner=lay.s_inner,
            n_valid=shard.n_valid,
            vocab_start=shard.vocab_start,
            beta=params.beta,
        )
        if out is x:
            self.ops["grad_inplace"](**kw)
        else:
            self.ops["grad"](out=out, os_outer=out_lay.s_outer, os_inner=out_lay.s_inner, **kw)

    def grad_in_forward(
        self,
        x: torch.Tensor,
        lay: RowLayout,
        out: torch.Tensor,
        out_lay: RowLayout,
        labels: torch.Tensor,
        params: TOFUParams,
        reduction: Reduction,
    ) -> Epilogue:
        loss, ce, _, red, met = _outputs(
            lay.n_rows, x.device, with_rec=False, with_metrics=params.return_metrics
        )
        kw = dict(
            x=x,
            labels=labels,
            loss=loss,
            ce=ce,
            red=red,
            met=met,
            n_inner=lay.n_inner,
            xs_outer=lay.s_outer,
            xs_inner=lay.s_inner,
            ignore_index=params.ignore_index,
            gamma=params.gamma,
            beta=params.beta,
            mean=reduction == Reduction.MEAN,
        )
        if out is x:
            self.ops["grad_in_forward_inplace"](**kw)
        else:
            self.ops["grad_in_forward"](
                out=out, os_outer=out_lay.s_outer, os_inner=out_lay.s_inner, **kw
            )
        return Epilogue.of(loss, ce, None, red, met)

    def rescale(self, out: torch.Tensor, out_lay: RowLayout, grad_out: torch.Tensor) -> None:
        self.ops["rescale"](
            out=out,
            grad_out=upstream_of(grad_out)[0],
            n_rows=out_lay.n_rows,
            n_inner=out_lay.n_inner,
            s_outer=out_lay.s_outer,
            s_inner=out_lay.s_inner,
        )
