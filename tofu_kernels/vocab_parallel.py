"""Tensor parallelism over the vocabulary: a rank's columns, the shard checks, and the
collectives of the protocol (docs/design.md section 4: why one all-gather, its bytes, the
metadata record and the check's exchange before it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .layout import Shard
from .records import Meta, Partials, Stat

assert len(Meta) == len(Stat), "the metadata record travels as one statistics record"


@dataclass(frozen=True)
class TensorParallel:
    """Tensor-parallel options of :func:`tofu_kernels.vocab_parallel_tofu_loss` (the same
    meaning as its ``group``, ``vocab_start`` and ``vocab_end``)."""

    group: Any = None
    vocab_start: int | None = None
    vocab_end: int | None = None

    @property
    def explicit(self) -> bool:
        return self.vocab_start is not None or self.vocab_end is not None

    def world_and_rank(self) -> tuple[int, int]:
        """(1, 0) without an initialized process group: no communication at all."""
        if self.group is None and not (dist.is_available() and dist.is_initialized()):
            return 1, 0
        return dist.get_world_size(self.group), dist.get_rank(self.group)

    def local_shard(self, width: int, rank: int) -> Shard:
        """This rank's :class:`Shard` of a local row ``width`` columns wide (validated)."""
        start = rank * width if self.vocab_start is None else int(self.vocab_start)
        end = start + width if self.vocab_end is None else int(self.vocab_end)
        if not 0 <= start <= end or end - start > width:
            raise ValueError(
                f"vocab_parallel_tofu_loss: [vocab_start, vocab_end) = [{start}, {end}) must "
                f"be a valid range of at most the shard width {width}"
            )
        return Shard(start, end - start)


def resolve(tp: TensorParallel | None, width: int) -> tuple[Shard, TensorParallel | None]:
    """This rank's :class:`Shard` of a local row ``width`` wide, and ``tp``, or None when
    there is nothing to merge (no tensor parallelism, or a world of one)."""
    if tp is None:
        return Shard(0, width), None
    world, rank = tp.world_and_rank()
    return tp.local_shard(width, rank), (tp if world > 1 else None)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    # torch >= 2.12 names it all_gather_single (all_gather_into_tensor is deprecated).
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def all_gather_stats(parts: Partials, tp: TensorParallel) -> Partials:
    """Every rank's partial statistics and metadata record, in rank order, from this
    rank's ``parts``, for the epilogue to merge."""
    world = dist.get_world_size(tp.group)
    data = parts.data.reshape(-1)
    gathered = torch.empty(world * data.numel(), dtype=torch.float32, device=data.device)
    _all_gather(gathered, data, tp.group)
    return parts._replace(data=gathered, world=world, rank_stride=data.numel())


def exchange_meta(parts: Partials, tp: TensorParallel) -> torch.Tensor:
    """Every rank's metadata record ``[world, len(Meta)]`` int32, gathered alone before the
    statistics by calls that check their inputs (the statistics' sizes need equal token
    counts)."""
    mine = parts.metas().reshape(-1)  # this rank's record (parts before the all-gather)
    out = torch.empty(
        dist.get_world_size(tp.group) * mine.numel(), dtype=mine.dtype, device=mine.device
    )
    _all_gather(out, mine, tp.group)
    return out.view(-1, len(Meta))


def check_shards(metas: torch.Tensor, explicit: bool) -> int:
    """Host check of the ranks' metadata records: equal widths (default layout) and token
    counts, ranges tiling [0, V) (the same error on every rank). Returns V (one host sync)."""
    rows = metas.tolist()
    widths = [r[Meta.WIDTH] for r in rows]
    if not explicit and len(set(widths)) > 1:
        raise ValueError(
            f"vocab_parallel_tofu_loss: logits shard widths differ across ranks ({widths}); "
            "pass vocab_start/vocab_end for uneven shards"
        )
    counts = [r[Meta.ROWS] for r in rows]
    if len(set(counts)) > 1:
        raise ValueError(f"vocab_parallel_tofu_loss: token counts differ across ranks ({counts})")
    spans = [(r[Meta.VOCAB_START], r[Meta.VOCAB_END]) for r in rows]
    expect = 0
    for start, end in sorted(spans):
        if start != expect:
            raise ValueError(
                "vocab_parallel_tofu_loss: rank vocab ranges must tile [0, V) without gaps "
                f"or overlaps; got {spans}"
            )
        expect = end
    return expect
