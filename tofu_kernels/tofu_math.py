"""The TOFU math of the fast path, in one place (docs/design.md section 2).

Every backend computes, in one read of the logits, the per-row statistics record
:class:`Stat` (m, S1, Sb, z_t), merges partial records with :func:`combine_stats` (vocab
splits inside one kernel, or tensor-parallel ranks), and turns the merged record into the
loss, the focal weight and the backward's per-row record :class:`GradParam` with
:func:`finalize_stats`. These O(N) functions are plain torch: the torch backend's
epilogue (:func:`epilogue_in_torch`); the Triton kernels write the same formulas
(``triton_backend._finalize``) and ``csrc/tofu_math.cuh`` is their CUDA twin (same
records, same formulas; ``tests/test_cuda_ext.py`` ties the two together).

The float64 specification the tests compare against is elsewhere
(:mod:`tofu_kernels.reference`); nothing in the fast path imports it.
"""

from __future__ import annotations

import math
from enum import IntEnum
from typing import NamedTuple

import torch

__all__ = [
    "Stat",
    "GradParam",
    "Meta",
    "Reduction",
    "RowResult",
    "Partials",
    "Epilogue",
    "focal_weight",
    "combine_stats",
    "finalize_stats",
    "reduce_rows",
    "epilogue_in_torch",
    "row_coef",
]


class Stat(IntEnum):
    """Fields of the fp32 statistics record ``[..., len(Stat)]`` of one row (or part of it).

    ``M = max_j z_j`` over the columns seen, ``S1 = sum_j exp(z_j - m)``,
    ``SB = sum_j exp((z_j - m) / beta)``, ``ZT`` the target logit (0 when the target is not
    among the columns). A part that saw no column is ``(-inf, 0, 0, 0)``.
    Mirrored in ``csrc/tofu_math.cuh`` (namespace ``tofu::stat``).
    """

    M = 0
    S1 = 1
    SB = 2
    ZT = 3


class GradParam(IntEnum):
    """Fields of the fp32 per-row record ``[N, len(GradParam)]`` the backward kernel reads.

    ``G`` the focal weight (0 for ignored rows), ``M`` the global row max,
    ``LOG_SB = log Sb`` (so ``q_j = exp((z_j - m) / beta - log Sb)``) and
    ``QT_M1 = q_t - 1 = expm1(log q_t)``. The gradient kernel folds ``coef = upstream_i *
    scale * G`` in fp32 itself (``scale`` = 1 / token count for a mean, else 1).
    Mirrored in ``csrc/tofu_math.cuh`` (namespace ``tofu::gparam``).
    """

    G = 0
    M = 1
    LOG_SB = 2
    QT_M1 = 3


class Meta(IntEnum):
    """Fields of a rank's metadata record under tensor parallelism: one ``len(Stat)``-wide
    record of int32 bits sent in the same all-gather as the statistics (mirrored in
    ``csrc/tofu_math.cuh``, namespace ``tofu::meta``)."""

    VOCAB_START = 0
    VOCAB_END = 1
    WIDTH = 2
    ROWS = 3


class Reduction(IntEnum):
    """``reduction=`` as the kernels see it."""

    NONE = 0
    SUM = 1
    MEAN = 2


def meta_record(vocab_start: int, vocab_end: int, width: int, rows: int, device) -> torch.Tensor:
    """One rank's :class:`Meta` record as one fp32 statistics record (int32 bits), as the GPU
    statistics kernels write it after their records."""
    fields = {Meta.VOCAB_START: vocab_start, Meta.VOCAB_END: vocab_end, Meta.WIDTH: width, Meta.ROWS: rows}
    return torch.tensor([fields[f] for f in Meta], dtype=torch.int32, device=device).view(torch.float32)


class RowResult(NamedTuple):
    """Per-row outputs of :func:`finalize_stats` (fp32, shape [N]); ``tofu::RowOut`` in
    ``csrc/tofu_math.cuh`` has the same fields in the same order."""

    loss: torch.Tensor  # -g * beta * log q_t; 0 for ignored rows, NaN for invalid labels
    ce: torch.Tensor  # plain cross entropy LSE(z) - z_t (for logging perplexity)
    g: torch.Tensor  # focal weight; 0 for ignored rows, NaN for invalid labels
    m: torch.Tensor  # global row max (0 for ignored rows, so the backward stays finite)
    log_sb: torch.Tensor  # log Sb, so q_j = exp((z_j - m) / beta - log_sb)
    qt_m1: torch.Tensor  # q_t - 1 = expm1(log q_t), exact near q_t = 1


