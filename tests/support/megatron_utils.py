"""A real tiny Megatron-Core GPTModel on CPU with gloo: Megatron hard-codes CUDA in a few
places (current_device, RNG tracker), worked around here for tests only."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist


def require_megatron_core():
    """megatron.core, or skip: the calling module when called at its top, else the calling
    test (make test installs megatron-core; the one place the tests require it)."""
    return pytest.importorskip("megatron.core", reason="megatron-core is installed by make test")


def init_megatron_cpu(tp: int) -> None:
    """Megatron parallel state on CPU: call inside a gloo worker after init_process_group."""
    # Megatron hard-codes torch.cuda.current_device() (RoPE, global memory buffer, TP maps).
    torch.cuda.current_device = lambda: "cpu"
    from megatron.core import parallel_state, tensor_parallel

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def allow_torch_norm_with_sequence_parallel() -> None:
    """Torch norms assert no sequence parallel; their math is the same per token."""
    from megatron.core.transformer import torch_norm

    cls = torch_norm.WrappedTorchNorm
    if getattr(cls, "_tofu_sp_ok", False):
        return
    orig = cls.__new__

    def __new__(c, config, *a, **k):
        sp, config.sequence_parallel = config.sequence_parallel, False
        try:
            return orig(c, config, *a, **k)
        finally:
            config.sequence_parallel = sp

    cls.__new__ = staticmethod(__new__)
    cls._tofu_sp_ok = True


def tiny_gpt(
    tp: int,
    sequence_parallel: bool = False,
    dtype=torch.float32,
    vocab: int = 96,
    seq: int = 8,
    seed: int = 0,
    num_layers: int = 2,
    hidden: int = 32,
    heads: int = 4,
):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    if sequence_parallel:
        allow_torch_norm_with_sequence_parallel()
    torch.manual_seed(seed)
    cfg = TransformerConfig(
        num_layers=num_layers,
        hidden_size=hidden,
        num_attention_heads=heads,
        use_cpu_initialization=True,
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        pipeline_dtype=dtype,
    )
    model = GPTModel(
        cfg,
        transformer_layer_spec=get_gpt_layer_local_spec(),
        vocab_size=vocab,
        max_sequence_length=seq,
    )
    if dtype != torch.float32:  # as Megatron's training does: cast inputs, fp32 outputs
        from megatron.core.transformer.module import Float16Module

        model = Float16Module(cfg, model)
    return model


def causal_mask(seq: int) -> torch.Tensor:
    """Explicit mask: Megatron's default mask is built on "cuda"."""
    return torch.triu(torch.ones(seq, seq), diagonal=1).bool()[None, None]


def gather_vocab(shard: torch.Tensor, group=None) -> torch.Tensor:
    """Concatenate [..., V/tp] shards of all TP ranks into [..., V], in host memory (gloo
    gathers no CUDA tensors; harness only)."""
    parts = [torch.empty_like(shard, device="cpu") for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard.detach().cpu().contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def assert_ce_mode_matches_megatron(model, ids, pos, mask, labels, loss_mask, backend: str) -> None:
    """With gamma = 0, beta = 1 the patched loss is cross entropy: its per-token loss and the
    parameter gradients of the masked mean equal unpatched Megatron's (fp32)."""
    import megatron_patch

    from .helpers import assert_loss_close, assert_params_close

    def grads():
        model.zero_grad(set_to_none=True)
        per_token = model(ids, pos, mask, labels=labels)
        ((per_token * loss_mask).sum() / loss_mask.sum()).backward()
        return per_token.detach(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    ref_loss, ref_grads = grads()
    megatron_patch.apply("tofu", gamma=0.0, beta=1.0, backend=backend)
    try:
        loss, got = grads()
    finally:
        megatron_patch.revert()
    assert_loss_close(loss.cpu(), ref_loss.cpu())
    assert_params_close(got, ref_grads, dtype=torch.float32, at_least=5)
