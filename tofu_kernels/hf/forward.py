"""``apply_tofu`` / ``revert_tofu`` and ``tofu_loss_func``: TOFU as a causal LM's own loss and
as a ``compute_loss_func``; the fused forward :class:`~tofu_kernels.hf.TOFUSFTTrainer` runs.

The label convention, the normalisation and the entry points are described in
:mod:`tofu_kernels.hf`. ``transformers`` is imported lazily.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import torch
from torch.distributed.tensor import DTensor

from .. import patching
from ..linear import loss_of_hidden
from ..loss import loss_of_logits
from ..params import DEFAULT_BETA, DEFAULT_GAMMA, DEFAULT_IGNORE_INDEX, TOFUParams, check_flag
from ..records import TokenMetrics

__all__ = [
    "SUPPORTED_MODELS",
    "apply_tofu",
    "check_model",
    "check_params",
    "revert_tofu",
    "shift_labels",
    "tofu_loss_func",
]

# Causal-LM classes whose forward is backbone -> lm_head (nn.Linear, no bias) -> loss, with
# no logit scaling or soft-capping: the structure the fused forward reproduces. The MoE
# ones (last two) add the router's load-balancing loss, as their own forward does.
SUPPORTED_MODELS = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
)


def shift_labels(labels: torch.Tensor, ignore_index: int = DEFAULT_IGNORE_INDEX) -> torch.Tensor:
    """``labels[..., 1:]`` with one ``ignore_index`` appended: the target of each position."""
    return torch.nn.functional.pad(labels[..., 1:], (0, 1), value=ignore_index)


@dataclasses.dataclass(frozen=True)
class _HFLoss:
    """The TOFU loss with Hugging Face's label shift and normalisation, for one
    :class:`TOFUParams` (reduction "mean"), made once by :func:`tofu_loss_func` or
    :func:`apply_tofu`."""

    params: TOFUParams
    chunk_size: int | None = None  # the fused linear path's rows per logits chunk

    # The sum over a micro-batch, divided afterwards by the whole batch's token count: the
    # two-pass path takes the 1/n as its upstream gradient for free (the gradient-in-the-
    # forward path would need one more pass over the gradient to apply it).
    summed: TOFUParams = dataclasses.field(init=False)
    # The same loss with the per-token metrics (TOFUSFTTrainer's entropy and accuracy).
    with_metrics: TOFUParams = dataclasses.field(init=False)

    def __post_init__(self):
        summed = dataclasses.replace(self.params, reduction="sum", grad_in_forward=False)
        object.__setattr__(self, "summed", summed)
        object.__setattr__(
            self, "with_metrics", dataclasses.replace(self.params, return_metrics=True)
        )

    def targets(self, labels, shifted, device) -> torch.Tensor:
        """The target of every position: ``shifted`` as given, else ``labels`` shifted."""
        return (shift_labels(labels, self.params.ignore_index) if shifted is None else shifted).to(
            device
        )

    def on_logits(self, logits, labels, num_items_in_batch=None, shifted=None) -> torch.Tensor:
        """TOFU of ``[..., V]`` logits against (shifted) labels, with HF's normalisation."""
        target = self.targets(labels, shifted, logits.device)
        if num_items_in_batch is None:
            return loss_of_logits(logits, target, self.params)
        n = num_items_in_batch
        if torch.is_tensor(n):
            n = n.to(logits.device)
        return loss_of_logits(logits, target, self.summed) / n

    def on_hidden(self, hidden, weight, target, num_items_in_batch=None, metrics=False):
        """The same loss from the last hidden states and the output layer's weight, against
        the ``target`` of every position (:meth:`targets`); with ``metrics``,
        ``(loss, TokenMetrics)``. ``num_items_in_batch`` 0 (no token to train in the whole
        accumulated batch, e.g. every completion truncated away) gives a loss of 0 with a zero
        gradient (a division by it would give NaN)."""
        # read once (the one host sync of a tensor count); the sum over no tokens is 0
        n = None if num_items_in_batch is None else float(num_items_in_batch) or 1.0
        return loss_of_hidden(
            hidden,
            weight,
            target,
            self.with_metrics if metrics else self.params,
            chunk_size=self.chunk_size,
            normalizer=n,
        )


