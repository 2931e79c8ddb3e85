"""The interface every backend implements (``core.py`` holds the order of the calls)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from ..layout import RowLayout, Shard
from ..params import TOFUParams
from ..records import Epilogue, Partials, Reduction


class Backend(ABC):
    """What the core calls, for every backend (one instance each, registered in
    :mod:`tofu_kernels.backends`). Records are :mod:`tofu_kernels.records`'; ``x`` is read
    through ``lay`` and never written, except where ``out is x`` (in-place gradient)."""

    name: str

    @abstractmethod
    def available(self, device: torch.device) -> tuple[bool, str]:
        """(True, "") if the backend runs on ``device``, else (False, why not)."""

    @abstractmethod
    def row_stats(
        self,
        x: torch.Tensor,
        lay: RowLayout,
        labels: torch.Tensor,
        shard: Shard,
        params: TOFUParams,
        meta: bool,
    ) -> Partials:
        """Partial statistics over the shard's ``n_valid`` columns of each row; with
        ``meta``, this rank's metadata record after them (tensor parallelism); with
        ``params.return_metrics``, the metric accumulators after those."""

    @abstractmethod
    def epilogue(
        self,
        parts: Partials,
        labels: torch.Tensor,
        params: TOFUParams,
        vocab_size: int | None,
        reduction: Reduction,
    ) -> Epilogue:
        """Merge every part of each row, then loss, cross entropy, the backward's record and
        the reduction. ``vocab_size`` None: read it from the metadata records."""

    @abstractmethod
    def grad(
        self,
        x: torch.Tensor,
        lay: RowLayout,
        out: torch.Tensor,
        out_lay: RowLayout,
        labels: torch.Tensor,
        grad_rec: torch.Tensor,
        upstream: torch.Tensor,
        scale: torch.Tensor,
        shard: Shard,
        params: TOFUParams,
    ) -> None:
        """Write ``coef * (softmax(z / beta) - onehot)`` into ``out``, 0 in padding columns,
        ``coef = upstream_i * scale * g_i`` (``upstream`` a scalar or one value per row)."""

    @abstractmethod
    def grad_in_forward(
        self,
        x: torch.Tensor,
        lay: RowLayout,
        out: torch.Tensor,
        out_lay: RowLayout,
        labels: torch.Tensor,
        params: TOFUParams,
        reduction: Reduction,
    ) -> Epilogue:
        """Whole rows: the reduced loss and cross entropy, and into ``out`` the gradient for
        an upstream gradient of 1 (``grad_rec`` of the result is None)."""

    @abstractmethod
    def rescale(self, out: torch.Tensor, out_lay: RowLayout, grad_out: torch.Tensor) -> None:
        """``out *= grad_out`` (a one-element tensor); nothing to do when it is 1."""

    def __repr__(self) -> str:
        return f"<tofu_kernels backend {self.name!r}>"
