"""The fp32 records the loss passes between its steps, named once; ``csrc/tofu_math.cuh``
mirrors them (docs/design.md section 5). A record is a row of an fp32 tensor whose last
dimension is the record's length; a field is an index into it."""

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
    """Statistics of (part of) a row: ``M = max z``, ``S1 = sum exp(z - m)``, ``SB = sum
    exp((z - m) / beta)``, ``ZT`` the target logit (0 if not among the columns); a part that
    saw no column is ``(-inf, 0, 0, 0)``."""

    M, S1, SB, ZT = 0, 1, 2, 3


class Metric(IntEnum):
    """The per-row metrics (``return_metrics``): ``ENTROPY`` of the untempered softmax,
    ``log S1 - E / S1``; ``TOP1`` 1.0 where the target is the row's first maximum (``argmax
    == target``, ties as greedy decoding counts them). 0 for ignored rows, NaN for invalid
    labels."""

    ENTROPY, TOP1 = 0, 1


class MetricAcc(IntEnum):
    """The metric accumulators of (part of) a row: ``E = sum exp(z - m) (z - m)`` (merged like
    ``S1``), ``BEFORE`` the largest logit before the target column (-inf if none; merged by
    max): the target is the first maximum when ``z_t == m`` and ``BEFORE < m``."""

    E, BEFORE = 0, 1


class GradParam(IntEnum):
    """What the backward kernel reads per row: ``G`` the focal weight (0 for ignored rows),
    ``M`` the global row max, ``LOG_SB = log Sb`` and ``QT_M1 = q_t - 1 = expm1(log q_t)``."""

    G, M, LOG_SB, QT_M1 = 0, 1, 2, 3


class Meta(IntEnum):
    """A rank's metadata record under tensor parallelism: int32 bits in one statistics
    record after the rank's statistics."""

    VOCAB_START, VOCAB_END, WIDTH, ROWS = 0, 1, 2, 3


class Reduced(IntEnum):
    """A forward's reduced loss and cross entropy, and ``SCALE`` (1 / the token count for a
    mean, else 1), which the backward multiplies in."""

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
    """Every row's partial records as the statistics step leaves them. ``data`` is flat fp32:
    rank ``w``'s block starts at ``w * rank_stride`` floats and holds ``n_rows * splits``
    :class:`Stat` records (row-major), then with ``has_meta`` one :class:`Meta` record, then
    with ``metrics`` ``n_rows * splits`` :class:`MetricAcc` records."""

    data: torch.Tensor
    n_rows: int
    splits: int
    world: int = 1
    rank_stride: int = 0  # floats between ranks' blocks
    has_meta: bool = False  # a metadata record follows each rank's records
    metrics: bool = False  # the metric accumulators follow

    def per_rank(self) -> int:
        """Floats of one rank's block."""
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
    """What the forward's O(N) step leaves: per-row ``loss`` and ``ce``, ``grad_rec`` (None
    with the gradient in the forward), the :class:`Reduced` values (``scale`` keeps its
    dimension: the kernels read a tensor), ``metrics`` (None unless asked for)."""

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
    """What ``return_metrics=True`` adds, per token (``labels``' shape, fp32, no gradient, 0
    at ignored tokens): the entropy of the untempered softmax and ``top1`` (1.0 where the
    target is a most likely token); summed, TRL's ``entropy`` and ``mean_token_accuracy``
    numerators."""

    entropy: torch.Tensor
    top1: torch.Tensor

    @classmethod
    def of(cls, metrics: torch.Tensor, shape) -> TokenMetrics:
        """Views of a ``[N, len(Metric)]`` record tensor, in ``shape``."""
        return cls(metrics[:, Metric.ENTROPY].view(shape), metrics[:, Metric.TOP1].view(shape))
