"""How many kernels and torch operations one forward + backward costs, so it cannot regrow.

A GPU spends a few microseconds per launch and the host more; at the shard widths tensor
parallelism produces (4096 x 16032: 0.13 ms of memory traffic) launches decide the time.
Counted here without a GPU:
- the Triton backend in Triton's interpreter: every kernel launch, and every torch
  operation that is not a view or an allocation (which would be a kernel on a GPU);
- the CUDA backend on meta tensors: its ops (a known number of kernels each) and, again,
  every other torch operation.
Budgets (docs/design.md section 3): two-pass 3 kernels (statistics, epilogue, gradient),
gradient in the forward 4 (count, fused, reduce; the rescale in the backward); no torch
operation around them. With tensor parallelism the one all-gather is added, nothing else.
The metrics (``return_metrics=True``) are a compile-time switch of the same kernels: the
same counts with them, and the plain path's unchanged.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import tofu_kernels as tk
from tofu_kernels.backends import triton_ops

from .dist_utils import run_distributed

# Metadata-only operations: no kernel on any device.
FREE = {
    "empty.memory_format", "empty_strided.default", "view.default", "_unsafe_view.default", "select.int",
    "slice.Tensor", "as_strided.default", "expand.default", "transpose.int", "t.default", "alias.default",
    "detach.default", "unsqueeze.default", "squeeze.dim", "reshape.default", "permute.default",
}


_IN_LAUNCH = [0]  # > 0 while a Triton kernel runs: the CPU interpreter's own host copies


class OpCounter(TorchDispatchMode):
    """Records every operator call: ours (tofu_kernels::*) and torch's, except those Triton's
    CPU interpreter makes inside a kernel launch (on a GPU a launch makes none)."""

    def __init__(self):
        super().__init__()
        self.ours: list[str] = []
        self.collectives: list[str] = []
        self.torch_ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = f"{func._schema.name.split('::')[-1]}.{func._overloadname}"
        if _IN_LAUNCH[0]:
            pass
        elif func.namespace == "tofu_kernels":
            self.ours.append(func._schema.name.split("::")[-1])
        elif func.namespace == "c10d":
            self.collectives.append(name)
        elif name not in FREE:
            self.torch_ops.append(name)
        return func(*args, **(kwargs or {}))


@pytest.fixture
def triton_launches(monkeypatch):
    """Count the Triton kernel launches of the backend."""
    launches: list[str] = []
    real = triton_ops._launch

    def counting(kernel):
        k = real(kernel)

        class Counted:
            def __getitem__(self, grid):
                def run(*a, **kw):
                    launches.append(kernel.fn.__name__ if hasattr(kernel, "fn") else str(kernel))
                    _IN_LAUNCH[0] += 1
                    try:
                        return k[grid](*a, **kw)
                    finally:
                        _IN_LAUNCH[0] -= 1

                return run

        return Counted()

    monkeypatch.setattr(triton_ops, "_launch", counting)
    return launches


CASES = {  # (reduction, grad_in_forward) -> kernels per forward + backward
    ("none", None): 3,
    ("mean", False): 3,
    ("mean", None): 4,
    ("sum", None): 4,
}


def _fwd_bwd(x, labels, backend, reduction, grad_in_forward, metrics=False, **kw):
    out = tk.tofu_loss(x, labels, backend=backend, reduction=reduction, grad_in_forward=grad_in_forward,
                       check_inputs=False, return_metrics=metrics, **kw)
    return out[0] if metrics else out


@pytest.mark.parametrize("metrics", [False, True])
@pytest.mark.parametrize("case", list(CASES), ids=[f"{r}-gif={g}" for r, g in CASES])
def test_triton_kernels_and_no_torch_glue(case, metrics, triton_launches):
    reduction, grad_in_forward = case
    x = torch.randn(6, 100, requires_grad=True)
    labels = torch.randint(0, 100, (6,))
    seed = torch.ones(6) if reduction == "none" else torch.ones(())
    with OpCounter() as ops:
        _fwd_bwd(x, labels, "triton", reduction, grad_in_forward, metrics).backward(seed)
    assert len(triton_launches) == CASES[case], triton_launches
    assert ops.torch_ops == [], f"torch operations around the kernels: {ops.torch_ops}"


# the CUDA ops and the kernels each launches (csrc/tofu_kernels.cu)
CUDA_KERNELS = {"row_stats": 1, "epilogue": 1, "grad": 1, "grad_inplace": 1, "fused": 3, "fused_inplace": 3,
                "rescale": 1}


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
    with OpCounter() as ops:
        loss = _fwd_bwd(x, labels, "cuda", reduction, grad_in_forward, metrics, inplace_backward=inplace)
        loss.backward(seed)
    assert sum(CUDA_KERNELS[o] for o in ops.ours) == CASES[case], ops.ours
    assert ops.torch_ops == [], f"torch operations around the kernels: {ops.torch_ops}"


def tp_cases(rank: int, world: int) -> None:
    """Vocab-parallel on gloo: the three kernels and the one all-gather, nothing else."""
    import torch.distributed as dist

    launches: list[str] = []
    real = triton_ops._launch

    def counting(kernel):
        return _CountedLaunch(real(kernel), launches, kernel)

    triton_ops._launch = counting
    collectives = []
    real_gather = dist.all_gather_single if hasattr(dist, "all_gather_single") else dist.all_gather_into_tensor
    name = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
    setattr(dist, name, lambda *a, **k: collectives.append(1) or real_gather(*a, **k))
    try:
        x = torch.randn(5, 40, requires_grad=True)
        labels = torch.randint(0, 40 * world, (5,))
        seed = torch.ones(5)
        with OpCounter() as ops:
            loss = tk.vocab_parallel_tofu_loss(x, labels, backend="triton", check_inputs=False)
            loss.backward(seed)
    finally:
        triton_ops._launch = real
        setattr(dist, name, real_gather)
    assert len(launches) == 3 and len(collectives) == 1 and len(ops.collectives) == 1, (launches, collectives)
    assert ops.torch_ops == [], f"torch operations around the kernels: {ops.torch_ops}"


class _CountedLaunch:
    def __init__(self, k, launches, kernel):
        self.k, self.launches, self.kernel = k, launches, kernel

    def __getitem__(self, grid):
        def run(*a, **kw):
            self.launches.append(str(self.kernel))
            _IN_LAUNCH[0] += 1
            try:
                return self.k[grid](*a, **kw)
            finally:
                _IN_LAUNCH[0] -= 1

        return run


def test_vocab_parallel_kernels_and_one_collective():
    run_distributed(2, tp_cases)