def focal_weight(log_p: torch.Tensor, gamma: float) -> torch.Tensor:
    """Detached focal weight g(p) = (1-p)^gamma - gamma p (1-p)^(gamma-1) log p.

    Evaluated in log space so that it is finite everywhere (the direct formula gives
    0 * inf = NaN at p -> 1 for gamma < 1 and 0 * -inf at p -> 0):

        om = 1 - p = -expm1(log p)          (no cancellation near p = 1)
        g  = om^gamma * (1 + gamma * p * r),  r = -log p / om  (-> 1 as p -> 1)

    which is the same expression as om^(gamma-1) * (om - gamma p log p). Limits:
    g = 1 for gamma = 0; g -> 0 as p -> 1 for gamma > 0; p * r -> 0 as p -> 0.
    Computed in the dtype of ``log_p`` (fp32 in the kernels).
    """
    if gamma == 0.0:
        return torch.ones_like(log_p)
    lp = log_p.clamp(max=0.0)
    p = lp.exp()
    om = -torch.expm1(lp)
    pos = om > 0
    r = torch.where(pos, -lp / torch.where(pos, om, 1.0), 1.0)
    pr = torch.where(p > 0, p * r, 0.0)  # p == 0 only when log p == -inf: p * r -> 0
    return torch.exp(gamma * torch.log(om)) * (1.0 + gamma * pr)


def combine_stats(stats: torch.Tensor, beta: float, dim: int) -> torch.Tensor:
    """Merge partial :class:`Stat` records along ``dim`` (vocab splits or TP ranks).

    ``M = max m_r``, ``S1 = sum S1_r exp(m_r - M)``, ``Sb = sum Sb_r exp((m_r - M)/beta)``,
    ``z_t = sum zt_r``. A part that saw no column (m_r = -inf, S = 0) contributes 0.
    The result drops ``dim``.
    """
    m, s1, sb, zt = (stats[..., f] for f in Stat)
    big_m = m.amax(dim=dim, keepdim=True)
    safe = torch.where(big_m == -math.inf, 0.0, big_m)
    scale = torch.exp(m - safe)
    out_s1 = (s1 * scale).sum(dim)
    if beta == 1.0:
        out_sb = out_s1
    else:
        out_sb = (sb * torch.exp((m - safe) / beta)).sum(dim)
    return torch.stack([big_m.squeeze(dim), out_s1, out_sb, zt.sum(dim)], dim=-1)


def finalize_stats(
    stats: torch.Tensor,
    labels: torch.Tensor,
    gamma: float,
    beta: float,
    ignore_index: int,
    vocab_size: int | torch.Tensor,
) -> RowResult:
    """Loss, focal weight and backward scalars from merged records ``stats[N, len(Stat)]``.

    ``labels`` are global ids; a label that is neither ``ignore_index`` nor in
    ``[0, vocab_size)`` yields NaN loss and g (never a plausible number), which is all a
    kernel can do where no host check is possible (CUDA graphs, torch.compile).
    """
    m, s1, sb, zt = (stats[..., f] for f in Stat)
    ignored = labels == ignore_index
    invalid = ~ignored & ((labels < 0) | (labels >= vocab_size))
    keep = ~(ignored | invalid)
    m = torch.where(keep, m, 0.0)
    zt_m = torch.where(keep, zt - m, 0.0)  # exact: both are fp32 copies of logits
    log_s1 = torch.where(keep, torch.log(s1), 0.0)
    log_sb = torch.where(keep, torch.log(sb), 0.0)
    log_p = zt_m - log_s1
    log_qt = zt_m / beta - log_sb
    g = focal_weight(log_p, gamma)
    nan = torch.full_like(m, math.nan)

    def mask(x: torch.Tensor) -> torch.Tensor:
        return torch.where(invalid, nan, torch.where(ignored, 0.0, x))

    return RowResult(
        loss=mask(-g * beta * log_qt),
        ce=mask(-log_p),
        g=mask(g),
        m=m,
        log_sb=log_sb,
        qt_m1=torch.where(keep, torch.expm1(log_qt), 0.0),
    )