def tofu_loss_func(
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    *,
    backend: str = "auto",
):
    """A ``compute_loss_func`` for ``transformers.Trainer`` and TRL's ``SFTTrainer``.

    ``Trainer(model, args, train_dataset=ds, compute_loss_func=tofu_loss_func(3.0, 0.8))``.
    The function takes ``(outputs, labels, num_items_in_batch=None)``: ``outputs.logits``
    ``[B, T, V]`` (any float dtype, used as is), unshifted ``labels`` ``[B, T]``.
    """
    loss = _HFLoss(
        TOFUParams(
            gamma=gamma, beta=beta, ignore_index=ignore_index, backend=backend, who="tofu_loss_func"
        )
    )

    def compute_loss_func(outputs, labels, num_items_in_batch=None):
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
        if logits is None:
            raise ValueError(
                "tofu_loss_func: outputs.logits is None (a fused LM head?); the loss needs the logits"
            )
        return loss.on_logits(logits, labels, num_items_in_batch)

    return compute_loss_func


def _supported_name(model) -> str | None:
    for cls in type(model).__mro__:
        if cls.__name__ in SUPPORTED_MODELS:
            return cls.__name__
    return None


def _keep_last(hidden: torch.Tensor, logits_to_keep) -> torch.Tensor:
    """``transformers``' ``logits_to_keep``: an int k keeps the last k positions (0: all),
    a tensor lists the positions to keep."""
    if isinstance(logits_to_keep, int):
        return hidden if logits_to_keep == 0 else hidden[:, -logits_to_keep:, :]
    return hidden[:, logits_to_keep, :]


@functools.cache
def tofu_output_type():
    """``TOFUCausalLMOutput``: what the fused forward returns (made on first use: transformers
    is imported lazily). ``CausalLMOutputWithPast``'s fields (``logits`` None, no cache)
    plus ``aux_loss`` and ``router_logits`` (MoE) and, with ``tofu_metrics=True``,
    ``lm_loss`` (the TOFU loss alone; ``loss`` adds the weighted router loss, as the model's
    own forward does), ``entropy`` and ``top1`` per position (fp32, 0 where the target is
    ignored) and ``label_mask`` (the target is not ignored)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    @dataclasses.dataclass
    class TOFUCausalLMOutput(CausalLMOutputWithPast):
        aux_loss: torch.Tensor | None = None
        router_logits: tuple | None = None
        lm_loss: torch.Tensor | None = None
        entropy: torch.Tensor | None = None
        top1: torch.Tensor | None = None
        label_mask: torch.Tensor | None = None

    return TOFUCausalLMOutput


def _named(model, args: tuple, kwargs: dict) -> dict:
    """The forward's arguments by name: positional ones bound through the class forward's
    own signature (whatever it calls its cache argument: ``past_key_values`` up to
    transformers 5.23, ``cache`` from 5.24), keywords as given."""
    if args:
        bound = inspect.signature(type(model).forward).bind_partial(model, *args)
        kwargs = {**dict(list(bound.arguments.items())[1:]), **kwargs}
    return kwargs


def _router_loss(model, outputs, attention_mask) -> torch.Tensor:
    """The MoE load-balancing loss, as Mixtral's and Qwen3-MoE's own forwards compute it."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    return load_balancing_loss_func(
        outputs.router_logits, model.num_experts, model.num_experts_per_tok, attention_mask
    )


