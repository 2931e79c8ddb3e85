"""Which vocab columns a rank holds (:class:`Shard`) and how a backend walks the rows of a
logits tensor without copying it (:class:`RowLayout`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Shard:
    """Which global vocab columns the last dim of a logits tensor holds.

    Local column ``j < n_valid`` is global column ``vocab_start + j``; the remaining
    columns of the row are padding and never contribute (their gradient is 0). A whole
    row on one device is ``Shard(0, V)``.
    """

    vocab_start: int
    n_valid: int

    @property
    def vocab_end(self) -> int:
        return self.vocab_start + self.n_valid


@dataclass(frozen=True)
class RowLayout:
    """Rows of a [..., V] tensor addressed as ``(r // n_inner) * s_outer + (r % n_inner) * s_inner``.

    Two strides cover contiguous [N, V] logits as well as Megatron's [s, b, v] tensor
    seen as [b, s, v] (a transpose view), without a copy.
    """

    n_rows: int
    n_inner: int
    s_outer: int
    s_inner: int
    width: int


def row_layout(x: torch.Tensor) -> tuple[torch.Tensor, RowLayout]:
    """Return ``x`` (copied once, deliberately, only if unavoidable) and its row layout.

    The vocab dim must have stride 1 and the leading dims must collapse into at most
    two strided groups; otherwise the tensor is made contiguous.
    """
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
    """Layout of a contiguous tensor of the same shape, with the same row grouping.

    Backends walk ``x`` and its gradient with one ``n_inner``, so a freshly allocated
    contiguous gradient is described with ``x``'s grouping.
    """
    return RowLayout(lay.n_rows, lay.n_inner, lay.n_inner * lay.width, lay.width, lay.width)
