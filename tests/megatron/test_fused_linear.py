"""--tofu-fused-linear: Megatron's output layer and the TOFU loss as one step, no logits.

Each case builds a model with the fixture's own builder (pretrain_gpt.py's GPTModel or
pretrain_hybrid.py's HybridModel), runs the script's forward_step / loss_func in Megatron's
schedule on the same weights and batches, once with the unfused --loss-type tofu path and
once fused, and compares: the reported 'lm loss' and 'lm cross entropy' (and with the
unfused path, an fp64 computation on the gathered logits), and every parameter's gradient
(through the final hidden states, the gradient of every layer below). Under a dispatch
mode that sees every tensor an operator makes, the fused path makes no [tokens, V/tp]
tensor, the unfused path does.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.megatron_utils import require_megatron_core

require_megatron_core()

import megatron_patch  # noqa: E402
from megatron_patch.reporting import CE_KEY, LOSS_KEY  # noqa: E402
from tests.support.dist_utils import run_distributed  # noqa: E402
from tests.support.helpers import assert_grad_close, assert_params_close  # noqa: E402
from tests.support.megatron_lm import (  # noqa: E402
    BATCH,
    FIXTURE,
    HYBRID,
    SEQ,
    SKIP_REASON,
    batches,
    cpu_harness,
    launch,
    setup,
    train_reports,
)
from tests.support.spies import DispatchSpy, GemmFlops  # noqa: E402

pytestmark = pytest.mark.skipif(FIXTURE is None, reason=SKIP_REASON)

GAMMA, BETA = 2.0, 0.7
TOFU = [
    "--loss-type",
    "tofu",
    "--tofu-gamma",
    str(GAMMA),
    "--tofu-beta",
    str(BETA),
    "--tofu-backend",
    "torch",
]
# vocabulary 96 padded to a multiple of 20 x TP: 60 columns per rank at TP = 2 (40 at TP = 4), a width no
# other tensor of the tiny model has (the dispatch check looks for it); 4-token blocks
CHUNK = 4
COMMON = ["--make-vocab-size-divisible-by", "20", "--tofu-chunk-size", str(CHUNK)]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, pg, data):
    model.zero_grad(set_to_none=True)
    with DispatchSpy() as mode:
        reports = train_reports(model, pg, data)
    return reports, _grads(model), mode.shapes


def _compare(args, model, pg, data, dtype=torch.float32, skip_masked=False) -> None:
    """Unfused then fused on the same weights and batches: reports and every gradient (with
    ``skip_masked`` also the fused step that computes only the rows whose loss mask is 1).
    (MTP heads stay unfused: Megatron needs their logits for its acceptance counts.)"""
    from megatron.core import parallel_state as ps

    megatron_patch.apply("tofu", GAMMA, BETA, "torch")
    rep_u, grad_u, shapes_u = _run(model, pg, data)
    for skip in (False, True) if skip_masked else (False,):
        megatron_patch.apply(
            "tofu", GAMMA, BETA, "torch", fused_linear=True, chunk_size=CHUNK, skip_masked=skip
        )
        rep_f, grad_f, shapes_f = _run(model, pg, data)
        megatron_patch.revert()
        _same(
            args,
            ps.is_pipeline_last_stage(),
            (rep_u, grad_u, shapes_u),
            (rep_f, grad_f, shapes_f),
            dtype,
        )


def _same(args, last_stage, unfused, fused, dtype) -> None:
    rep_u, grad_u, shapes_u = unfused
    rep_f, grad_f, shapes_f = fused
    width = args.padded_vocab_size // args.tensor_model_parallel_size
    tokens = BATCH * SEQ
    if not last_stage:
        assert rep_u == rep_f == []
    else:

        def logits(
            shapes,
        ):  # [tokens, V/tp] in any layout ([s, b, V/tp], [b, s, V/tp], [s * b, V/tp])
            return [
                s for s in shapes if s and s[-1] == width and torch.Size(s[:-1]).numel() == tokens
            ]

        assert logits(shapes_u), "the unfused path builds the logits (the check's positive control)"
        if args.mtp_num_layers:  # only the MTP head's
            assert 0 < len(logits(shapes_f)) < len(logits(shapes_u)), (
                len(logits(shapes_f)),
                len(logits(shapes_u)),
            )
        else:
            assert not logits(shapes_f), (
                f"the fused path built a logits-sized tensor: {logits(shapes_f)}"
            )
        assert [set(r) for r in rep_f] == [{LOSS_KEY, CE_KEY}] * len(rep_u)
        tol = dict(rtol=2e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
        for ru, rf in zip(rep_u, rep_f):
            assert ru[LOSS_KEY][1] == rf[LOSS_KEY][1] == rf[CE_KEY][1]
            torch.testing.assert_close(rf[LOSS_KEY], ru[LOSS_KEY], **tol)
            torch.testing.assert_close(rf[CE_KEY], ru[CE_KEY], **tol)
    if dtype == torch.float32:
        assert_params_close(grad_f, grad_u, dtype=dtype, at_least=5)
    else:  # two bf16 computations in different orders (the fused weight gradient sums its
        # chunks in bf16): normwise, through every layer below the head
        assert_params_close(grad_f, grad_u, norm_rtol=2e-2, at_least=5)


CASES = {
    "gpt": [
        [],
        ["--untie-embeddings-and-output-weights"],
        ["--sequence-parallel"],
        ["--calculate-per-token-loss"],
        ["--mtp-num-layers", "1", "--position-embedding-type", "rope"],
    ],
    "hybrid": [
        HYBRID,
        [*HYBRID, "--sequence-parallel"],
        [*HYBRID[:-1], "*-*-/*-", "--position-embedding-type", "rope"],
    ],
}
# the cases also run with --tofu-skip-masked (the rows whose loss mask is 0 not computed)
SKIP_MASKED = (
    ["--sequence-parallel"],
    ["--mtp-num-layers", "1", "--position-embedding-type", "rope"],
    HYBRID,
    [*HYBRID, "--sequence-parallel"],
)


def tp_cases(rank: int, world: int, model: str, cases: list[list[str]]) -> None:
    cpu_harness()
    data = batches(2, seed=17, masked=0.5)
    for extra in cases:
        args, net, pg = setup(
            *COMMON, "--tensor-model-parallel-size", str(world), *extra, model=model
        )
        _compare(args, net, pg, data, skip_masked=extra in SKIP_MASKED)
    megatron_patch.remove_hooks()


@pytest.mark.parametrize(
    "world,model,cases",
    [
        pytest.param(1, "gpt", [[]], id="tp1-gpt"),
        pytest.param(2, "gpt", CASES["gpt"], id="tp2-gpt", marks=pytest.mark.slow),
        pytest.param(2, "hybrid", CASES["hybrid"], id="tp2-hybrid", marks=pytest.mark.slow),
        pytest.param(4, "gpt", [[], ["--sequence-parallel"]], id="tp4-gpt", marks=pytest.mark.slow),
    ],
)
def test_fused_equals_unfused(world, model, cases):
    run_distributed(world, tp_cases, model=model, cases=cases)


def other_cases(rank: int, world: int) -> None:
    """bf16 (Megatron's Float16Module), pipeline parallelism (1F1B, the loss on the last
    of 2 stages), and gradient accumulation fusion."""
    cpu_harness()
    data = batches(3, seed=29)
    from megatron.core.transformer.module import Float16Module

    args, net, pg = setup(*COMMON, "--tensor-model-parallel-size", "2", "--bf16")
    _compare(
        args, Float16Module(net.config, net), pg, data, dtype=torch.bfloat16
    )  # as Megatron's get_model wraps it
    args, net, pg = setup(*COMMON, "--pipeline-model-parallel-size", "2")
    _compare(args, net, pg, data, skip_masked=True)
    main_grad_case(batches(2, seed=31))  # fresh: the pipeline run rewrote its batches in place
    megatron_patch.remove_hooks()


class _Fp32WgradAccumulation:
    """What Megatron's gradient accumulation fusion calls (apex's CUDA module
    fused_weight_gradient_mlp_cuda): main_grad += grad_output.T @ input in fp32; a CPU
    stand-in with the same contract."""

    @staticmethod
    def wgrad_gemm_accum_fp32(inp, grad_output, main_grad):
        main_grad.add_((grad_output.t().double() @ inp.double()).float())


def main_grad_case(data) -> None:
    """Gradient accumulation fusion: the output weight's gradient lands in its fp32
    main_grad, added by the fused GEMM Megatron's linear layer uses, on both paths alike."""
    from megatron.core.tensor_parallel import layers

    layers.fused_weight_gradient_mlp_cuda = _Fp32WgradAccumulation
    args, net, pg = setup(
        *COMMON, "--tensor-model-parallel-size", "2", "--untie-embeddings-and-output-weights"
    )
    layer = net.output_layer
    layer.gradient_accumulation_fusion = True
    w = layer.weight
    sums = []
    for fused in (False, True):
        w.main_grad, w.grad_added_to_main_grad = torch.zeros(w.shape, dtype=torch.float32), False
        megatron_patch.apply("tofu", GAMMA, BETA, "torch", fused_linear=fused, chunk_size=CHUNK)
        _run(net, pg, data)
        assert w.grad_added_to_main_grad and w.main_grad.abs().sum() > 0
        sums.append(w.main_grad.clone())
    megatron_patch.revert()
    assert_grad_close(sums[1], sums[0].double(), torch.float32)