def _tofu_forward(self, *args, tofu_metrics: bool = False, **kwargs):
    """The supported causal LMs' forward with the loss taken from the hidden states.

    In training with labels, or with ``tofu_metrics=True`` (training or evaluation, labels
    required; what :class:`TOFUSFTTrainer` calls): the backbone, then
    :func:`~tofu_kernels.linear_tofu_loss` on its last hidden states and ``lm_head.weight``,
    with the per-token metrics for ``tofu_metrics``. Otherwise (generation, evaluation, no
    labels) the class's own forward runs, with the TOFU loss on its logits. Every argument
    the caller gives (the cache under either name included) reaches the backbone or the
    class's forward unchanged.
    """
    loss: _HFLoss | None = getattr(self, "_tofu_loss", None)
    if loss is None:  # reverted, but called through a wrapper installed over ours meanwhile
        if tofu_metrics:
            raise ValueError(
                "tofu_metrics=True needs apply_tofu(model, fused_linear=True) on this model"
            )
        return type(self).forward(self, *args, **kwargs)
    kw = _named(self, args, kwargs)
    labels, shifted = kw.get("labels"), kw.get("shift_labels")
    if not (tofu_metrics or (self.training and (labels is not None or shifted is not None))):
        return type(self).forward(self, **kw)
    if labels is None and shifted is None:
        raise ValueError("apply_tofu: tofu_metrics=True needs labels (or shift_labels)")
    for name in ("labels", "shift_labels"):
        kw.pop(name, None)
    return_dict = kw.pop("return_dict", None)
    num_items = kw.pop("num_items_in_batch", None)
    logits_to_keep = kw.pop("logits_to_keep", 0)
    keep_all = isinstance(logits_to_keep, int) and logits_to_keep == 0
    if shifted is None and not keep_all:
        raise ValueError(
            "apply_tofu(fused_linear=True): labels with logits_to_keep need shift_labels"
        )
    router = kw.get("output_router_logits")
    router = getattr(self.config, "output_router_logits", False) if router is None else router
    if router:
        kw["output_router_logits"] = True
    outputs = self.model(**kw)
    hidden = _keep_last(outputs.last_hidden_state, logits_to_keep)
    target = loss.targets(labels, shifted, hidden.device)
    head = self.lm_head
    if not patching.replaced(head):
        raise RuntimeError(
            f"apply_tofu(fused_linear=True): lm_head is no longer the module apply_tofu patched (now "
            f"{type(head).__name__}: replaced or wrapped afterwards, e.g. by PEFT's modules_to_save or FSDP1's "
            "wrapping); the fused loss needs the nn.Linear head itself (FSDP2's fully_shard and DeepSpeed keep it)"
        )
    # through lm_head's own call, so that its wrappers' hooks run as for its forward (see _head_forward)
    lm_loss, *metrics = head(hidden, tofu=_HeadCall(loss, target, num_items, tofu_metrics))
    metrics = TokenMetrics(*metrics) if tofu_metrics else None
    aux = _router_loss(self, outputs, kw.get("attention_mask")) if router else None
    total = lm_loss if aux is None else lm_loss + self.router_aux_loss_coef * aux.to(lm_loss.device)
    extra = {}
    if metrics is not None:
        extra = dict(
            lm_loss=lm_loss,
            entropy=metrics.entropy,
            top1=metrics.top1,
            label_mask=target != loss.params.ignore_index,
        )
    out = tofu_output_type()(
        loss=total,
        logits=None,
        hidden_states=outputs.hidden_states,
        attentions=outputs.attentions,
        aux_loss=aux,
        router_logits=getattr(outputs, "router_logits", None) if router else None,
        **extra,
    )
    return out.to_tuple() if return_dict is False else out


class _HeadCall:
    """What the fused forward asks of ``lm_head``'s own forward: the loss of its weight on
    these hidden states, against ``target``. A plain class on purpose: the wrappers' hooks
    rebuild the containers they recognise (tuples, dicts, dataclasses) to cast or hook the
    tensors inside, and pass any other object on untouched."""

    __slots__ = ("loss", "target", "num_items", "metrics")

    def __init__(self, loss: _HFLoss, target: torch.Tensor, num_items, metrics: bool):
        self.loss, self.target, self.num_items, self.metrics = loss, target, num_items, metrics


