"""What the GPU backends (Triton and CUDA) share: launch policy, output buffers, upstream."""

from __future__ import annotations

import torch

from ..tofu_math import GradParam


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


def upstream_of(upstream: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(1-D fp32 upstream gradient, elements per row): stride 0 for a scalar, so the kernels
    read ``upstream[row * stride]`` (a copy only for an unusual dtype or layout)."""
    up = upstream.reshape(-1)
    if up.dtype != torch.float32:
        up = up.float()
    return up, (0 if up.numel() == 1 else up.stride(0))


def epilogue_buffers(n_rows: int, device: torch.device, with_rec: bool):
    """The outputs an epilogue (or the fused forward) writes: per-row loss and cross entropy,
    the backward's record (or None), and ``red`` fp32 [3] = reduced loss, reduced cross
    entropy, scale."""
    f32 = dict(dtype=torch.float32, device=device)
    rec = torch.empty(n_rows, len(GradParam), **f32) if with_rec else None
    return torch.empty(n_rows, **f32), torch.empty(n_rows, **f32), rec, torch.empty(3, **f32)
