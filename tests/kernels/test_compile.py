"""torch.compile(fullgraph=True) on the CPU gives the eager result, for the torch backend and
for the Triton kernels under Triton's CPU interpreter, with aot_eager and with inductor.

Before: the torch backend stopped Dynamo (``storage_offset()`` in its row view), and the
Triton backend returned uninitialised memory without an error (its ops were traced into
bodies whose launches were skipped on fake tensors: losses like 4.5e15 where eager gives
3.9). Now the torch backend traces, and under the interpreter each Triton op is opaque to
the compiler (its body runs the interpreter at run time). The GPU path (``triton_op``
lowered by inductor) is tests/gpu/test_gpu.py's.

Each case runs in a fresh interpreter with an empty inductor cache (a cache written by
another build of the package would be replayed instead of compiling).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support.checkout import ROOT

pytestmark = pytest.mark.slow  # a fresh interpreter compiling for 20-65 s per case

SCRIPT = r"""
import sys, torch, tofu_kernels as tk
backend, compiler = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
x = torch.randn(3, 5, 40)
x[0, 1, 7] += 30.0  # a confident token
y = torch.randint(0, 40, (3, 5))
y[1, 2] = -100
up = torch.rand(3, 5)
exact = backend == "triton"  # the same kernels run; inductor re-generates the torch backend's arithmetic
for kw in (dict(reduction="none", return_ce=True), dict(reduction="mean"),
           dict(reduction="sum", grad_in_forward=False)):
    def step(a, b):
        out = tk.tofu_loss(a, b, backend=backend, **kw)
        return out[0] if isinstance(out, tuple) else out
    res = []
    for f in (step, torch.compile(step, fullgraph=True, backend=compiler)):
        torch._dynamo.reset()
        a = x.clone().requires_grad_()
        loss = f(a, y)
        (loss * up).sum().backward() if loss.dim() else loss.backward()
        res.append((loss.detach(), a.grad))
    (l0, g0), (l1, g1) = res
    assert torch.isfinite(l1).all() and torch.isfinite(g1).all(), (kw, l1)
    if exact:
        assert torch.equal(l0, l1) and torch.equal(g0, g1), (kw, l0, l1)
    else:
        torch.testing.assert_close(l1, l0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(g1, g0, rtol=1e-5, atol=1e-7)
    print("ok", kw)
"""


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_equals_eager_on_cpu(tmp_path, backend, compiler):
    env = {
        **os.environ,
        "TRITON_INTERPRET": "1",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
        "OMP_NUM_THREADS": "1",
    }
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, backend, compiler],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert out.stdout.count("ok ") == 3, out.stdout
