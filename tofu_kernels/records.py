"""The fp32 records the loss passes between its steps, named once (docs/design.md section 5).

Every backend reads and writes these layouts: the Triton kernels as compile-time field
offsets, the CUDA kernels through ``csrc/tofu_math.cuh`` (namespaces ``tofu::stat``,
``tofu::gparam``, ``tofu::meta``, ``tofu::reduced``, ``tofu::reduction``, ``tofu::metric``,
``tofu::macc``;
a test compares the two field by field). A record is a row of an fp32 tensor whose last dimension is the
record's length; a field is an index into it.

The math that fills them is :mod:`tofu_kernels.tofu_math`.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

import torch

__all__ = [
    "Epilogue",
    "GradParam",
    "Meta",
    "Metric",
    "MetricAcc",
    "Partials",
    "Reduced",
    "Reduction",
    "Stat",
    "TokenMetrics",
    "meta_record",
]


class Stat(IntEnum):
    """Statistics of one row, or of part of it: ``[..., len(Stat)]``.

    ``M = max_j z_j`` over the columns seen, ``S1 = sum_j exp(z_j - m)``,
    ``SB = sum_j exp((z_j - m) / beta)``, ``ZT`` the target logit (0 when the target is not
    among the columns). A part that saw no column is ``(-inf, 0, 0, 0)``.
    """

    M, S1, SB, ZT = 0, 1, 2, 3


class Metric(IntEnum):
    """The optional per-row metrics (``return_metrics=True``): ``[N, len(Metric)]`` fp32.

    ``ENTROPY`` of the untempered softmax, ``-sum_j p_j log p_j = log S1 - E / S1`` with the
    accumulator ``E`` of the statistics pass (:class:`MetricAcc`); ``TOP1`` 1.0 when the
    target is the row's first maximum (``z_t == m`` and every column before the target is
    below ``m``: ``argmax == target``, as greedy decoding and TRL's ``mean_token_accuracy``
    count ties), else 0.0. Both 0 for ignored rows, NaN for invalid labels.
    """

    ENTROPY, TOP1 = 0, 1


class MetricAcc(IntEnum):
    """The metric accumulators of one part of a row (they follow the statistics in
    :class:`Partials` when metrics are asked for): ``[..., len(MetricAcc)]`` fp32.

    ``E = sum_j exp(z_j - m) (z_j - m)`` over the part's columns (merged like ``S1``, moved to
    the common max); ``BEFORE`` the largest logit among the part's columns before the target
    (global column ``< label``; -inf if none), merged by max: the target is the first
    maximum when ``z_t == m`` and ``BEFORE < m``.
    """

    E, BEFORE = 0, 1


class GradParam(IntEnum):
    """What the backward kernel reads per row: ``[N, len(GradParam)]``.

    ``G`` the focal weight (0 for ignored rows), ``M`` the global row max, ``LOG_SB = log Sb``
    (so ``q_j = exp((z_j - m) / beta - log Sb)``) and ``QT_M1 = q_t - 1 = expm1(log q_t)``.
    The gradient kernel folds ``coef = upstream_i * scale * G`` in fp32 itself.
    """

    G, M, LOG_SB, QT_M1 = 0, 1, 2, 3


class Meta(IntEnum):
    """A rank's metadata record under tensor parallelism: one ``len(Stat)``-wide record of
    int32 bits after the rank's statistics, sent in the same all-gather."""

    VOCAB_START, VOCAB_END, WIDTH, ROWS = 0, 1, 2, 3


class Reduced(IntEnum):
    """The reduced outputs of a forward, fp32 ``[len(Reduced)]``: the loss and the cross
    entropy (summed, or the mean over non-ignored tokens) and ``SCALE`` (1 / that token
    count for a mean, else 1), which the backward multiplies in."""

    LOSS, CE, SCALE = 0, 1, 2


class Reduction(IntEnum):
    """``reduction=`` as the kernels see it."""

    NONE, SUM, MEAN = 0, 1, 2


def meta_record(vocab_start: int, vocab_end: int, width: int, rows: int, device) -> torch.Tensor:
    """One rank's :class:`Meta` record as one fp32 statistics record (int32 bits)."""
    fields = {
        Meta.VOCAB_START: vocab_start,
        Meta.VOCAB_END: vocab_end,
        Meta.WIDTH: width,
        Meta.ROWS: rows,
    }
    return torch.tensor([fields[f] for f in Meta], dtype=torch.int32, device=device).view(
        torch.float32
    )


