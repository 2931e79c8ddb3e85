"""TOFU losses for torchtitan (``Trainer.Config.loss`` in a config_registry function):
:class:`TOFULoss` on the logits (alone or inside ``ChunkedLossWrapper``), under each of
torchtitan's SPMD backends, and :class:`LinearTOFULoss`, a ``ChunkedLossWrapper`` that computes
the LM head and TOFU together. Both keep ``BaseLoss``'s contract and return the metrics of
:data:`METRICS`; the configs, the layouts and the metrics: docs/torchtitan.md.

Importing this module imports ``torchtitan.components.loss``.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from .linear import loss_of_hidden
from .loss import loss_of_logits
from .params import BACKENDS, DEFAULT_BETA, DEFAULT_GAMMA, DEFAULT_IGNORE_INDEX, TOFUParams
from .vocab_parallel import TensorParallel

try:
    import spmd_types as spmd
    from torchtitan.components.loss import BaseLoss, ChunkedLossWrapper
    from torchtitan.config import CompileConfig
    from torchtitan.distributed.spmd_types import current_spmd_mesh, spmd_mesh_size
    from torchtitan.distributed.utils import get_spmd_backend
except ImportError as e:  # pragma: no cover - exercised where torchtitan is missing
    raise ImportError(
        "tofu_kernels.torchtitan needs torchtitan (torchtitan.components.loss): pip install "
        "torchtitan"
    ) from e

__all__ = ["LinearTOFULoss", "METRICS", "TOFULoss"]

# The metrics dict's keys (suffixes ChunkedLossWrapper knows how to add up over chunks).
METRICS = ("cross_entropy/mean", "entropy/mean", "token_accuracy/mean")


def _params(config) -> TOFUParams:
    """The loss's settings (validated once): the sum over tokens, the cross entropy and the
    per-token metrics beside it."""
    if config.backend not in BACKENDS:
        raise ValueError(
            f"tofu_kernels.torchtitan: backend must be one of {BACKENDS}, got {config.backend!r}"
        )
    return TOFUParams(
        gamma=config.gamma,
        beta=config.beta,
        ignore_index=DEFAULT_IGNORE_INDEX,
        reduction="sum",
        backend=config.backend,
        return_ce=True,
        return_metrics=True,
        check_inputs=config.check_inputs,
    )


def _shard_range(size: int, n: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank``'s piece of ``size`` columns: torch.chunk's split, as
    DTensor's ``Shard`` and torchtitan's loss-parallel cross entropy cut the vocabulary."""
    chunk = -(-size // n)
    start = min(rank * chunk, size)
    return start, min(start + chunk, size)


def _pad_to(t: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    """``t`` zero-padded along ``dim`` to ``width`` (the vocab-parallel kernels take equal
    widths); a copy, made only for uneven shards."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - (dim % t.dim())) + [0, missing]
    return F.pad(t, pad)


def _spmd_tp():
    """The ``tp`` group of the ``spmd_types`` backend's current mesh, or None (no tensor
    parallelism, or another backend)."""
    if get_spmd_backend() != "spmd_types" or spmd_mesh_size("tp") <= 1:
        return None
    return current_spmd_mesh().get_group("tp")


def _finish(loss, ce, metrics, global_valid_tokens):
    """torchtitan's contract: the sums divided by ``global_valid_tokens`` (on the device:
    no host sync), the metrics detached."""
    ent, top1 = metrics.entropy.sum(), metrics.top1.sum()
    if global_valid_tokens is not None:
        n = global_valid_tokens
        loss, ce, ent, top1 = loss / n, ce / n, ent / n, top1 / n
    values = dict(zip(METRICS, (ce, ent, top1)))
    return loss, {k: v.detach() for k, v in values.items()}


class TOFULoss(BaseLoss):
    """TOFU on the logits: ``CrossEntropyLoss``'s call and placements, TOFU's loss."""

    @dataclass(kw_only=True, slots=True)
    class Config(BaseLoss.Config):
        gamma: float = DEFAULT_GAMMA
        """Focal exponent, >= 0 (0 with beta = 1 is cross entropy)."""

        beta: float = DEFAULT_BETA
        """Softmax temperature, > 0."""

        global_vocab_size: int | None = None
        """Full vocabulary size, needed for uneven vocabulary shards under spmd_types loss parallel."""

        backend: str = "auto"
        """tofu_kernels backend: auto, cuda, triton or torch."""

        check_inputs: bool = True
        """Host checks in eager mode (labels in range; under tensor parallelism the ranks' shard
        layout, exchanged in one small collective before the statistics' all-gather)."""

    def __init__(self, config: Config, *, compile_config: CompileConfig | None = None):
        del (
            compile_config
        )  # the kernels are compiled already (and torch.compile-safe): nothing to wrap
        self.params = _params(config)
        self.global_vocab_size = config.global_vocab_size

    def __call__(
        self,
        pred: torch.Tensor,
        labels: torch.Tensor,
        global_valid_tokens: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        del kwargs
        if spmd.is_type_checking():
            with spmd.no_typecheck():
                loss, metrics = self._loss(pred, labels, global_valid_tokens)
            spmd.assert_type(loss, {"dp": spmd.P, "cp": spmd.P, "tp": spmd.I})
            return loss, metrics
        return self._loss(pred, labels, global_valid_tokens)

    def _loss(self, pred, labels, global_valid_tokens):
        if isinstance(pred, DTensor):
            return self._dtensor_loss(pred, labels, global_valid_tokens)
        if isinstance(labels, DTensor):
            raise ValueError(
                "TOFULoss: DTensor labels with plain logits; give both as DTensors or neither"
            )
        group = _spmd_tp()
        if group is None:
            out = loss_of_logits(pred, labels.to(pred.device), self.params)
        else:
            out = self._vocab_parallel(pred, labels, group, self.global_vocab_size)
        return _finish(*out, global_valid_tokens)

    def _vocab_parallel(self, local, labels, group, vocab):
        """TOFU of this rank's vocabulary columns over ``group`` (``vocab`` columns in all,
        cut as ``_shard_range`` does; None: equal shards)."""
        n, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
        if vocab is None:
            start, end, width = None, None, local.shape[-1]
        else:
            start, end = _shard_range(vocab, n, rank)
            width = -(-vocab // n)
            if local.shape[-1] != end - start:
                raise ValueError(
                    f"TOFULoss: local logits shard has {local.shape[-1]} columns, a vocabulary of "
                    f"{vocab} cut over {n} ranks gives rank {rank} {end - start}"
                )
        return loss_of_logits(
            _pad_to(local, -1, width),
            labels.to(local.device),
            self.params,
            TensorParallel(group, start, end),
        )

    def _dtensor_loss(self, pred: DTensor, labels, global_valid_tokens):
        nd, mesh, places = pred.ndim, pred.device_mesh, pred.placements
        vocab = [i for i, p in enumerate(places) if isinstance(p, Shard) and p.dim % nd == nd - 1]
        rows = [i for i, p in enumerate(places) if isinstance(p, Shard) and p.dim % nd != nd - 1]
        if len(vocab) > 1 or any(not (isinstance(p, Shard) or p.is_replicate()) for p in places):
            raise ValueError(
                f"TOFULoss: DTensor logits with placements {places}: expected Shard({nd - 1}) (the "
                "vocabulary) on at most one mesh dimension, Shard on the batch or sequence or "
                "Replicate() on the others"
            )
        if isinstance(labels, DTensor):
            want = tuple(Replicate() if i in vocab else p for i, p in enumerate(places))
            if labels.placements != want:
                raise ValueError(
                    f"TOFULoss: labels placements {labels.placements}, expected {want} (the logits' "
                    "without the vocabulary)"
                )
            labels = labels.to_local()
        elif rows:
            raise ValueError(
                f"TOFULoss: logits sharded over tokens ({places}) need DTensor labels sharded alike"
            )
        local = pred.to_local()  # its backward makes our gradient a DTensor with these placements
        if vocab:
            dim = vocab[0]
            out = self._vocab_parallel(local, labels, mesh.get_group(dim), pred.shape[-1])
        else:
            out = loss_of_logits(local, labels.to(local.device), self.params)
        loss, metrics = _finish(*out, global_valid_tokens)
        if rows:
            # full_dtensor: this rank's tokens are its share of a sum over the token-sharded dimensions
            out_places = [Partial() if i in rows else Replicate() for i in range(mesh.ndim)]
            loss = DTensor.from_local(loss, mesh, out_places)
        return loss, metrics


def _head_loss(head, hidden, labels, fused: LinearTOFULoss):
    """What :class:`LinearTOFULoss` installs as the head's forward for one call: the loss of
    ``hidden @ head.weight.T`` (the weight as the wrappers present it inside the call)."""
    weight, params, chunk = head.weight, fused.params, fused.chunk_size
    if head.bias is not None:
        raise ValueError(
            "LinearTOFULoss: the LM head has a bias; the fused loss computes hidden @ weight.T"
        )
    if isinstance(weight, DTensor):
        mesh, places = weight.device_mesh, weight.placements
        vocab = [i for i, p in enumerate(places) if isinstance(p, Shard) and p.dim == 0]
        if len(vocab) > 1 or any(
            not p.is_replicate() for i, p in enumerate(places) if i not in vocab
        ):
            raise ValueError(
                f"LinearTOFULoss: LM head weight placements {places}: expected Shard(0) (the "
                "vocabulary, tensor parallel) on at most one mesh dimension and Replicate() on the others"
            )
        if isinstance(hidden, DTensor) and not all(p.is_replicate() for p in hidden.placements):
            raise ValueError(
                f"LinearTOFULoss: hidden states with placements {hidden.placements}; the head's input "
                "is Replicate() under tensor parallelism"
            )
        h = hidden.to_local() if isinstance(hidden, DTensor) else hidden
        if not vocab:
            return loss_of_hidden(h, weight.to_local(), labels, params, chunk_size=chunk)
        dim = vocab[0]
        n, rank = mesh.size(dim), mesh.get_local_rank(dim)
        start, end = _shard_range(weight.shape[0], n, rank)
        return loss_of_hidden(
            h,
            _pad_to(weight.to_local(), 0, -(-weight.shape[0] // n)),
            labels,
            params,
            chunk_size=chunk,
            tp=TensorParallel(mesh.get_group(dim), start, end),
        )
    group = _spmd_tp()
    if group is None:
        return loss_of_hidden(hidden, weight, labels, params, chunk_size=chunk)
    n, rank = torch.distributed.get_world_size(group), torch.distributed.get_rank(group)
    vocab = fused.global_vocab_size
    if vocab is None:
        start, end, height = None, None, weight.shape[0]
    else:
        start, end = _shard_range(vocab, n, rank)
        height = -(-vocab // n)
    return loss_of_hidden(
        hidden,
        _pad_to(weight, 0, height),
        labels,
        params,
        chunk_size=chunk,
        tp=TensorParallel(group, start, end),
    )


class LinearTOFULoss(ChunkedLossWrapper):
    """The output layer and TOFU in one: a ``ChunkedLossWrapper`` (the trainer skips the
    model's LM head and hands it over with ``set_lm_head``) whose call is the fused linear loss
    on ``pred``, the final hidden states, and the head's weight (no bias). The parent config's
    ``num_chunks`` and ``loss_fn`` are not used."""

    @dataclass(kw_only=True, slots=True)
    class Config(ChunkedLossWrapper.Config):
        gamma: float = DEFAULT_GAMMA
        """Focal exponent, >= 0 (0 with beta = 1 is cross entropy)."""

        beta: float = DEFAULT_BETA
        """Softmax temperature, > 0."""

        chunk_size: int | None = None
        """Tokens per logits block inside the fused kernels (default: tofu_kernels.linear.default_chunk_size)."""

        global_vocab_size: int | None = None
        """Full vocabulary size, needed for uneven vocabulary shards under spmd_types tensor parallelism."""

        backend: str = "auto"
        """tofu_kernels backend: auto, cuda, triton or torch."""

        check_inputs: bool = True
        """Host checks in eager mode (labels in range; under tensor parallelism the ranks' shard
        layout, exchanged in one small collective before the statistics' all-gather)."""

    def __init__(self, config: Config, *, compile_config: CompileConfig | None = None):
        del compile_config  # not ChunkedLossWrapper.__init__: there is no inner loss to build
        self.params = _params(config)
        self.chunk_size = config.chunk_size
        self.global_vocab_size = config.global_vocab_size
        self.lm_head = None

    def __call__(
        self,
        pred: torch.Tensor,
        labels: torch.Tensor,
        global_valid_tokens: torch.Tensor | None = None,
        **loss_inputs: Any,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        del loss_inputs
        head = self.lm_head
        if head is None:
            raise RuntimeError(
                "LinearTOFULoss: call set_lm_head(model.lm_head) first (torchtitan's trainer does)"
            )
        if isinstance(labels, DTensor):
            labels = labels.full_tensor()
        hidden_dev = (pred.to_local() if isinstance(pred, DTensor) else pred).device
        labels = labels.to(hidden_dev)
        # The loss runs as the head's forward, inside the head's own call: FSDP2's hooks gather
        # the weight for it (and for its backward) and reduce-scatter the gradient.
        head.forward = types.MethodType(lambda m, h, y: _head_loss(m, h, y, self), head)
        try:
            if spmd.is_type_checking():
                with spmd.no_typecheck():
                    out = head(pred, labels)
            else:
                out = head(pred, labels)
        finally:
            del head.forward
        loss, metrics = _finish(*out, global_valid_tokens)
        if spmd.is_type_checking():
            spmd.assert_type(loss, {"dp": spmd.P, "cp": spmd.P, "tp": spmd.I})
        return loss, metrics