def _head_forward(self, input: torch.Tensor, tofu: _HeadCall | None = None):
    """``lm_head``'s forward while :func:`apply_tofu` (``fused_linear=True``) is on: without
    ``tofu``, ``nn.Linear``'s; with it, the fused loss on ``self.weight`` as the data-parallel
    wrappers present it inside this call (FSDP2, ZeRO-3, DDP: docs/huggingface.md, "Sharded
    data parallelism"). Returns ``(loss,)`` or ``(loss, entropy, top1)``: tensors only, so
    that the wrappers' hooks attach to them."""
    if tofu is None:
        return type(self).forward(self, input)
    weight = self.weight
    if isinstance(weight, DTensor):
        raise ValueError(
            f"apply_tofu(fused_linear=True): lm_head.weight is a DTensor ({weight.placements}) inside lm_head's own "
            "forward, i.e. sharded by tensor parallelism, which the Hugging Face fused path does not support; "
            "train without tensor parallelism on lm_head (FSDP2 and DeepSpeed are supported), or use "
            "compute_loss_func=tofu_kernels.hf.tofu_loss_func(...) on the logits"
        )
    # a device_map's hook may have moved the input to the head's device; the target follows
    result = tofu.loss.on_hidden(
        input, weight, tofu.target.to(input.device), tofu.num_items, metrics=tofu.metrics
    )
    return (result[0], *result[1]) if tofu.metrics else (result,)


def _forward_slot(module) -> str:
    """Where ``module``'s forward is called from: ``forward``, or, under an accelerate hook
    (a model dispatched with a ``device_map``), the ``_old_forward`` the hook calls between
    its own steps (so that the hook keeps moving inputs and weights)."""
    return (
        "_old_forward"
        if hasattr(module, "_hf_hook") and "_old_forward" in module.__dict__
        else "forward"
    )


def _install(module, fn) -> None:
    """Make ``fn`` bound to ``module`` its forward (in :func:`_forward_slot`), keeping the class
    forward's signature (``generate()`` validates keywords against it); nothing to do if ours
    is installed already (a re-apply only replaces the settings, which the forward reads at
    each call)."""
    if patching.replaced(module):
        return
    patching.replace(
        module,
        _forward_slot(module),
        lambda _: functools.wraps(type(module).forward)(functools.partial(fn, module)),
    )


def _uninstall(module) -> None:
    """Put back what :func:`_install` replaced, where ours is still in its slot. Where a
    wrapper was installed over ours meanwhile (accelerate's autocast, a device hook), the
    wrapper stays; ours then runs the class forward (the settings are gone)."""
    for slot in patching.replaced(module):
        patching.restore(module, slot)


def _loss_function(
    loss: _HFLoss,
    logits,
    labels,
    vocab_size=None,
    num_items_in_batch=None,
    ignore_index=None,
    shift_labels=None,
    **_,
):
    """The model's ``loss_function`` (transformers' signature) while TOFU is applied."""
    return loss.on_logits(logits, labels, num_items_in_batch, shifted=shift_labels)


