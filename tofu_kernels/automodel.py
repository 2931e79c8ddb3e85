"""TOFU losses for NeMo Automodel's fine-tuning recipes (``loss_fn:`` in the recipe YAML).

    loss_fn:
      _target_: tofu_kernels.automodel.TOFULoss         # the logits path
      gamma: 3.0
      beta: 0.8

Automodel's recipe calls ``components.loss.utils.calculate_loss``, which hands a
``LinearCrossEntropy`` subclass (:class:`LinearTOFULoss`) the final hidden states and the
LM head's weight, and any other module (:class:`TOFULoss`) the logits; labels arrive
already shifted and a sum is divided by the global ``num_label_tokens``.

Tensor parallelism arrives as DTensors: logits sharded over the vocabulary (``Shard(-1)``)
go to :func:`~tofu_kernels.vocab_parallel_tofu_loss` over that mesh dimension's group (one
all-gather of per-token statistics; the logits are never gathered) and the gradient flows
back into the local shard with the DTensor's placements; an LM-head weight sharded over
the vocabulary on the ``tp`` mesh dimension goes to
:func:`~tofu_kernels.vocab_parallel_linear_tofu_loss`.

Automodel's recipe logs a fixed set of metrics (its ``loss`` is the returned scalar), so
the plain cross entropy cannot travel beside the loss: each call leaves it, normalised
like the loss and detached, in ``last_ce`` for a user's own logging.

Importing this module imports ``nemo_automodel`` (the base class of the hidden-state path).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import core
from .linear import linear_tofu_loss, vocab_parallel_linear_tofu_loss
from .loss import tofu_loss, vocab_parallel_tofu_loss
from .params import DEFAULT_BETA, DEFAULT_GAMMA, DEFAULT_IGNORE_INDEX, TOFUParams

try:
    from nemo_automodel.components.loss.linear_ce_base import LinearCrossEntropy
except ImportError as e:  # pragma: no cover - exercised where Automodel is missing
    raise ImportError(
        "tofu_kernels.automodel needs NeMo Automodel (nemo_automodel.components.loss): "
        "pip install nemo-automodel (pip install --no-deps nemo-automodel==0.7.0 is enough for the losses)"
    ) from e

from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

__all__ = ["LinearTOFULoss", "TOFULoss"]


def _check_weights(loss_weights, labels: torch.Tensor, reduction: str, who: str):
    """``loss_weights`` as fp32 on ``labels``' device (None stays None); the rules of
    Automodel's own losses: ``reduction='sum'`` and ``labels``' shape."""
    if loss_weights is None:
        return None
    if reduction != "sum":
        raise ValueError(f"{who}: loss_weights goes with reduction='sum', got {reduction!r}")
    if tuple(loss_weights.shape) != tuple(labels.shape):
        raise ValueError(
            f"{who}: loss_weights.shape must equal labels.shape, got "
            f"{tuple(loss_weights.shape)} and {tuple(labels.shape)}"
        )
    return loss_weights.to(device=labels.device, dtype=torch.float32)


def _replicated(t, name: str, who: str):
    """The local tensor of a replicated DTensor (a plain tensor unchanged); any other
    placement is an error (gathering it would silently change the layout's meaning)."""
    if not isinstance(t, DTensor):
        return t
    if not all(p.is_replicate() for p in t.placements):
        raise ValueError(
            f"{who}: {name} must be replicated over its mesh (or a plain tensor), got placements "
            f"{t.placements}; redistribute it to Replicate() first"
        )
    return t.to_local()


def _shard_range(size: int, n: int, rank: int) -> tuple[int, int]:
    """``[start, end)`` of rank ``rank``'s piece of ``size`` under ``Shard``'s split (torch.chunk:
    ``ceil(size / n)`` per rank, the last ranks shorter or empty)."""
    chunk = -(-size // n)
    start = min(rank * chunk, size)
    return start, min(start + chunk, size)


def _pad_to(t: torch.Tensor, dim: int, width: int) -> torch.Tensor:
    """``t`` zero-padded along ``dim`` to ``width`` (our vocab-parallel kernels take equal
    widths and ignore the padding past ``vocab_end``); a copy, made only for uneven shards."""
    missing = width - t.shape[dim]
    if missing == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - (dim % t.dim())) + [0, missing]
    return F.pad(t, pad)


def _finish(module, loss, ce, weights, num_label_tokens):
    """Automodel's reduction contract: per-token ``weights`` summed, then ``/ num_label_tokens``;
    0 tokens gives ``loss * 0`` (still attached to the graph, so FSDP's and DTensor's
    backward hooks run on every rank alike) with a zero gradient."""
    if weights is not None:
        loss, ce = (loss * weights).sum(), (ce * weights).sum()
    if num_label_tokens is not None:
        if module.params.reduction != "sum":
            raise ValueError(
                f"{type(module).__name__}: num_label_tokens goes with reduction='sum', "
                f"got {module.params.reduction!r}"
            )
        n = float(num_label_tokens)
        if n == 0:
            loss, ce = loss * 0.0, ce * 0.0
        else:
            loss, ce = loss / n, ce / n
    module.last_ce = ce.detach()
    return loss


class _AutomodelLoss(core.LossModule):
    """What both losses show Automodel: ``ignore_index`` (its ``calculate_loss`` maps its -100
    padding to it) and ``reduction``, read from the one :class:`TOFUParams`."""

    @property
    def ignore_index(self) -> int:
        return self.params.ignore_index

    @property
    def reduction(self) -> str:
        return self.params.reduction


class TOFULoss(_AutomodelLoss):
    """The logits path, with ``MaskedCrossEntropy``'s call:
    ``forward(logits, labels, mask=None, num_label_tokens=None, loss_weights=None)``.

    ``logits`` ``[..., V]`` (plain, replicated DTensor, or a DTensor sharded over the
    vocabulary on one mesh dimension and replicated on the others); ``labels`` ``[...]``
    already shifted; ``mask`` 0 where a token carries no loss (applied to a copy of the
    labels); ``loss_weights`` per-token multipliers (reduction "sum"). Returns the fp32
    scalar (``labels``' shape for "none"); the gradient has the logits' dtype and layout.
    """

    def __init__(
        self,
        gamma: float = DEFAULT_GAMMA,
        beta: float = DEFAULT_BETA,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        reduction: str = "sum",
        backend: str = "auto",
    ):
        super().__init__(
            TOFUParams(
                gamma=gamma,
                beta=beta,
                ignore_index=ignore_index,
                reduction=reduction,
                backend=backend,
            )
        )
        self.last_ce = None

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor | None = None,
        num_label_tokens: int | None = None,
        loss_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        p, who = self.params, "TOFULoss"
        labels = _replicated(labels, "labels", who)
        device = (logits.to_local() if isinstance(logits, DTensor) else logits).device
        labels = labels.to(device)
        weights = _check_weights(loss_weights, labels, p.reduction, who)
        if mask is not None:
            labels = labels.masked_fill(mask.to(device) == 0, p.ignore_index)
        kw = dict(
            gamma=p.gamma,
            beta=p.beta,
            ignore_index=p.ignore_index,
            backend=p.backend,
            return_ce=True,
            reduction="none" if weights is not None else p.reduction,
        )
        shard = self._vocab_shard(logits)
        if shard is None:
            loss, ce = tofu_loss(_replicated(logits, "logits", who), labels, **kw)
        else:
            local, group, start, end = shard
            loss, ce = vocab_parallel_tofu_loss(
                local, labels, group=group, vocab_start=start, vocab_end=end, **kw
            )
        return _finish(self, loss, ce, weights, num_label_tokens)

    @staticmethod
    def _vocab_shard(logits):
        """(local shard padded to the common width, group, vocab_start, vocab_end) for logits
        sharded over the vocabulary; None for plain or replicated logits."""
        if not isinstance(logits, DTensor):
            return None
        last = logits.ndim - 1
        vocab = [
            i
            for i, p in enumerate(logits.placements)
            if type(p) is Shard and p.dim % logits.ndim == last
        ]
        others = [
            p for i, p in enumerate(logits.placements) if i not in vocab and not p.is_replicate()
        ]
        if others or len(vocab) > 1:
            raise ValueError(
                f"TOFULoss: DTensor logits with placements {logits.placements}: expected Shard({last}) (the "
                f"vocabulary, tensor parallel) on at most one mesh dimension and Replicate() on the others; "
                f"redistribute the logits (e.g. a sequence-sharded tensor: to Shard({last}) or Replicate())"
            )
        if not vocab:
            return None
        mesh, dim = logits.device_mesh, vocab[0]
        n, rank = mesh.size(dim), mesh.get_local_rank(dim)
        start, end = _shard_range(logits.shape[-1], n, rank)
        local = (
            logits.to_local()
        )  # its backward wraps our gradient as a DTensor with these placements
        if local.shape[-1] != end - start:
            raise ValueError(
                f"TOFULoss: local logits shard has {local.shape[-1]} columns, the DTensor layout "
                f"says {end - start} (columns [{start}, {end}) of {logits.shape[-1]})"
            )
        return _pad_to(local, -1, -(-logits.shape[-1] // n)), mesh.get_group(dim), start, end


class LinearTOFULoss(LinearCrossEntropy, _AutomodelLoss):
    """The hidden-state path: a ``LinearCrossEntropy`` (Automodel hands it the final hidden
    states and the LM head's weight), our fused linear loss; the ``[tokens, V]`` logits are
    never built.

    ``forward(hidden_states, labels, lm_weight, num_label_tokens=None, grad_reduce_group=None,
    loss_weights=None)``: ``hidden_states`` ``[..., D]`` (plain or replicated DTensor),
    ``labels`` ``[...]``, ``lm_weight`` ``[V, D]``:

    - a plain tensor, or a DTensor sharded by FSDP2 over ``grad_reduce_group``'s ranks:
      gathered by Automodel's own ``materialize_lm_weight`` (its gradient reduce-scattered
      into the shard, averaged over the group), then :func:`~tofu_kernels.linear_tofu_loss`;
    - a DTensor with ``Shard(0)`` (the vocabulary) on the mesh dimension named
      ``tp_mesh_dim``: gathered over the other (FSDP) dimensions only, with the same
      gradient rule, and :func:`~tofu_kernels.vocab_parallel_linear_tofu_loss` over the
      tensor-parallel group (the hidden states' gradient all-reduced over it).
    """

    def __init__(
        self,
        gamma: float = DEFAULT_GAMMA,
        beta: float = DEFAULT_BETA,
        ignore_index: int = DEFAULT_IGNORE_INDEX,
        reduction: str = "sum",
        backend: str = "auto",
        chunk_size: int | None = None,
        tp_mesh_dim: str = "tp",
    ):
        _AutomodelLoss.__init__(
            self,
            TOFUParams(
                gamma=gamma,
                beta=beta,
                ignore_index=ignore_index,
                reduction=reduction,
                backend=backend,
            ),
            chunk_size=chunk_size,
            tp_mesh_dim=tp_mesh_dim,
        )
        self.last_ce = None

    def forward(
        self,
        hidden_states: torch.Tensor,
        labels: torch.Tensor,
        lm_weight: torch.Tensor,
        num_label_tokens: int | None = None,
        grad_reduce_group: dist.ProcessGroup | None = None,
        loss_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        p, who = self.params, "LinearTOFULoss"
        hidden = _replicated(hidden_states, "hidden_states", who)
        labels = _replicated(labels, "labels", who).to(hidden.device)
        weights = _check_weights(loss_weights, labels, p.reduction, who)
        kw = dict(
            gamma=p.gamma,
            beta=p.beta,
            ignore_index=p.ignore_index,
            backend=p.backend,
            return_ce=True,
            reduction="none" if weights is not None else p.reduction,
            chunk_size=self.chunk_size,
        )
        tp = self._tp_weight(lm_weight, grad_reduce_group)
        if tp is None:
            weight = self.materialize_lm_weight(lm_weight, grad_reduce_group=grad_reduce_group)
            loss, ce = linear_tofu_loss(hidden, weight, labels, **kw)
        else:
            weight, group, start, end = tp
            loss, ce = vocab_parallel_linear_tofu_loss(
                hidden, weight, labels, group=group, vocab_start=start, vocab_end=end, **kw
            )
        return _finish(self, loss, ce, weights, num_label_tokens)

    def _tp_weight(self, lm_weight, grad_reduce_group):
        """(this rank's vocabulary rows, padded to the common height, the TP group, vocab_start,
        vocab_end) for a weight sharded over the vocabulary on the ``tp_mesh_dim`` dimension;
        None otherwise (Automodel's own materialisation applies)."""
        if not isinstance(lm_weight, DTensor):
            return None
        mesh, names = lm_weight.device_mesh, lm_weight.device_mesh.mesh_dim_names or ()
        if self.tp_mesh_dim not in names:
            return None
        tp = names.index(self.tp_mesh_dim)
        place = lm_weight.placements[tp]
        if place.is_replicate() or mesh.size(tp) == 1:
            return None  # the head is whole on the tensor-parallel ranks
        if type(place) is not Shard or place.dim != 0:
            raise ValueError(
                f"LinearTOFULoss: the LM head weight's placement on the {self.tp_mesh_dim!r} mesh "
                f"dimension is {place}; a tensor-parallel head is Shard(0) (rows = vocabulary)"
            )
        fsdp = [i for i in range(mesh.ndim) if i != tp]
        want = tuple(Shard(0) if i == tp else Replicate() for i in range(mesh.ndim))
        grads = tuple(Shard(0) if i == tp else Partial() for i in range(mesh.ndim))
        fsdp_world = math.prod(mesh.size(i) for i in fsdp)
        training = torch.is_grad_enabled() and lm_weight.requires_grad
        group_world = dist.get_world_size(grad_reduce_group) if grad_reduce_group is not None else 1
        if training and fsdp_world > 1 and group_world != fsdp_world:
            raise ValueError(
                f"LinearTOFULoss: grad_reduce_group has {group_world} ranks, the LM head is sharded "
                f"over {fsdp_world} outside {self.tp_mesh_dim!r}; they must be the same ranks"
            )
        full = (
            lm_weight.redistribute(lm_weight.device_mesh, want)
            if lm_weight.placements != want
            else lm_weight
        )
        # Partial on the FSDP dimensions: each rank's gradient is its own tokens' part, summed
        # (reduce-scattered) into the shard; divided by the group as materialize_lm_weight
        # does, since Automodel's recipe scales the loss by that world size.
        local = full.to_local(grad_placements=grads) if training else full.to_local()
        if training and fsdp_world > 1:
            local.register_hook(lambda g: g / fsdp_world)
        start, end = _shard_range(lm_weight.shape[0], mesh.size(tp), mesh.get_local_rank(tp))
        if local.shape[0] != end - start:
            raise ValueError(
                f"LinearTOFULoss: local LM head shard has {local.shape[0]} rows, the DTensor layout "
                f"says {end - start}"
            )
        return (
            _pad_to(local, 0, -(-lm_weight.shape[0] // mesh.size(tp))),
            mesh.get_group(tp),
            start,
            end,
        )
