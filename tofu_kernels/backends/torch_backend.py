"""Pure-PyTorch backend: the CPU path and the fallback on any device.

Same interface and numerics contract as the Triton and CUDA backends (fp32 statistics,
closed-form fused gradient), processed in row chunks so the only temporaries are a few
fp32 copies of one chunk (``CHUNK_ELEMS`` elements), never N x V.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .._inputs import RowLayout, Shard
from ..tofu_math import GradParam, Stat
from ._common import finalize_in_torch as finalize  # noqa: F401  (Backend.finalize)

NAME = "torch"
# 4 Mi fp32 elements = 16 MiB per temporary; a chunk holds at most a handful of them.
CHUNK_ELEMS = 1 << 22


def available(device: torch.device) -> tuple[bool, str]:
    return True, ""


def _row_blocks(x: torch.Tensor, lay: RowLayout) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield (first row, end row, strided view of those rows) covering all rows in order."""
    n_outer = lay.n_rows // lay.n_inner
    x3 = x.as_strided(
        (n_outer, lay.n_inner, lay.width), (lay.s_outer, lay.s_inner, 1), x.storage_offset()
    )
    rows = max(1, CHUNK_ELEMS // max(lay.width, 1))
    if lay.n_inner >= rows:
        for o in range(n_outer):
            for i0 in range(0, lay.n_inner, rows):
                i1 = min(i0 + rows, lay.n_inner)
                yield o * lay.n_inner + i0, o * lay.n_inner + i1, x3[o, i0:i1]
    else:
        step = rows // lay.n_inner
        for o0 in range(0, n_outer, step):
            o1 = min(o0 + step, n_outer)
            yield o0 * lay.n_inner, o1 * lay.n_inner, x3[o0:o1]


def _target_cols(labels: torch.Tensor, shard: Shard):
    local = labels - shard.vocab_start
    hit = (local >= 0) & (local < shard.n_valid)
    return local.clamp(0, max(shard.n_valid - 1, 0)).unsqueeze(1), hit


def row_stats(
    x: torch.Tensor, lay: RowLayout, labels: torch.Tensor, shard: Shard, beta: float, ignore_index: int
) -> torch.Tensor:
    """fp32 [N, len(Stat)] statistics over columns [0, n_valid) of each row."""
    n_valid = shard.n_valid
    stats = torch.zeros(lay.n_rows, len(Stat), dtype=torch.float32, device=x.device)
    if n_valid == 0:  # a shard holding only padding columns: (-inf, 0, 0, 0)
        stats[:, Stat.M] = -torch.inf
        return stats
    for r0, r1, block in _row_blocks(x, lay):
        z = block.reshape(r1 - r0, lay.width)[:, :n_valid].float()
        m = z.amax(dim=1)
        e = z - m.unsqueeze(1)
        s1 = e.exp().sum(dim=1)
        sb = s1 if beta == 1.0 else e.div_(beta).exp_().sum(dim=1)
        col, hit = _target_cols(labels[r0:r1], shard)
        zt = torch.where(hit, z.gather(1, col).squeeze(1), 0.0)
        for field, value in ((Stat.M, m), (Stat.S1, s1), (Stat.SB, sb), (Stat.ZT, zt)):
            stats[r0:r1, field] = value
    return stats


def grad(
    x: torch.Tensor,
    lay: RowLayout,
    out: torch.Tensor,
    out_lay: RowLayout,
    labels: torch.Tensor,
    grad_params: torch.Tensor,
    shard: Shard,
    beta: float,
) -> None:
    """Write ``coef * (softmax(z/beta) - onehot)`` into ``out`` (may alias ``x``).

    ``grad_params[N, len(GradParam)]`` fp32, every per-token factor already folded into
    ``coef``; padding columns [n_valid, width) get 0.
    """
    assert out_lay.n_inner == lay.n_inner, "out must share x's row grouping"
    n_valid = shard.n_valid
    out_blocks = _row_blocks(out, out_lay)
    for (r0, r1, block), (_, _, out_block) in zip(_row_blocks(x, lay), out_blocks):
        p = grad_params[r0:r1]
        coef, m, log_sb, qt_m1 = (p[:, f] for f in GradParam)
        z = block.reshape(r1 - r0, lay.width)[:, :n_valid].float()
        g = torch.zeros(r1 - r0, lay.width, dtype=torch.float32, device=x.device)
        q = ((z - m.unsqueeze(1)) / beta - log_sb.unsqueeze(1)).exp_()
        g[:, :n_valid] = q.mul_(coef.unsqueeze(1))
        col, hit = _target_cols(labels[r0:r1], shard)
        g.scatter_(1, col, torch.where(hit, coef * qt_m1, g.gather(1, col).squeeze(1)).unsqueeze(1))
        out_block.copy_(g.view(out_block.shape))
