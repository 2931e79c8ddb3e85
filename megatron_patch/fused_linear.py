"""``--tofu-fused-linear``: the output layer and the TOFU loss as one step, no logits tensor.

The last pipeline stage of a GPTModel or HybridModel computes the per-token loss from the
final hidden states and the output weight shard with ``tofu_kernels.linear.loss_of_hidden``,
keeping what Megatron's output layer does (TP, SP, tied embeddings, gradient accumulation
fusion; MTP heads stay unfused): docs/design.md section 9, docs/megatron.md.

Routes: GPTModel (0.18+) through its ``output_processor`` hook (its ``forward`` is wrapped to
supply it); HybridModel (0.19) has none, so for one call its output layer returns a
:class:`DeferredLogits` placeholder that only the patched loss may read. Inference keeps the
unfused path; MuP logit scaling is refused.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import inspect
import threading

import torch

from tofu_kernels.linear import WeightGradSink, default_chunk_size, loss_of_hidden
from tofu_kernels.patching import replace, restore
from tofu_kernels.vocab_parallel import TensorParallel

from . import reporting, settings
from .once import warn_once

_GPT = "megatron.core.models.gpt.gpt_model"
_HYBRID = "megatron.core.models.hybrid.hybrid_model"


_call = threading.local()  # the HybridModel call in flight: its output layer, MTP depth, loss mask


# ------------------------------------------------------------------ the fused loss


def fused_loss(
    hidden_states: torch.Tensor,
    output_layer,
    output_weight: torch.Tensor | None,
    labels: torch.Tensor,
    config,
    loss_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The per-token TOFU loss ``[b, s]`` (fp32) of ``output_layer(hidden_states)`` against
    ``labels`` ``[b, s]``, without the logits; ``hidden_states`` ``[s(/tp), b, h]``. With
    ``--tofu-skip-masked``, the rows whose ``loss_mask`` ``[b, s]`` is 0 (those the training
    script's loss function multiplies by 0) are not computed: loss and cross entropy 0 there,
    no gradient (one host sync finds the others; docs/megatron.md)."""
    if getattr(config, "use_mup", False):
        raise ValueError(
            "megatron_patch --tofu-fused-linear: MuP logit scaling (use_mup) is not supported; "
            "drop --tofu-fused-linear (the unfused TOFU loss supports it)"
        )
    if getattr(output_layer, "bias", None) is not None:
        raise ValueError(
            "megatron_patch --tofu-fused-linear: an output layer with a bias is not supported"
        )
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
        gather_from_sequence_parallel_region,
    )

    weight = output_layer.weight if output_weight is None else output_weight
    group = output_layer.tp_group
    if output_layer.sequence_parallel:  # [s/tp, b, h] -> [s, b, h]; backward: reduce-scatter
        hidden = gather_from_sequence_parallel_region(
            hidden_states, tensor_parallel_output_grad=True, group=group
        )
    else:  # identity; backward: all-reduce of every shard's part of dhidden
        hidden = copy_to_tensor_model_parallel_region(hidden_states, group=group)
    applied = settings.current()
    chunk = applied.chunk_size or fused_chunk_rows(
        labels.numel(), weight.shape[0], weight.element_size()
    )
    params = settings.take_call_params()
    skip = applied.skip_masked and loss_mask is not None
    if skip:  # labels identical on every TP rank, so is the mask: every rank skips the same rows
        labels = labels.masked_fill(loss_mask == 0, params.ignore_index)
    loss, ce = loss_of_hidden(
        hidden,
        weight,
        labels.t(),
        params,
        chunk_size=chunk,
        skip_ignored=skip,
        tp=TensorParallel(group),
        reduce_hidden_grad=False,
        weight_grad=_main_grad_sink(output_layer, weight),
    )
    # rows are [s, b] like the hidden states; Megatron's loss is [b, s] (a new tensor, not a view)
    loss, ce = loss.t().contiguous(), ce.t().contiguous()
    reporting.attach_cross_entropy(loss, ce)
    return loss


