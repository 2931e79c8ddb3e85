"""Tensor parallelism on the GPU kernels: TP = 2 and 4 emulated with processes sharing one GPU.

Each process holds a real vocab shard of CUDA logits and runs the CUDA or Triton kernels;
the processes talk over gloo, which carries collectives for CUDA tensors only in part:
all_reduce and broadcast yes, all_gather no. The one step that needs it, the loss's
statistics all-gather, is staged through host memory HERE, in the test harness (the
library is unchanged and calls torch.distributed as it does under NCCL); the harness says
in the log whether staging was needed. Against the float64 reference on the gathered
logits: every rank's loss (bitwise identical across ranks) and each shard's gradient;
one collective in the forward, none in the backward. Then the Megatron patch at TP = 2 on
one GPU: a tiny bf16 GPTModel against the reference, and its CE mode against Megatron's
own loss (parameter gradients).

The GPU cases are marked `gpu` (run by tools/gpu/gpu_check.sh). The same harness runs
on CPU here with the torch and interpreted Triton backends (the `harness_on_cpu` tests),
so the test code itself is exercised on every CI run; the CPU suite proper is
tests/distributed/test_vocab_parallel.py and tests/megatron/test_megatron_patch.py.
"""

from __future__ import annotations

import os

import pytest
import torch

import tofu_kernels as tk
from tests.support.dist_utils import (
    assert_same_on_all_ranks,
    run_distributed,
    shared_device,
    stage_all_gather_through_host_if_needed,
)
from tests.support.helpers import (
    assert_grad_close,
    assert_loss_close,
    gpu_backends,
    make_logits,
    reference,
)
from tests.support.megatron_utils import require_megatron_core
from tests.support.spies import count_collectives


def _note(text: str) -> None:
    """Print, and append to $TOFU_GPU_NOTES when set (gpu_check.sh points it at its summary)."""
    print(text, flush=True)
    path = os.environ.get("TOFU_GPU_NOTES")
    if path:
        with open(path, "a") as f:
            f.write(text + "\n")


def vocab_parallel_cases(
    rank: int, world: int, device: str, backends: tuple, dtypes: tuple
) -> None:
    dev = shared_device(device)
    how = stage_all_gather_through_host_if_needed(dev)
    if rank == 0:
        _note(f"[tp={world} on {device}] the statistics all-gather: {how}")
    dtypes = tuple(getattr(torch, d) for d in dtypes)
    for backend in backends:
        for dtype in dtypes:
            # even shards; targets on every shard's first and last column, on other ranks,
            # ignored tokens, per-token upstream gradients
            vr = 5000 if device == "cuda" else 100  # on the GPU a shard crosses a 4096-column tile
            torch.manual_seed(7)
            n = 4 * world + 5
            labels = torch.randint(0, vr * world, (n,))
            for r in range(world):
                labels[2 * r], labels[2 * r + 1] = r * vr, (r + 1) * vr - 1
            labels[-2:] = -100
            full, _ = make_logits((n,), vr * world, dtype, labels=labels)
            upstream = torch.randn(n)
            shard = full[:, rank * vr : (rank + 1) * vr].to(dev).clone().requires_grad_()
            with count_collectives() as calls:
                # unchecked, as Megatron's loss after its first call: one collective (a checked
                # call exchanges the ranks' 16-byte metadata first)
                loss = tk.vocab_parallel_tofu_loss(
                    shard, labels.to(dev), gamma=3.0, beta=0.8, backend=backend, check_inputs=False
                )
                forward_collectives = calls.total()
                calls.clear()
                (loss * upstream.to(dev)).sum().backward()
                backward_collectives = calls.total()
            assert forward_collectives == 1 and backward_collectives == 0, (
                forward_collectives,
                backward_collectives,
            )
            ref_loss, ref_grad, _ = reference(full, labels, upstream, gamma=3.0, beta=0.8)
            assert_loss_close(loss.detach().cpu(), ref_loss)
            assert_grad_close(shard.grad.cpu(), ref_grad[:, rank * vr : (rank + 1) * vr], dtype)
            assert (shard.grad[-2:] == 0).all()
            assert_same_on_all_ranks(loss)

            # Megatron's [s, b, V/tp] with [b, s] labels, as a transposed view (no copy)
            s, b = 5, 3
            labels_sb = torch.randint(0, vr * world, (s, b))
            full3, _ = make_logits((s, b), vr * world, dtype, labels=labels_sb)
            shard3 = full3[..., rank * vr : (rank + 1) * vr].to(dev).clone().requires_grad_()
            w = torch.randn(b, s)
            loss3 = tk.vocab_parallel_tofu_loss(
                shard3.transpose(0, 1), labels_sb.t().to(dev), backend=backend
            )
            (loss3 * w.to(dev)).sum().backward()
            ref3, ref_grad3, _ = reference(full3.transpose(0, 1), labels_sb.t(), w)
            assert_loss_close(loss3.detach().cpu(), ref3)
            assert_grad_close(
                shard3.grad.transpose(0, 1).cpu(),
                ref_grad3[..., rank * vr : (rank + 1) * vr],
                dtype,
            )
            assert_same_on_all_ranks(loss3)

            # uneven shards with padding columns: rank 0 holds 700 real columns, the others
            # 300; every local row is 768 wide (16-byte aligned), padded with large values
            sizes = [700] + [300] * (world - 1)
            starts = [sum(sizes[:r]) for r in range(world)]
            v, width = sum(sizes), 768
            labels_u = torch.randint(0, v, (9,))
            labels_u[0], labels_u[1], labels_u[2] = v - 1, starts[-1], sizes[0] - 1
            fullu, _ = make_logits((9,), v, dtype, labels=labels_u)
            local = torch.full((9, width), 1e4, dtype=dtype)
            local[:, : sizes[rank]] = fullu[:, starts[rank] : starts[rank] + sizes[rank]]
            local = local.to(dev).requires_grad_()
            wu = torch.rand(9)
            lossu = tk.vocab_parallel_tofu_loss(
                local,
                labels_u.to(dev),
                backend=backend,
                vocab_start=starts[rank],
                vocab_end=starts[rank] + sizes[rank],
            )
            (lossu * wu.to(dev)).sum().backward()
            refu, ref_gradu, _ = reference(fullu, labels_u, wu)
            assert_loss_close(lossu.detach().cpu(), refu)
            assert_grad_close(
                local.grad[:, : sizes[rank]].cpu(),
                ref_gradu[:, starts[rank] : starts[rank] + sizes[rank]],
                dtype,
            )
            assert (local.grad[:, sizes[rank] :] == 0).all(), "padding columns got gradient"
            assert_same_on_all_ranks(lossu)


