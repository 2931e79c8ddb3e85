"""Which vocab columns a rank holds (:class:`Shard`) and how a backend walks the rows of a
logits tensor without copying it (:class:`RowLayout`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """Local column ``j < n_valid`` is global column ``vocab_start + j``; the rest of the row
    is padding (no contribution, gradient 0). A whole row on one device: ``Shard(0, V)``."""

    vocab_start: int
    n_valid: int

    @property
    def vocab_end(self) -> int:
        return self.vocab_start + self.n_valid


@dataclass(frozen=True)
class RowLayout:
    """Row ``r`` of a [..., V] tensor starts at ``(r // n_inner) * s_outer + (r % n_inner) *
    s_inner`` (docs/design.md section 5, "Row layout")."""

    n_rows: int
    n_inner: int
    s_outer: int
    s_inner: int
    width: int


def row_layout(x: torch.Tensor) -> tuple[torch.Tensor, RowLayout]:
    """``x`` and its row layout; ``x`` is copied only when its vocab dim's stride is not 1
    or its leading dims do not collapse into two strided groups."""
    width = x.shape[-1]
    if x.stride(-1) != 1 and width > 1:
        x = x.contiguous()
    groups: list[list[int]] = []  # [size, stride], outermost first
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if groups and groups[-1][1] == stride * size:
            groups[-1] = [groups[-1][0] * size, stride]
        else:
            groups.append([size, stride])
    if len(groups) > 2:
        x = x.contiguous()
        groups = [[x.numel() // width, width]]
    n_rows = x.numel() // width if width else 0
    if not groups:
        return x, RowLayout(n_rows, 1, 0, 0, width)
    if len(groups) == 1:
        return x, RowLayout(n_rows, 1, groups[0][1], 0, width)
    (_, s_outer), (n_inner, s_inner) = groups
    return x, RowLayout(n_rows, n_inner, s_outer, s_inner, width)


def dense_layout(lay: RowLayout) -> RowLayout:
    """Layout of a contiguous tensor of ``lay``'s shape with its row grouping (backends walk
    ``x`` and its gradient with one ``n_inner``)."""
    return RowLayout(lay.n_rows, lay.n_inner, lay.n_inner * lay.width, lay.width, lay.width)