class Partials(NamedTuple):
    """Partial :class:`Stat` records of every row as the statistics kernels leave them.

    ``data`` is flat fp32: rank ``w`` (tensor-parallel ranks, 1 on a single device) starts
    at ``w * rank_stride`` floats and holds ``n_rows * splits`` records, row-major
    (``splits`` column chunks per row), followed under tensor parallelism by one metadata
    record (:class:`Meta`, int32 bits). Every part of a row is merged by the epilogue, in a
    fixed order.
    """

    data: torch.Tensor
    n_rows: int
    splits: int
    world: int = 1
    rank_stride: int = 0  # floats between ranks' blocks
    has_meta: bool = False  # a metadata record follows each rank's records

    def _blocks(self) -> torch.Tensor:
        """``[world, records per rank, len(Stat)]`` view of ``data``."""
        width = len(Stat)
        stride = self.rank_stride or (self.n_rows * self.splits + int(self.has_meta)) * width
        return self.data.view(-1)[: self.world * stride].view(self.world, stride // width, width)

    def records(self) -> torch.Tensor:
        """``[world, n_rows, splits, len(Stat)]`` view of the statistics records."""
        rec = self._blocks()[:, : self.n_rows * self.splits]
        return rec.reshape(self.world, self.n_rows, self.splits, len(Stat))

    def metas(self) -> torch.Tensor:
        """``[world, len(Meta)]`` int32: every rank's metadata record (``has_meta`` only)."""
        return self._blocks()[:, self.n_rows * self.splits].contiguous().view(torch.int32)


class Epilogue(NamedTuple):
    """What the forward's O(N) step leaves: per-row loss and cross entropy ``[N]``, the
    backward's record ``[N, len(GradParam)]``, and fp32 scalars: the reduced loss and
    cross entropy (sum, or mean over non-ignored tokens; unused for ``"none"``) and
    ``scale`` (1 / token count for a mean, else 1)."""

    loss: torch.Tensor
    ce: torch.Tensor
    grad_rec: torch.Tensor
    loss_red: torch.Tensor
    ce_red: torch.Tensor
    scale: torch.Tensor


def reduce_rows(loss: torch.Tensor, ce: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                reduction: Reduction) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(reduced loss, reduced ce, scale) of per-row values, on the device (no host sync).

    A mean divides by the number of non-ignored tokens, at least 1: all ignored gives 0
    with a zero gradient.
    """
    if reduction == Reduction.MEAN:
        count = (labels != ignore_index).sum().clamp(min=1).to(torch.float32)
        scale = 1.0 / count
    else:
        scale = torch.ones((), dtype=torch.float32, device=loss.device)
    return loss.sum() * scale, ce.sum() * scale, scale


def epilogue_in_torch(parts: Partials, labels: torch.Tensor, gamma: float, beta: float, ignore_index: int,
                      vocab_size: int | None, reduction: Reduction) -> Epilogue:
    """The forward's O(N) step as torch operations (the torch backend's; the GPU backends
    run it as one kernel): merge every part of each row, finalize, reduce."""
    rec = parts.records()
    merged = combine_stats(rec.permute(1, 0, 2, 3).reshape(parts.n_rows, -1, len(Stat)), beta, dim=1)
    if vocab_size is None:  # tensor parallel: the global size from the ranks' metadata
        vocab_size = parts.metas()[:, Meta.VOCAB_END].amax().to(torch.int64)
    res = finalize_stats(merged, labels, gamma, beta, ignore_index, vocab_size)
    loss_red, ce_red, scale = reduce_rows(res.loss, res.ce, labels, ignore_index, reduction)
    fields = {GradParam.G: res.g, GradParam.M: res.m, GradParam.LOG_SB: res.log_sb, GradParam.QT_M1: res.qt_m1}
    grad_rec = torch.stack([fields[f] for f in GradParam], dim=1)
    return Epilogue(res.loss, res.ce, grad_rec, loss_red, ce_red, scale)


def row_coef(upstream: torch.Tensor, scale: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``coef_i = upstream_i * scale * g_i`` in fp32 (``upstream`` a scalar or ``[N]``)."""
    return upstream.reshape(-1).float() * scale * g
