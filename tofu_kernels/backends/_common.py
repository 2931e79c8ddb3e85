"""Launch-policy helpers shared by the GPU backends (Triton and CUDA)."""

from __future__ import annotations

import torch

from ..reference import combine_stats


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
    """[N, splits, 4] partial statistics -> [N, 4] (a view when there is one split)."""
    return stats[:, 0] if stats.shape[1] == 1 else combine_stats(stats, beta, dim=1)