class Partials(NamedTuple):
    """Partial :class:`Stat` records of every row as the statistics step leaves them.

    ``data`` is flat fp32: rank ``w`` (tensor-parallel ranks, 1 on a single device) starts
    at ``w * rank_stride`` floats and holds ``n_rows * splits`` records, row-major
    (``splits`` column chunks per row), followed under tensor parallelism by one metadata
    record (:class:`Meta`), followed with ``metrics`` (metrics asked for) by the metric
    accumulators: ``n_rows * splits`` :class:`MetricAcc` records of the same parts (so the one all-gather
    carries them too; without metrics nothing is written or sent). Every part of a row is
    merged by the epilogue, in a fixed order.
    """

    data: torch.Tensor
    n_rows: int
    splits: int
    world: int = 1
    rank_stride: int = 0  # floats between ranks' blocks
    has_meta: bool = False  # a metadata record follows each rank's records
    metrics: bool = False  # the metric accumulators follow

    def per_rank(self) -> int:
        """Floats of one rank's block: records, metadata record, metric accumulators."""
        parts = self.n_rows * self.splits
        return (parts + int(self.has_meta)) * len(Stat) + parts * len(MetricAcc) * int(self.metrics)

    def _ranks(self) -> torch.Tensor:
        """``[world, floats per rank]`` view of ``data``."""
        stride = self.rank_stride or self.per_rank()
        return self.data.view(-1)[: self.world * stride].view(self.world, stride)

    def _blocks(self) -> torch.Tensor:
        """``[world, records per rank, len(Stat)]`` view of the records (and metadata)."""
        n = (self.n_rows * self.splits + int(self.has_meta)) * len(Stat)
        return self._ranks()[:, :n].reshape(self.world, -1, len(Stat))

    def records(self) -> torch.Tensor:
        """``[world, n_rows, splits, len(Stat)]`` view of the statistics records."""
        rec = self._blocks()[:, : self.n_rows * self.splits]
        return rec.reshape(self.world, self.n_rows, self.splits, len(Stat))

    def metas(self) -> torch.Tensor:
        """``[world, len(Meta)]`` int32: every rank's metadata record (``has_meta`` only)."""
        return self._blocks()[:, self.n_rows * self.splits].contiguous().view(torch.int32)

    def metric_accs(self) -> torch.Tensor:
        """``[world, n_rows, splits, len(MetricAcc)]`` view of the metric accumulators (``metrics`` only)."""
        start = (self.n_rows * self.splits + int(self.has_meta)) * len(Stat)
        n = self.n_rows * self.splits * len(MetricAcc)
        return self._ranks()[:, start : start + n].reshape(
            self.world, self.n_rows, self.splits, len(MetricAcc)
        )


class Epilogue(NamedTuple):
    """What the forward's O(N) step leaves: per-row loss and cross entropy ``[N]``, the
    backward's record ``[N, len(GradParam)]`` (None where the gradient was made in the
    forward), the :class:`Reduced` values as one-element views (``scale`` keeps its
    dimension: the gradient kernels read it as a tensor), and the :class:`Metric` records
    ``[N, len(Metric)]`` (None unless metrics were asked for)."""

    loss: torch.Tensor
    ce: torch.Tensor
    grad_rec: torch.Tensor | None
    loss_red: torch.Tensor
    ce_red: torch.Tensor
    scale: torch.Tensor
    metrics: torch.Tensor | None = None

    @classmethod
    def of(
        cls,
        loss: torch.Tensor,
        ce: torch.Tensor,
        grad_rec: torch.Tensor | None,
        red: torch.Tensor,
        metrics: torch.Tensor | None = None,
    ) -> Epilogue:
        """From the per-row outputs and the fp32 ``[len(Reduced)]`` buffer a kernel wrote."""
        return cls(
            loss, ce, grad_rec, red[Reduced.LOSS], red[Reduced.CE], red[Reduced.SCALE :], metrics
        )


class TokenMetrics(NamedTuple):
    """What ``return_metrics=True`` adds to a loss's result, per token (``labels``' shape,
    fp32, no gradient): the entropy of the untempered next-token distribution and ``top1``,
    1.0 where the target is a most likely token (their sums over non-ignored tokens are
    TRL's ``entropy`` and ``mean_token_accuracy`` numerators). 0 at ignored tokens."""

    entropy: torch.Tensor
    top1: torch.Tensor

    @classmethod
    def of(cls, metrics: torch.Tensor, shape) -> TokenMetrics:
        """Views of a ``[N, len(Metric)]`` record tensor, in ``shape``."""
        return cls(metrics[:, Metric.ENTROPY].view(shape), metrics[:, Metric.TOP1].view(shape))
