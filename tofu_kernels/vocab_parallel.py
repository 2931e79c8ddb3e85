"""Vocab-parallel (tensor-parallel) TOFU loss: one packed collective per call.

Each rank holds a contiguous slice of the vocabulary (Megatron's layout: rank r holds
global columns [r * Vr, (r + 1) * Vr), or an explicit [vocab_start, vocab_end) for
uneven or padded shards). The forward computes the local row statistics with the same
backend kernels as the single-device path, exchanges them in ONE all-gather, merges
them with ``combine_stats`` and computes the loss identically on every rank. The
backward needs no collective: every rank already holds the global max, log Sb and g
of each row and writes only its own shard's gradient.

Why one all-gather of 4 fp32 per token (plus one metadata row) rather than Megatron's
three all-reduces (MAX, SUM, SUM) or MAX + one packed SUM: the merge needs every
rank's (m, S1, Sb) before any sum can be formed, and the payload is tiny (16 B/token:
16 KiB at 1K tokens, 1 MiB at 64K), so the step is latency-bound and one collective
beats two or three. Per rank it receives (tp - 1) * 16 B/token; a ring all-reduce moves
2 (tp - 1) / tp * 4 B/token per 4-byte field, i.e. 24 (tp - 1) / tp B/token for
Megatron's three, so bytes are equal at tp = 2.5 and ours is larger above (tp = 8:
112 vs 21 B/token, still ~2 MB at 16K tokens): latency, not volume, is the cost here.
The metadata row (each rank's vocab_start, vocab_end, width, rows as int32 bits) rides
in the same collective, so mismatched shards are caught without a second one.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ._inputs import check_labels, host_checks_allowed
from .loss import Shard, _tofu
from .reference import combine_stats


def _world(group) -> tuple[int, int]:
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _all_gather(out: torch.Tensor, inp: torch.Tensor, group) -> None:
    # torch >= 2.12 names it all_gather_single (all_gather_into_tensor is deprecated).
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp, group=group)


@functools.lru_cache(maxsize=64)
def _meta_row(start: int, end: int, width: int, n_rows: int, device: torch.device) -> torch.Tensor:
    """This rank's (vocab_start, vocab_end, width, rows) as int32 bits in one fp32 row.

    Cached per shape: the host-to-device copy happens once, never inside a CUDA graph.
    """
    meta = torch.tensor([start, end, width, n_rows], dtype=torch.int32).to(device)
    return meta.view(torch.float32).unsqueeze(0)


def _check_shards(meta: torch.Tensor, explicit: bool) -> None:
    """Host check of the gathered [world, 4] (vocab_start, vocab_end, width, rows)."""
    rows = meta.tolist()
    widths = {r[2] for r in rows}
    if not explicit and len(widths) > 1:
        raise ValueError(
            "vocab_parallel_tofu_loss: logits shard widths differ across ranks "
            f"({[r[2] for r in rows]}); pass vocab_start/vocab_end for uneven shards"
        )
    if len({r[3] for r in rows}) > 1:
        raise ValueError(
            f"vocab_parallel_tofu_loss: token counts differ across ranks ({[r[3] for r in rows]})"
        )
    spans = sorted((r[0], r[1]) for r in rows)
    expect = 0
    for start, end in spans:
        if start != expect:
            raise ValueError(
                "vocab_parallel_tofu_loss: rank vocab ranges must tile [0, V) without gaps "
                f"or overlaps; got {[(r[0], r[1]) for r in rows]}"
            )
        expect = end


def vocab_parallel_tofu_loss(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    gamma: float = 3.0,
    beta: float = 0.8,
    group=None,
    ignore_index: int = -100,
    backend: str = "auto",
    inplace_backward: bool = False,
    vocab_start: int | None = None,
    vocab_end: int | None = None,
    reduction: str = "none",
    return_ce: bool = False,
    check_inputs: bool = True,
):
    """TOFU loss over logits whose vocab dim is sharded across ``group``.

    Args:
        logits_shard: ``[..., Vr]`` this rank's columns (fp32/bf16/fp16, strided views ok).
        labels: ``[...]`` global ids (identical on all ranks) or ``ignore_index``.
        group: the tensor-parallel process group (None: the default group; no
            communication at all when torch.distributed is not initialized or the
            world size is 1).
        vocab_start, vocab_end: the global columns this rank holds as its first
            ``vocab_end - vocab_start`` local columns (default ``rank * Vr`` and
            ``+ Vr``); the rest of the row is padding and never contributes.
        reduction, return_ce, inplace_backward, backend: as in :func:`tofu_loss`.
        check_inputs: host checks in eager mode (labels in ``[0, V)``, shard ranges
            tiling ``[0, V)``, equal widths and token counts); without them invalid
            labels give NaN.

    Returns:
        fp32 per-token loss of ``labels``' shape (for ``reduction="none"``), identical
        on every rank; the gradient flows into this rank's shard only.
    """
    world, rank = _world(group)
    explicit = vocab_start is not None or vocab_end is not None

    def make_shard(x: torch.Tensor, check: bool) -> Shard:
        width = x.shape[-1]
        start = rank * width if vocab_start is None else int(vocab_start)
        end = start + width if vocab_end is None else int(vocab_end)
        if not 0 <= start <= end or end - start > width:
            raise ValueError(
                f"vocab_parallel_tofu_loss: [vocab_start, vocab_end) = [{start}, {end}) must "
                f"be a valid range of at most the shard width {width}"
            )
        if world == 1:
            return Shard(start, end - start, end)
        n_rows = x.numel() // width

        def reduce_stats(stats: torch.Tensor):
            meta = _meta_row(start, end, width, n_rows, stats.device)
            packed = torch.cat([stats, meta])  # [N + 1, 4]
            gathered = torch.empty(world * (n_rows + 1), 4, dtype=torch.float32, device=stats.device)
            _all_gather(gathered, packed, group)
            gathered = gathered.view(world, n_rows + 1, 4)
            metas = gathered[:, n_rows].contiguous().view(torch.int32)  # [world, 4]
            vocab_size = metas[:, 1].amax().to(torch.int64)  # on device: no sync
            if check and host_checks_allowed(stats):
                _check_shards(metas, explicit)
                check_labels(labels, ignore_index, int(vocab_size))
            return combine_stats(gathered[:, :n_rows], beta, dim=0), vocab_size

        return Shard(start, end - start, end, reduce_stats)

    return _tofu(
        logits_shard, labels, gamma, beta, ignore_index, reduction, backend, inplace_backward,
        return_ce, check_inputs, make_shard,
    )
