"""Tensor parallelism over the vocabulary: where a rank's columns sit, and the one collective.

Each rank holds a contiguous slice of the vocabulary (Megatron's layout: rank r holds
global columns [r * Vr, (r + 1) * Vr), or an explicit [vocab_start, vocab_end) for
uneven or padded shards). The loss (``core.py``) computes each rank's row statistics
with the same backend kernels as the single-device path, :func:`all_gather_stats`
exchanges them in ONE all-gather, and every rank's epilogue merges them in the same
order, so that every rank computes the same loss; the backward needs no collective
(every rank holds the global max, log Sb and g).

Why one all-gather of the statistics rather than Megatron's three all-reduces (MAX, SUM,
SUM) or MAX + one packed SUM: the merge needs every rank's (m, S1, Sb) before any sum can
be formed, and the payload is small, so the step is latency-bound and one collective beats
two or three, although it moves more bytes at every real tp (the bytes per token and the
comparison: docs/design.md section 4; what the metrics add: section 2). The metadata record
(``records.Meta``: each rank's vocab_start, vocab_end, width and rows as int32 bits) rides
in the same collective: the epilogue reads the global vocab size from it on the device.
Calls that check their inputs exchange the metadata records alone first
(:func:`exchange_meta`), because the statistics' all-gather needs equal token counts
before it can run.
"""

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
    """Tensor-parallel options of :func:`tofu_kernels.vocab_parallel_tofu_loss`.

    ``group``: the tensor-parallel process group (None: the default group).
    ``vocab_start`` / ``vocab_end``: the global columns this rank holds as its first
    ``vocab_end - vocab_start`` local columns (default ``rank * width`` and ``+ width``);
    the rest of the local row is padding.
    """

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
    """This rank's :class:`Shard` of a local row ``width`` wide, and ``tp`` itself, or None
    when there is nothing to merge (no tensor parallelism, or a world of one: no
    communication at all)."""
    if tp is None:
        return Shard(0, width), None
    world, rank = tp.world_and_rank()
    return tp.local_shard(width, rank), (tp if world > 1 else None)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    # torch >= 2.12 names it all_gather_single (all_gather_into_tensor is deprecated).
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


def all_gather_stats(parts: Partials, tp: TensorParallel) -> Partials:
    """The one collective: every rank's partial statistics and metadata record.

    ``parts`` is this rank's (with its metadata record, written by the statistics kernel);
    the result holds all ranks' blocks, in rank order, for the epilogue to merge (the
    merge and the global vocab size happen there, in one kernel on the GPU backends).
    """
    world = dist.get_world_size(tp.group)
    data = parts.data.reshape(-1)
    gathered = torch.empty(world * data.numel(), dtype=torch.float32, device=data.device)
    _all_gather(gathered, data, tp.group)
    return parts._replace(data=gathered, world=world, rank_stride=data.numel())


def exchange_meta(parts: Partials, tp: TensorParallel) -> torch.Tensor:
    """Every rank's metadata record ``[world, len(Meta)]`` int32, gathered on its own before
    the statistics (16 B per rank): the statistics' all-gather needs equal token counts on
    every rank, so the check that they are equal must not ride in it. Only calls that check
    their inputs pay this second, tiny collective."""
    mine = parts.metas().reshape(-1)  # this rank's record (parts before the all-gather)
    out = torch.empty(
        dist.get_world_size(tp.group) * mine.numel(), dtype=mine.dtype, device=mine.device
    )
    _all_gather(out, mine, tp.group)
    return out.view(-1, len(Meta))


def check_shards(metas: torch.Tensor, explicit: bool) -> int:
    """Host check of every rank's metadata record (:func:`exchange_meta`): equal widths
    (default layout), equal token counts, and rank ranges that tile [0, V) without gaps or
    overlaps. Every rank sees the same records, so every rank raises the same error.
    Returns the global vocab size (one host sync; eager mode only)."""
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