def skip_flops_cases(rank: int, world: int) -> None:
    """--tofu-skip-masked: the output layer's GEMM FLOPs of a training step (the products with
    the shard's width, a size no other tensor of the tiny model has) at 0, 50 and 87.5 % of the
    tokens masked scale with the tokens that train, to within one block of CHUNK tokens; the
    reports and gradients equal the unfused step's (the _compare cases)."""
    cpu_harness()
    args, net, pg = setup(*COMMON, "--tensor-model-parallel-size", str(world))
    width = args.padded_vocab_size // world
    per_row = 4 * 2 * args.hidden_size * width  # logits, their recomputation, dhidden, dweight
    for masked in (0.0, 0.5, 0.875):
        data = batches(1, seed=41, masked=masked)
        kept = int(data[0]["loss_mask"].sum())
        flops = {}
        for skip in (False, True):
            megatron_patch.apply(
                "tofu", GAMMA, BETA, "torch", fused_linear=True, chunk_size=CHUNK, skip_masked=skip
            )
            with GemmFlops(dim=width) as f:
                _run(net, pg, batches(1, seed=41, masked=masked))
            flops[skip] = f.flops
        assert flops[False] == BATCH * SEQ * per_row, (flops, BATCH * SEQ * per_row)
        assert kept * per_row <= flops[True] <= (kept + CHUNK) * per_row, (
            masked,
            flops,
            kept * per_row,
        )
    megatron_patch.revert()
    megatron_patch.remove_hooks()


@pytest.mark.slow
def test_skip_masked_flops_scale_with_the_tokens_that_train():
    run_distributed(2, skip_flops_cases)


@pytest.mark.slow
def test_fused_bf16_pipeline_parallel_and_main_grad():
    run_distributed(2, other_cases)


@pytest.mark.slow
def test_launcher_takes_the_flag():
    from tests.support.megatron_lm import TINY

    out = launch("--loss-type", "tofu", "--tofu-fused-linear", "--tofu-chunk-size", "64", *TINY)
    assert "Megatron requires CUDA" in out.stderr, out.stderr[-3000:]
    assert (
        "--tofu-fused-linear: the output layer and the loss run as one step, without the logits"
        in out.stdout
    )
    out = launch("--loss-type", "tofu", "--tofu-chunk-size", "0", *TINY)
    assert out.returncode == 2 and out.stderr.strip().endswith(
        "argument --tofu-chunk-size: must be a positive integer, got 0"
    )
