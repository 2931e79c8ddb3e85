"""TOFU losses for NeMo Automodel's fine-tuning recipes (``loss_fn:`` in the recipe YAML):
:class:`TOFULoss` takes the logits, :class:`LinearTOFULoss` (a ``LinearCrossEntropy``) the final
hidden states and the LM head's weight; both keep ``MaskedCrossEntropy``'s call and reduction and
send vocabulary-sharded DTensors to the vocab-parallel kernels. The contract, the layouts and
``last_ce``: docs/automodel.md. Importing this module imports ``nemo_automodel``.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import core
from .linear import loss_of_hidden
from .loss import loss_of_logits
from .params import DEFAULT_BETA, DEFAULT_GAMMA, DEFAULT_IGNORE_INDEX, TOFUParams
from .vocab_parallel import TensorParallel

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
    """``[start, end)`` of rank ``rank``'s piece of ``size`` under ``Shard``'s (torch.chunk's) split."""
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


def _finish(module, loss, ce, weights, num_label_tokens):
    """Automodel's reduction: per-token ``weights`` summed, then ``/ num_label_tokens``. 0 tokens
    gives ``loss * 0``: still attached, so FSDP's and DTensor's backward hooks run on every rank."""
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
    """What both losses show Automodel (``ignore_index``, which ``calculate_loss`` maps its -100
    to, and ``reduction``), and the kernels' :class:`TOFUParams`, made once from the module's."""

    def __init__(self, params: TOFUParams, **extra):
        super().__init__(params, **extra)
        self.last_ce = None
        self._with_ce = dataclasses.replace(params, return_ce=True)
        # loss_weights weigh the tokens before the sum
        self._per_token = dataclasses.replace(params, return_ce=True, reduction="none")

    def _kernel_params(self, weights) -> TOFUParams:
        return self._with_ce if weights is None else self._per_token

    @property
    def ignore_index(self) -> int:
        return self.params.ignore_index

    @property
    def reduction(self) -> str:
        return self.params.reduction


class TOFULoss(_AutomodelLoss):
    """The logits path, with ``MaskedCrossEntropy``'s call: ``logits`` ``[..., V]`` plain, a
    replicated DTensor, or a DTensor with ``Shard(-1)`` on one mesh dimension."""

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
        params = self._kernel_params(weights)
        shard = self._vocab_shard(logits)
        if shard is None:
            loss, ce = loss_of_logits(_replicated(logits, "logits", who), labels, params)
        else:
            local, group, start, end = shard
            loss, ce = loss_of_logits(local, labels, params, TensorParallel(group, start, end))
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
        local = logits.to_local()  # its backward makes our gradient a DTensor with these placements
        if local.shape[-1] != end - start:
            raise ValueError(
                f"TOFULoss: local logits shard has {local.shape[-1]} columns, the DTensor layout "
                f"says {end - start} (columns [{start}, {end}) of {logits.shape[-1]})"
            )
        return _pad_to(local, -1, -(-logits.shape[-1] // n)), mesh.get_group(dim), start, end


class LinearTOFULoss(LinearCrossEntropy, _AutomodelLoss):
    """The hidden-state path: the fused linear loss on ``hidden_states`` ``[..., D]`` and
    ``lm_weight`` ``[V, D]`` (plain, FSDP2-sharded, or ``Shard(0)`` on ``tp_mesh_dim``)."""

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
        params = self._kernel_params(weights)
        tp = self._tp_weight(lm_weight, grad_reduce_group)
        if tp is None:
            weight = self.materialize_lm_weight(lm_weight, grad_reduce_group=grad_reduce_group)
            loss, ce = loss_of_hidden(hidden, weight, labels, params, chunk_size=self.chunk_size)
        else:
            weight, group, start, end = tp
            loss, ce = loss_of_hidden(
                hidden,
                weight,
                labels,
                params,
                chunk_size=self.chunk_size,
                tp=TensorParallel(group, start, end),
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
