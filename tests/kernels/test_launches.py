"""How many kernels and torch operations one forward + backward costs, so it cannot regrow.

A GPU spends a few microseconds per launch and the host more; at the shard widths tensor
parallelism produces (4096 x 16032: 0.13 ms of memory traffic) launches decide the time.
Counted here without a GPU:
- the Triton backend in Triton's interpreter: every kernel launch, and every torch
  operation that is not a view or an allocation (which would be a kernel on a GPU);
- the CUDA backend on meta tensors: its ops (a known number of kernels each) and, again,
  every other torch operation.
Budgets (docs/design.md section 3): two-pass 3 kernels (statistics, epilogue, gradient),
gradient in the forward 4 (count, grad_in_forward, reduce; the rescale in the backward); no torch
operation around them. With tensor parallelism the one all-gather is added, nothing else.
The metrics (``return_metrics=True``) are a compile-time switch of the same kernels: the
same counts with them, and the plain path's unchanged.
"""

from __future__ import annotations

import pytest
import torch

import tofu_kernels as tk
from tests.support.dist_utils import run_distributed
from tests.support.spies import DispatchSpy, count_collectives, count_triton_launches, gathers


@pytest.fixture
def triton_launches():
    """Count the Triton kernel launches of the backend."""
    with count_triton_launches() as launches:
        yield launches


CASES = {  # (reduction, grad_in_forward) -> kernels per forward + backward
    ("none", None): 3,
    ("mean", False): 3,
    ("mean", None): 4,
    ("sum", None): 4,
}


def _fwd_bwd(x, labels, backend, reduction, grad_in_forward, metrics=False, **kw):
    out = tk.tofu_loss(
        x,
        labels,
        backend=backend,
        reduction=reduction,
        grad_in_forward=grad_in_forward,
        check_inputs=False,
        return_metrics=metrics,
        **kw,
    )
    return out[0] if metrics else out


@pytest.mark.parametrize("metrics", [False, True])
@pytest.mark.parametrize("case", list(CASES), ids=[f"{r}-gif={g}" for r, g in CASES])
def test_triton_kernels_and_no_torch_glue(case, metrics, triton_launches):
    reduction, grad_in_forward = case
    x = torch.randn(6, 100, requires_grad=True)
    labels = torch.randint(0, 100, (6,))
    seed = torch.ones(6) if reduction == "none" else torch.ones(())
    with DispatchSpy() as ops:
        _fwd_bwd(x, labels, "triton", reduction, grad_in_forward, metrics).backward(seed)
    assert len(triton_launches) == CASES[case], triton_launches
    assert ops.torch_ops == [], f"torch operations around the kernels: {ops.torch_ops}"


# the CUDA ops and the kernels each launches (csrc/tofu_kernels.cu)
CUDA_KERNELS = {
    "row_stats": 1,
    "epilogue": 1,
    "grad": 1,
    "grad_inplace": 1,
    "grad_in_forward": 3,
    "grad_in_forward_inplace": 3,
    "rescale": 1,
}


@pytest.mark.parametrize("metrics", [False, True])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("case", list(CASES), ids=[f"{r}-gif={g}" for r, g in CASES])
def test_cuda_kernels_and_no_torch_glue(case, inplace, metrics):
    if not tk.extension_loaded():
        pytest.skip("CUDA extension not built (no nvcc / CPU-only torch)")
    reduction, grad_in_forward = case
    leaf = torch.empty(6, 5000, device="meta", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.empty(6, device="meta", dtype=torch.long)
    seed = torch.ones(6, device="meta") if reduction == "none" else torch.ones((), device="meta")
    x = leaf.view(6, 5000) if inplace else leaf  # a non-leaf whose storage may take the gradient
    with DispatchSpy() as ops:
        loss = _fwd_bwd(
            x, labels, "cuda", reduction, grad_in_forward, metrics, inplace_backward=inplace
        )
        loss.backward(seed)
    assert sum(CUDA_KERNELS[o] for o in ops.ours) == CASES[case], ops.ours
    assert ops.torch_ops == [], f"torch operations around the kernels: {ops.torch_ops}"


def tp_cases(rank: int, world: int) -> None:
    """Vocab-parallel on gloo: the three kernels and the one all-gather, nothing else."""
    x = torch.randn(5, 40, requires_grad=True)
    labels = torch.randint(0, 40 * world, (5,))
    seed = torch.ones(5)
    with (
        count_triton_launches() as launches,
        count_collectives() as collectives,
        DispatchSpy() as ops,
    ):
        loss = tk.vocab_parallel_tofu_loss(x, labels, backend="triton", check_inputs=False)
        loss.backward(seed)
    assert (
        len(launches) == 3
        and gathers(collectives) == collectives.total() == 1
        and len(ops.collectives) == 1
    ), (launches, collectives)
    assert ops.torch_ops == [], f"torch operations around the kernels: {ops.torch_ops}"


@pytest.mark.slow  # 2 processes: ~10 s
def test_vocab_parallel_kernels_and_one_collective():
    run_distributed(2, tp_cases)
