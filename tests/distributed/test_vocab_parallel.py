"""vocab_parallel_tofu_loss on gloo with 2 and 4 CPU processes.

Every rank builds the same full-vocab logits (same seed), keeps its shard, and compares
its loss and its shard's gradient with the single-process float64 reference on the full
vocabulary. Each test spawns the processes once and runs a group of cases inside.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

import tofu_kernels as tk
from tests.support.dist_utils import assert_same_on_all_ranks, run_distributed
from tests.support.helpers import assert_grad_close, assert_loss_close, make_logits, reference
from tests.support.spies import count_collectives

WORLDS = [2, pytest.param(4, marks=pytest.mark.slow)]  # 4 processes on 2 cores: 15-30 s a test


def _shard_loss(full, labels, rank, world, backend, upstream, **kw):
    vr = full.shape[-1] // world
    shard = full[..., rank * vr : (rank + 1) * vr].clone().requires_grad_()
    loss, ce = tk.vocab_parallel_tofu_loss(
        shard, labels, backend=backend, reduction="none", return_ce=True, **kw
    )
    (loss * upstream).sum().backward()
    return loss.detach(), ce, shard.grad, slice(rank * vr, (rank + 1) * vr)


def grid_cases(rank: int, world: int) -> None:
    """Backends x dtypes x (gamma, beta), ignored tokens, targets on shard edges."""
    vr = 13  # odd shard width
    for backend in ("torch", "triton"):
        for dtype in (torch.float32, torch.bfloat16):
            for gamma, beta in [(0.0, 1.0), (3.0, 0.8), (0.5, 1.5), (1.0, 0.5)]:
                torch.manual_seed(1)
                n = 2 * world + 3
                labels = torch.randint(0, vr * world, (n,))
                for r in range(world):  # first and last column of every shard
                    labels[2 * r], labels[2 * r + 1] = r * vr, (r + 1) * vr - 1
                labels[-1] = -100
                full, _ = make_logits((n,), vr * world, dtype, labels=labels)
                upstream = torch.randn(n)
                loss, ce, grad, cols = _shard_loss(
                    full, labels, rank, world, backend, upstream, gamma=gamma, beta=beta
                )
                ref_loss, ref_grad, ref_ce = reference(
                    full, labels, upstream, gamma=gamma, beta=beta
                )
                assert_loss_close(loss, ref_loss)
                assert_loss_close(ce, ref_ce)
                assert_grad_close(grad, ref_grad[:, cols], dtype)
                assert loss[-1] == 0 and (grad[-1] == 0).all()
                assert_same_on_all_ranks(loss)


def layout_cases(rank: int, world: int) -> None:
    """[s, b, v/tp] input and its [b, s] transpose view; uneven padded shards; reductions."""
    s, b, vr = 4, 3, 11
    torch.manual_seed(2)
    labels_sb = torch.randint(0, vr * world, (s, b))
    full, _ = make_logits((s, b), vr * world, torch.float32, labels=labels_sb)
    for backend in ("torch", "triton"):
        # Megatron's [s, b, v/tp] with [b, s] labels via a transposed view (no copy)
        shard = full[..., rank * vr : (rank + 1) * vr].clone().requires_grad_()
        upstream = torch.randn(b, s)
        loss = tk.vocab_parallel_tofu_loss(shard.transpose(0, 1), labels_sb.t(), backend=backend)
        (loss * upstream).sum().backward()
        ref_loss, ref_grad, _ = reference(full.transpose(0, 1), labels_sb.t(), upstream)
        assert_loss_close(loss, ref_loss)
        assert_grad_close(
            shard.grad.transpose(0, 1), ref_grad[..., rank * vr : (rank + 1) * vr], torch.float32
        )

    # Uneven shards with padding: global V = 10 + 3 * (world - 1); rank 0 holds 10 real
    # columns, the others 3 real columns; every shard is 12 wide, padded with 1e4.
    sizes = [10] + [3] * (world - 1)
    starts = [sum(sizes[:r]) for r in range(world)]
    v = sum(sizes)
    torch.manual_seed(3)
    labels = torch.randint(0, v, (9,))
    labels[0], labels[1] = v - 1, starts[1]  # last column; first of a 3-wide shard
    full, _ = make_logits((9,), v, torch.bfloat16, labels=labels)
    width = 12
    for backend in ("torch", "triton"):
        shard = torch.full((9, width), 1e4, dtype=torch.bfloat16)
        shard[:, : sizes[rank]] = full[:, starts[rank] : starts[rank] + sizes[rank]]
        shard.requires_grad_()
        upstream = torch.rand(9)
        loss = tk.vocab_parallel_tofu_loss(
            shard,
            labels,
            backend=backend,
            vocab_start=starts[rank],
            vocab_end=starts[rank] + sizes[rank],
        )
        (loss * upstream).sum().backward()
        ref_loss, ref_grad, _ = reference(full, labels, upstream)
        assert_loss_close(loss, ref_loss)
        assert_grad_close(
            shard.grad[:, : sizes[rank]],
            ref_grad[:, starts[rank] : starts[rank] + sizes[rank]],
            torch.bfloat16,
        )
        assert (shard.grad[:, sizes[rank] :] == 0).all(), "padding columns got gradient"

    # mean reduction over non-ignored tokens, identical to the single-device mean
    labels = torch.randint(0, vr * world, (6,))
    labels[:2] = -100
    full, _ = make_logits((6,), vr * world, torch.float32, labels=labels)
    shard = full[:, rank * vr : (rank + 1) * vr]
    mean = tk.vocab_parallel_tofu_loss(shard, labels, reduction="mean")
    assert_loss_close(mean, tk.tofu_loss_reference(full, labels)[0].sum() / 4)


def check_cases(rank: int, world: int) -> None:
    """One collective in forward, none in backward; bad input raises on every rank."""
    vr = 8
    labels = torch.randint(0, vr * world, (5,))
    full, _ = make_logits((5,), vr * world, torch.float32, labels=labels)
    for backend, check in (("torch", False), ("triton", False), ("torch", True)):
        shard = full[:, rank * vr : (rank + 1) * vr].clone().requires_grad_()
        with count_collectives() as calls:
            loss = tk.vocab_parallel_tofu_loss(
                shard, labels, backend=backend, reduction="sum", check_inputs=check
            )
            # one all-gather of the statistics; a checked call exchanges the ranks' 16-byte
            # metadata records first
            assert calls.total() == 1 + check, (
                f"forward issued {calls.total()} collectives: {calls}"
            )
            calls.clear()
            loss.backward()
            assert calls.total() == 0, f"backward issued {calls.total()} collectives: {calls}"

    # token counts that differ across ranks: the same error on every rank, no abort in the
    # all-gather (whose sizes would not match), and the group still works afterwards
    with pytest.raises(
        ValueError,
        match=re.escape(f"token counts differ across ranks ({[5 + r for r in range(world)]})"),
    ):
        tk.vocab_parallel_tofu_loss(
            torch.randn(5 + rank, vr), torch.randint(0, vr * world, (5 + rank,))
        )

    # shard widths that disagree across ranks (default layout)
    bad_width = torch.randn(5, vr + (rank == 1))
    with pytest.raises(ValueError, match="shard widths differ"):
        tk.vocab_parallel_tofu_loss(bad_width, labels)
    # explicit ranges that leave a gap
    with pytest.raises(ValueError, match="tile"):
        tk.vocab_parallel_tofu_loss(
            full[:, :vr], labels, vocab_start=rank * (vr + 1), vocab_end=rank * (vr + 1) + vr
        )
    # a range wider than the shard: caught locally, before any collective
    with pytest.raises(ValueError, match="at most the shard width"):
        tk.vocab_parallel_tofu_loss(full[:, :vr], labels, vocab_start=0, vocab_end=vr + 1)
    # labels outside [0, V) on every rank
    shard = full[:, rank * vr : (rank + 1) * vr]
    for bad in (vr * world, -3):
        bad_labels = labels.clone()
        bad_labels[1] = bad
        with pytest.raises(ValueError, match=rf"outside \[0, {vr * world}\)"):
            tk.vocab_parallel_tofu_loss(shard, bad_labels)
        loss = tk.vocab_parallel_tofu_loss(shard, bad_labels, check_inputs=False)
        assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3, 4]]).all()


@pytest.mark.slow  # 10-30 s
@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_grid(world):
    run_distributed(world, grid_cases)


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_layouts(world):
    run_distributed(world, layout_cases)


@pytest.mark.parametrize("world", WORLDS)
def test_vocab_parallel_collectives_and_errors(world):
    run_distributed(world, check_cases)


def test_world_size_one_without_process_group():
    """No torch.distributed at all: same as tofu_loss, no communication."""
    assert not dist.is_initialized()
    logits, labels = make_logits((6,), 40, torch.float32)
    out = tk.vocab_parallel_tofu_loss(logits, labels, reduction="none")
    assert_loss_close(out, tk.tofu_loss_reference(logits, labels)[0])
    padded = torch.cat([logits, torch.full((6, 5), 50.0)], dim=1)
    out = tk.vocab_parallel_tofu_loss(padded, labels, vocab_start=0, vocab_end=40)
    assert_loss_close(out, tk.tofu_loss_reference(logits, labels)[0])