def megatron_tp2_cases(rank: int, world: int, device: str, backend: str) -> None:
    """The Megatron patch at TP = 2 on one device: a tiny GPTModel (local spec, no SP)."""
    require_megatron_core()
    import megatron_patch
    from tests.support.megatron_utils import (
        assert_ce_mode_matches_megatron,
        causal_mask,
        gather_vocab,
        init_megatron_cpu,
        tiny_gpt,
    )

    dev = shared_device(device)
    how = stage_all_gather_through_host_if_needed(dev)
    if device == "cpu":
        init_megatron_cpu(world)
    else:
        from megatron.core import parallel_state, tensor_parallel

        parallel_state.destroy_model_parallel()
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
        tensor_parallel.random.model_parallel_cuda_manual_seed(1234)
    if rank == 0:
        _note(f"[megatron tp={world} on {device}] the statistics all-gather: {how}")
    b, s, vocab = 2, 16, 512
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocab, (b, s), generator=g).to(dev)
    labels = torch.randint(0, vocab, (b, s), generator=g).to(dev)
    pos = torch.arange(s, device=dev).expand(b, s)
    mask = causal_mask(s).to(dev)
    loss_mask = torch.ones(b, s, device=dev)
    loss_mask[:, :4] = 0

    # TOFU in bf16 against the fp64 reference on the gathered logits
    model = tiny_gpt(world, dtype=torch.bfloat16, vocab=vocab, seq=s, hidden=64).to(dev)
    with torch.no_grad():
        full = gather_vocab(model(ids, pos, mask).float())
    megatron_patch.apply("tofu", gamma=3.0, beta=0.8, backend=backend)
    loss = model(ids, pos, mask, labels=labels)
    ((loss * loss_mask).sum() / loss_mask.sum()).backward()
    megatron_patch.revert()
    ref, ref_ce = tk.tofu_loss_reference(full, labels.cpu(), gamma=3.0, beta=0.8)
    assert_loss_close(loss.detach().cpu(), ref)
    assert_loss_close(megatron_patch.cross_entropy_of(loss).cpu(), ref_ce)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)

    # CE mode (gamma 0, beta 1) in fp32: parameter gradients equal Megatron's own loss
    model = tiny_gpt(world, dtype=torch.float32, vocab=vocab, seq=s, hidden=64).to(dev)
    assert_ce_mode_matches_megatron(model, ids, pos, mask, labels, loss_mask, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("world", [2, 4])
def test_vocab_parallel_on_one_gpu(world):
    if not tk.extension_loaded():
        pytest.fail("gpu_check.sh builds the CUDA extension; it must load on this GPU")
    run_distributed(
        world,
        vocab_parallel_cases,
        device="cuda",
        backends=gpu_backends(),
        dtypes=("bfloat16", "float32"),
    )


@pytest.mark.gpu
@pytest.mark.megatron
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_megatron_patch_tp2_on_one_gpu(backend):
    run_distributed(2, megatron_tp2_cases, device="cuda", backend=backend)


def test_harness_on_cpu_vocab_parallel():
    """The GPU test's harness and checks, here on CPU (torch backend), so a CI run
    exercises the code that the GPU run will execute."""
    run_distributed(
        2, vocab_parallel_cases, device="cpu", backends=("torch",), dtypes=("bfloat16",)
    )


@pytest.mark.slow
@pytest.mark.megatron
def test_harness_on_cpu_megatron_tp2():
    require_megatron_core()
    run_distributed(2, megatron_tp2_cases, device="cpu", backend="torch")
