"""Pieces shared by the backends: the default finalize, and the GPU launch policy."""

from __future__ import annotations

import torch

from ..params import TOFUParams
from ..tofu_math import RowResult, combine_stats, finalize_stats


def finalize_in_torch(stats: torch.Tensor, labels: torch.Tensor, params: TOFUParams, vocab_size) -> RowResult:
    """The default ``Backend.finalize``: the O(N) epilogue as plain torch operations."""
    return finalize_stats(stats, labels, params.gamma, params.beta, params.ignore_index, vocab_size)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def num_splits(n_rows: int, n_valid: int, tile: int, target_programs: int) -> int:
    """Programs per row for the statistics pass.

    One program per row is best when rows are many; when ``n_rows`` alone cannot fill
    the GPU (``target_programs``, a few waves over 132 SMs), each row is split into up
    to ``n_valid / tile`` column chunks whose partial statistics are merged afterwards.
    """
    tiles = cdiv(max(n_valid, 1), tile)
    return max(1, min(tiles, cdiv(target_programs, max(n_rows, 1)), 65535))


def split_chunk(n_valid: int, splits: int, tile: int) -> int:
    """Columns per split: a multiple of ``tile`` (keeps 16-byte alignment of every split)."""
    return cdiv(cdiv(max(n_valid, 1), tile), splits) * tile


def merge_splits(stats: torch.Tensor, beta: float) -> torch.Tensor:
    """[N, splits, len(Stat)] partial statistics -> [N, len(Stat)] (a view for one split)."""
    return stats[:, 0] if stats.shape[1] == 1 else combine_stats(stats, beta, dim=1)