def apply_tofu(
    model,
    gamma: float = DEFAULT_GAMMA,
    beta: float = DEFAULT_BETA,
    fused_linear: bool = False,
    *,
    ignore_index: int = DEFAULT_IGNORE_INDEX,
    backend: str = "auto",
    chunk_size: int | None = None,
    params: TOFUParams | None = None,
):
    """Make ``model(..., labels=labels).loss`` the TOFU loss; returns ``model``.

    Supported: :data:`SUPPORTED_MODELS` (Llama, Mistral, Qwen2, Qwen3, Mixtral and Qwen3-MoE
    causal LMs and their subclasses), also inside a PEFT ``PeftModel`` (apply it to the
    model itself or to the ``PeftModel``: the base model's forward is the one replaced, so
    the adapters' hooks and the wrappers' forwards still run). ``fused_linear=True``: in
    training with labels the forward returns ``logits=None`` and the loss comes from
    :func:`~tofu_kernels.linear_tofu_loss` on the last hidden states (extra memory one
    ``[chunk_size, V]`` block instead of the ``[B, T, V]`` logits and their gradient);
    evaluation and generation are unchanged; called with ``tofu_metrics=True`` it also
    returns the per-token entropy and top-1 (what :class:`TOFUSFTTrainer` logs). ``params``:
    a ready :class:`~tofu_kernels.TOFUParams` instead of ``gamma``, ``beta``,
    ``ignore_index`` and ``backend`` (reduction "mean"). Applying again replaces the
    settings; :func:`revert_tofu` restores the model's loss.

    Note: TRL's ``SFTTrainer`` computes its loss from its own fused LM head and does not
    read ``model(...).loss``; use :class:`TOFUSFTTrainer` (or
    ``compute_loss_func=tofu_loss_func(...)``, one extra forward per step) instead.
    """
    check_flag(fused_linear, "fused_linear", "apply_tofu")
    if params is None:
        params = TOFUParams(
            gamma=gamma, beta=beta, ignore_index=ignore_index, backend=backend, who="apply_tofu"
        )
    else:
        check_params(params, "apply_tofu: params")
    loss = _HFLoss(params, chunk_size)
    model = _base_model(model)
    check_model(model, fused_linear, "apply_tofu")
    model._tofu_loss = loss  # what the installed forwards read at each call
    model.loss_function = functools.partial(
        _loss_function, loss
    )  # transformers' setter: model._loss_function
    if fused_linear:
        _install(model, _tofu_forward)
        _install(model.lm_head, _head_forward)
    else:  # applied again without the fused path: it goes
        _uninstall(model)
        _uninstall(model.lm_head)
    return model


def check_params(params: TOFUParams, who: str) -> None:
    """Raise unless ready ``params`` are what the Hugging Face paths run: reduction "mean",
    no extra outputs (the fused forward asks for the metrics itself)."""
    if params.reduction != "mean" or params.return_ce or params.return_metrics:
        raise ValueError(
            f"{who} must have reduction 'mean' and neither return_ce nor return_metrics"
        )


def check_model(model, fused_linear: bool, who: str) -> None:
    """Raise unless ``model`` (a causal LM or a ``PeftModel`` of one) is one the fused
    forward reproduces: a :data:`SUPPORTED_MODELS` class (or subclass) whose ``lm_head`` is
    ``nn.Linear`` without bias and with ``nn.Linear``'s own forward."""
    model = _base_model(model)
    name = _supported_name(model)
    if name is None:
        raise ValueError(
            f"{who}: {type(model).__name__} is not supported; supported causal LMs: "
            f"{', '.join(SUPPORTED_MODELS)} (for another model, use "
            "Trainer(compute_loss_func=tofu_kernels.hf.tofu_loss_func(...)))"
        )
    if not fused_linear:
        return
    head = model.lm_head
    if not (isinstance(head, torch.nn.Linear) and head.bias is None):
        raise ValueError(
            f"{who}: {name}.lm_head must be nn.Linear without bias for the fused loss, got {head}"
        )
    if (
        type(head).forward is not torch.nn.Linear.forward
    ):  # e.g. a quantized or scaled head: its logits are not x @ W.T
        raise ValueError(
            f"{who}: {name}.lm_head is a {type(head).__name__} with a forward of its own; the fused "
            "loss reproduces nn.Linear's (use compute_loss_func=tofu_loss_func(...) on the logits)"
        )


def _base_model(model):
    """The causal LM itself: ``model``, or the one inside a PEFT ``PeftModel``."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) and type(model).__name__.startswith("Peft") else model


def revert_tofu(model):
    """Undo :func:`apply_tofu` (nothing to do if it was not applied); returns ``model``."""
    base = _base_model(model)
    if getattr(base, "_tofu_loss", None) is None:
        return model
    del base._tofu_loss
    base.__dict__.pop("_loss_function", None)
    _uninstall(base)
    _uninstall(base.lm_head)
    return model