def fused_chunk_rows(tokens: int, width: int, element_size: int) -> int:
    """Rows per logits block: the fused linear loss's default (``CHUNK_BYTES``), and at most
    a sixteenth of the micro-batch rounded up to whole 64-row tiles (one tile at least), so
    that from 1024 tokens on the block holds at most about 1/16 of the logits it replaces;
    below that it is one 64-row tile or the whole micro-batch (docs/design.md section 9)."""
    sixteenth = max(64, -(-tokens // 16 // 64) * 64)
    return min(default_chunk_size(tokens, width, element_size), sixteenth)


def _main_grad_sink(output_layer, weight: torch.Tensor) -> WeightGradSink | None:
    """Megatron's gradient accumulation fusion, as its linear layer does it: the weight's
    gradient added into ``weight.main_grad`` (fp32) by the fused GEMM Megatron uses, and
    autograd handed a placeholder where Megatron's DDP hooks expect one."""
    if not (
        getattr(output_layer, "gradient_accumulation_fusion", False)
        and hasattr(weight, "main_grad")
    ):
        return None
    from megatron.core.tensor_parallel import layers

    fused = layers.fused_weight_gradient_mlp_cuda  # present: Megatron refuses the flag without it

    def add(grad_output: torch.Tensor, inp: torch.Tensor) -> None:
        main = weight.main_grad
        if main.dtype == torch.float32:
            fused.wgrad_gemm_accum_fp32(inp, grad_output, main)
        else:
            fused.wgrad_gemm_accum_fp16(inp, grad_output, main)

    def returned():
        if not hasattr(weight, "grad_added_to_main_grad"):
            return None
        weight.grad_added_to_main_grad = True
        zero = getattr(weight, "zero_out_wgrad", False)
        return (torch.zeros if zero else torch.empty)(
            weight.main_grad.shape, dtype=weight.dtype, device=weight.device
        )

    return WeightGradSink(add, returned)


# ------------------------------------------------------------------ GPTModel: the output_processor hook


def _gpt_processor(
    *, hidden_states, output_layer, output_weight, labels, config, loss_mask=None, **_unused
):
    return fused_loss(hidden_states, output_layer, output_weight, labels, config, loss_mask)


def _wants_fused(sig: inspect.Signature, args, kwargs) -> inspect.BoundArguments | None:
    """The bound call when it trains or evaluates with labels (not inference), else None."""
    from megatron.core.inference.utils import InferenceMode

    bound = sig.bind(*args, **kwargs)
    a = bound.arguments
    if a.get("labels") is None or InferenceMode.is_active():
        return None
    if a.get("inference_context") is not None or a.get("inference_params") is not None:
        return None
    return bound


def _make_gpt_forward(original):
    sig = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        bound = _wants_fused(sig, args, kwargs)
        if bound is not None and bound.arguments.get("output_processor") is None:
            kwargs["output_processor"] = _gpt_processor
        return original(*args, **kwargs)

    return forward


# ------------------------------------------------------------------ HybridModel: the output step


class DeferredLogits(torch.Tensor):
    """What a HybridModel's output layer returns during a fused call: the shape and dtype of
    its logits and, instead of values, its input; only the patched loss reads it (any torch
    operation on it raises)."""

    @staticmethod
    def __new__(cls, hidden, weight, layer):
        s = hidden.shape[0] * (layer.tp_group.size() if layer.sequence_parallel else 1)
        w = layer.weight if weight is None else weight
        t = torch.Tensor._make_wrapper_subclass(
            cls, (s, hidden.shape[1], w.shape[0]), dtype=hidden.dtype, device=hidden.device
        )
        t.inputs = (hidden, weight, layer)
        return t

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise RuntimeError(
            f"megatron_patch --tofu-fused-linear: {func} on the output layer's logits, which the fused "
            "output layer + loss never builds (only the language-model loss may read them); drop "
            "--tofu-fused-linear for this model"
        )

    __torch_function__ = torch._C._disabled_torch_function_impl


def fused_loss_of_deferred(logits: DeferredLogits, labels: torch.Tensor, config) -> torch.Tensor:
    hidden, weight, layer = logits.inputs
    return fused_loss(hidden, layer, weight, labels, config, getattr(_call, "loss_mask", None))


def _make_hybrid_forward(original):
    sig = inspect.signature(original)

    @functools.wraps(original)
    def forward(*args, **kwargs):
        bound = _wants_fused(sig, args, kwargs)
        model = bound.arguments["self"] if bound is not None else None
        if model is None or not model.post_process:
            return original(*args, **kwargs)
        layer = model.output_layer
        call = _call
        outer = (
            getattr(call, "layer", None),
            getattr(call, "mtp", 0),
            getattr(call, "loss_mask", None),
        )
        call.layer, call.mtp, call.loss_mask = layer, 0, bound.arguments.get("loss_mask")
        layer.forward = functools.partial(_deferring_forward, layer)  # this call only
        try:
            return original(*args, **kwargs)
        finally:
            del layer.forward
            call.layer, call.mtp, call.loss_mask = outer

    return forward


def _deferring_forward(layer, input_, weight=None, runtime_gather_output=None, **kwargs):
    if _call.mtp:  # an MTP head: Megatron needs its logits (acceptance counts)
        return type(layer).forward(
            layer, input_, weight=weight, runtime_gather_output=runtime_gather_output, **kwargs
        )
    return DeferredLogits(input_, weight, layer), None


def _make_process_mtp_loss(original):
    @functools.wraps(original)
    def process_mtp_loss(*args, **kwargs):
        call = _call
        call.mtp = getattr(call, "mtp", 0) + 1
        try:
            return original(*args, **kwargs)
        finally:
            call.mtp -= 1

    return process_mtp_loss


# ------------------------------------------------------------------ install / uninstall


def install() -> None:
    """Route GPTModel and HybridModel training calls through :func:`fused_loss` (with the
    settings of ``settings.current()``). A model class this megatron-core cannot route keeps
    the unfused path, with one warning."""
    gpt = importlib.import_module(_GPT)
    if "output_processor" in inspect.signature(gpt.GPTModel.forward).parameters:
        replace(gpt.GPTModel, "forward", _make_gpt_forward)
    else:
        warn_once(
            "megatron_patch --tofu-fused-linear: this megatron-core's GPTModel.forward has no "
            "output_processor hook (0.18+): GPTModel keeps the unfused TOFU loss"
        )
    try:
        hybrid = importlib.import_module(_HYBRID)
    except ImportError:
        return
    if _hybrid_supported(hybrid):
        replace(hybrid.HybridModel, "forward", _make_hybrid_forward)
        replace(hybrid, "process_mtp_loss", _make_process_mtp_loss)
    else:
        warn_once(
            "megatron_patch --tofu-fused-linear: this megatron-core's HybridModel is not one the fused "
            "output step is tested with (0.19): HybridModel keeps the unfused TOFU loss"
        )


def _hybrid_supported(hybrid) -> bool:
    """HybridModel as in megatron-core 0.19: its forward calls the output layer, then (with
    labels) ``compute_language_model_loss``, and its MTP heads go through the module's
    ``process_mtp_loss``."""
    src = inspect.getsource(hybrid.HybridModel.forward)
    return (
        hasattr(hybrid, "process_mtp_loss")
        and "self.output_layer(" in src
        and "self.compute_language_model_loss(labels, logits)" in src
    )


def uninstall() -> None:
    with contextlib.suppress(ImportError):
        restore(importlib.import_module(_GPT).GPTModel, "forward")
    with contextlib.suppress(ImportError):
        hybrid = importlib.import_module(_HYBRID)
        restore(hybrid.HybridModel, "forward")
        restore(hybrid, "process_mtp_loss")
