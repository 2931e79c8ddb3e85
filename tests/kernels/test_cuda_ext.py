"""The CUDA extension without a GPU: build, registration, fakes, torch.compile, header math.

What runs here: the extension is compiled by `make test` (nvcc 13.0 + torch cu130) and
loaded; the architectures it records are the cubins and PTX its binary holds (cuobjdump);
its ops are registered with mutation-marking schemas; their fake/meta
implementations give the right shapes; torch.compile(fullgraph=True) traces the whole
forward and backward through them; and the kernels' math header, compiled by g++ into a
host harness, matches the float64 reference. Kernel execution is in tests/gpu/test_gpu.py.
"""

from __future__ import annotations

import ctypes
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tofu_kernels as tk
from tests.support.checkout import ROOT
from tofu_kernels.records import GradParam, Meta, Metric, MetricAcc, Reduced, Reduction, Stat
from tofu_kernels.tofu_math import finalize_stats

NVCC = shutil.which("nvcc") or (Path("/usr/local/cuda/bin/nvcc").exists() or None)
needs_ext = pytest.mark.skipif(
    not tk.extension_loaded(), reason="CUDA extension not built (no nvcc / CPU-only torch)"
)


def test_extension_built_where_a_toolkit_exists():
    """make test builds the extension whenever nvcc and a CUDA torch exist (as in CI)."""
    if NVCC and torch.version.cuda:
        assert tk.extension_loaded(), "nvcc and CUDA torch present but tofu_kernels._C did not load"
    else:
        assert not tk.extension_loaded()
        with pytest.raises(RuntimeError, match="not built"):
            tk.tofu_loss(torch.randn(2, 3), torch.tensor([0, 1]), backend="cuda")


def test_extension_loads_when_tofu_kernels_is_imported_first():
    """A script whose first import is tofu_kernels (torch not yet loaded) gets the extension
    wherever the tests' process got it: _C links against libc10, which only torch loads."""
    run = subprocess.run(
        [sys.executable, "-c", "import tofu_kernels as tk; print(tk.extension_status())"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("loaded: ") == tk.extension_loaded(), run.stdout


def _cuobjdump() -> str | None:
    """NVIDIA's cuobjdump: the one in the Triton wheel, else a toolkit's."""
    import importlib.util

    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.is_file():
            return str(bundled)
    return shutil.which("cuobjdump") or next(
        (str(p) for p in (Path("/usr/local/cuda/bin/cuobjdump"),) if p.is_file()), None
    )


@needs_ext
def test_recorded_archs_are_the_binarys():
    """_C.ARCHS (what setup.py read from torch's -gencode flags) names exactly the cubins and
    the PTX that the built library holds, as cuobjdump lists them (PTX for compute_XY is
    listed as sm_XY.ptx)."""
    from tofu_kernels import _C
    from tofu_kernels.extension import held_archs

    tool = _cuobjdump()
    if tool is None:
        pytest.skip(
            "no cuobjdump (neither Triton's bundled one nor a CUDA toolkit's) to list the binary"
        )

    def listed(option: str, pattern: str) -> list[str]:
        run = subprocess.run(
            [tool, option, _C.__file__], capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr
        return re.findall(pattern, run.stdout)

    cubins = [f"sm_{a}" for a in listed("--list-elf", r"\.sm_(\w+)\.cubin")]
    ptx = [f"compute_{a}" for a in listed("--list-ptx", r"\.sm_(\w+)\.ptx")]
    assert cubins, "cuobjdump lists no cubin in the extension"
    assert sorted(cubins + ptx) == sorted(held_archs()), (cubins, ptx, _C.ARCHS)
    assert len(held_archs()) == len(set(held_archs())), _C.ARCHS


@needs_ext
def test_ops_registered_with_mutation_schemas():
    ops = torch.ops.tofu_kernels
    written = {
        "row_stats": {"stats"},
        "epilogue": {"loss", "ce", "rec", "red", "met"},
        "grad": {"out"},
        "grad_inplace": {"x"},
        "grad_in_forward": {"out", "loss", "ce", "red", "met"},
        "grad_in_forward_inplace": {"x", "loss", "ce", "red", "met"},
        "rescale": {"out"},
    }
    for name, expect in written.items():
        schema = getattr(ops, name).default._schema
        got = {
            a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
        }
        assert got == expect, f"{name}: writes {got}, schema should mark {expect}"
        assert len(schema.returns) == 0


@needs_ext
def test_cuda_backend_refuses_cpu_tensors():
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        tk.tofu_loss(torch.randn(2, 3), torch.tensor([0, 1]), backend="cuda")


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_meta_shapes_and_dtypes(dtype, inplace, reduction):
    x = torch.empty(5, 3, 1000, device="meta", dtype=dtype, requires_grad=True)
    labels = torch.empty(5, 3, device="meta", dtype=torch.long)
    logits = x * 1 if inplace else x
    loss, ce = tk.tofu_loss(
        logits,
        labels,
        reduction=reduction,
        backend="cuda",
        inplace_backward=inplace,
        return_ce=True,
    )
    shape = (5, 3) if reduction == "none" else ()
    assert loss.shape == ce.shape == shape and loss.dtype == ce.dtype == torch.float32
    loss.sum().backward()
    assert x.grad.shape == x.shape and x.grad.dtype == dtype and x.grad.device.type == "meta"


def _compile_and_capture(fn, *args):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = {}

    def record(name):
        def compiler(gm, example_inputs):
            graphs[name] = gm
            return make_boxed_func(gm.forward)

        return compiler

    torch._dynamo.reset()
    compiled = torch.compile(
        fn, fullgraph=True, backend=aot_autograd(fw_compiler=record("fw"), bw_compiler=record("bw"))
    )
    out = compiled(*args)
    return out, graphs


def _dynamo_capture(fn, *args):
    """Run ``fn`` under torch.compile(fullgraph=True) with a backend that keeps Dynamo's
    graph; returns the output and the code of the autograd Function's forward and backward
    subgraphs."""
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    out = torch.compile(fn, fullgraph=True, backend=backend)(*args)
    assert len(graphs) == 1, "graph break"
    subs = {name: m.code for name, m in graphs[0].named_modules() if name}
    fw = "\n".join(c for n, c in subs.items() if "fwd" in n)
    bw = "\n".join(c for n, c in subs.items() if "bwd" in n)
    return out, (fw, bw)


# (grad_in_forward, reduction) -> the ops the forward and the backward graphs must hold
PATHS = {
    (False, "mean"): (("row_stats", "epilogue"), ("grad",)),
    (False, "none"): (("row_stats", "epilogue"), ("grad",)),
    (True, "mean"): (("grad_in_forward",), ("rescale",)),
    (True, "sum"): (("grad_in_forward",), ("rescale",)),
}


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("path", list(PATHS), ids=[f"gif={g}-{r}" for g, r in PATHS])
def test_torch_compile_fullgraph_traces_forward_and_backward(backend, inplace, path):
    """No graph break, no host sync: our ops, and only a handful, in the forward and the
    backward graphs (meta tensors: shape-only tracing, no GPU needed)."""
    if backend == "cuda" and not tk.extension_loaded():
        pytest.skip("CUDA extension not built (no nvcc / CPU-only torch)")
    grad_in_forward, reduction = path
    x = torch.empty(4, 7, 5000, device="meta", dtype=torch.bfloat16, requires_grad=True)
    labels = torch.empty(4, 7, device="meta", dtype=torch.long)

    def step(leaf, y):
        logits = leaf * 2 if inplace else leaf
        return tk.tofu_loss(
            logits,
            y,
            gamma=3.0,
            beta=0.8,
            backend=backend,
            return_ce=True,
            reduction=reduction,
            inplace_backward=inplace,
            grad_in_forward=grad_in_forward,
        )

    if backend == "cuda":
        (loss, ce), graphs = _compile_and_capture(step, x, labels)
    else:
        # Dynamo's own graph shows the ops (AOT would show the kernels of a triton_op, or,
        # under Triton's CPU interpreter, the opaque op: tests/kernels/test_compile.py runs that).
        (loss, ce), (fw, bw) = _dynamo_capture(step, x, labels)
    (loss.sum() if reduction == "none" else loss).backward()
    if backend == "cuda":  # AOT compiles the backward when it first runs
        fw, bw = graphs["fw"].code, graphs["bw"].code
    assert x.grad.shape == x.shape
    prefix = "tofu_kernels." + ("triton_" if backend == "triton" else "")
    fw_ops, bw_ops = PATHS[path]
    for op in fw_ops:
        assert prefix + op in fw, (op, fw)
    for op in bw_ops:
        assert prefix + op in bw, (op, bw)
    assert "_local_scalar_dense" not in fw + bw, "host sync in the compiled graph"


# ------------------------------------------------------------- header math (host)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.fail("no C++ compiler (g++) to build the header harness")
    lib = tmp_path_factory.mktemp("harness") / "libtofu_harness.so"
    subprocess.run(
        [
            cxx,
            "-O2",
            "-std=c++17",
            "-shared",
            "-fPIC",
            "-I",
            str(ROOT / "csrc"),
            str(Path(__file__).resolve().parent / "csrc" / "header_harness.cpp"),
            "-o",
            str(lib),
        ],
        check=True,
    )
    h = ctypes.CDLL(str(lib))
    f32p = ctypes.POINTER(ctypes.c_float)
    h.tofu_row_stats.argtypes = [f32p, ctypes.c_int, ctypes.c_float, ctypes.c_int, f32p]
    h.tofu_row_stats_ent.argtypes = [
        f32p,
        ctypes.c_int,
        ctypes.c_float,
        ctypes.c_int,
        ctypes.c_longlong,
        f32p,
    ]
    h.tofu_row_metrics.argtypes = [ctypes.c_float] * 6 + [ctypes.c_longlong] * 3 + [f32p]
    h.tofu_focal_weight.argtypes = [ctypes.c_float, ctypes.c_float]
    h.tofu_focal_weight.restype = ctypes.c_float
    h.tofu_finalize_row.argtypes = (
        [ctypes.c_float] * 4 + [ctypes.c_longlong] * 3 + [ctypes.c_float] * 2 + [f32p]
    )
    h.tofu_grad_row.argtypes = [f32p, ctypes.c_int, ctypes.c_int] + [ctypes.c_float] * 5 + [f32p]
    h.tofu_layouts.argtypes = [ctypes.POINTER(ctypes.c_int)]
    h.tofu_layouts.restype = ctypes.c_int
    return h


def _ptr(t: torch.Tensor):
    return ctypes.cast(t.data_ptr(), ctypes.POINTER(ctypes.c_float))


def test_record_layouts_agree(harness):
    """csrc/tofu_math.cuh mirrors records.Stat, GradParam, Meta, Reduced, Reduction, Metric and
    MetricAcc field for field."""
    buf = (ctypes.c_int * 64)()
    got = list(buf[: harness.tofu_layouts(buf)])
    expect = [int(f) for f in Stat] + [len(Stat)] + [int(f) for f in GradParam] + [len(GradParam)]
    expect += (
        [int(f) for f in Meta]
        + [int(f) for f in Reduced]
        + [len(Reduced)]
        + [int(f) for f in Reduction]
    )
    expect += (
        [int(f) for f in Metric] + [len(Metric)] + [int(f) for f in MetricAcc] + [len(MetricAcc)]
    )
    assert got == expect
    # the C++ names follow the Python ones (kLogSb <-> LOG_SB, kVocabEnd <-> VOCAB_END)
    header = (ROOT / "csrc" / "tofu_math.cuh").read_text()
    for ns, names, width in (
        ("stat", Stat, True),
        ("gparam", GradParam, True),
        ("meta", Meta, False),
        ("reduced", Reduced, True),
        ("reduction", Reduction, False),
        ("metric", Metric, True),
        ("macc", MetricAcc, True),
    ):
        enum = re.search(rf"namespace {ns} \{{.*?enum : int \{{([^}}]*)\}}", header, re.S).group(1)
        cxx = [e.split("=")[0].strip()[1:].lower() for e in enum.split(",")]
        py = [f.name.replace("_", "").lower() for f in names] + (["width"] if width else [])
        assert cxx == py, (ns, cxx, py)


@needs_ext
def test_launch_constants_come_from_the_extension():
    """Python's launch policy uses the C++ constants (csrc/tofu_kernels.h), not copies."""
    from tofu_kernels import _C
    from tofu_kernels.backends import gpu

    header = (ROOT / "csrc" / "tofu_kernels.h").read_text()
    assert (
        f"kTileCols = {_C.TILE_COLS};" in header
        and f"kTargetBlocks = {_C.TARGET_BLOCKS};" in header
    )
    assert re.search(r"constexpr int kThreads = \d+;", header)  # C++ only: not exported
    assert (
        f"kEpilogueThreads = {_C.EPILOGUE_THREADS};" in header
        and f"kRescaleBlocks = {_C.RESCALE_BLOCKS};" in header
    )
    assert (gpu.TILE_COLS, gpu.TARGET_BLOCKS) == (_C.TILE_COLS, _C.TARGET_BLOCKS)
    assert (gpu.EPILOGUE_THREADS, gpu.RESCALE_BLOCKS) == (_C.EPILOGUE_THREADS, _C.RESCALE_BLOCKS)


@pytest.mark.parametrize("beta", [0.5, 0.8, 1.0, 1.5])
@pytest.mark.parametrize("n,parts", [(1, 1), (37, 1), (37, 3), (1000, 7), (1000, 64)])
def test_header_row_stats(harness, beta, n, parts):
    z = torch.randn(n, dtype=torch.float32) * 4
    out = torch.empty(3, dtype=torch.float32)
    harness.tofu_row_stats(_ptr(z), n, beta, parts, _ptr(out))
    zd = z.double()
    m = zd.max()
    expect = torch.stack([m, (zd - m).exp().sum(), ((zd - m) / beta).exp().sum()])
    torch.testing.assert_close(out.double(), expect, rtol=2e-6, atol=0)


@pytest.mark.parametrize("beta", [0.8, 1.0])
@pytest.mark.parametrize("n,parts", [(1, 1), (37, 3), (1000, 7), (1000, 64)])
def test_header_entropy_accumulator_and_metrics(harness, beta, n, parts):
    """The metrics' switch on: the same statistics, plus E = sum exp(z - m)(z - m) through the
    online rescaling and the merges (parts of 8-wide vectors, -inf columns among them), and
    the row metrics against fp64 (a confident, a hopeless and an ignored row); top-1 is the
    first maximum: with the row's maximum tied at two columns, only the first is top-1."""
    z = torch.randn(n, dtype=torch.float32) * 4
    if n > 10:
        z[3] = -math.inf  # a masked column: adds 0 to E, never 0 * -inf
    plain = torch.empty(3, dtype=torch.float32)
    harness.tofu_row_stats(_ptr(z), n, beta, parts, _ptr(plain))
    zd = z.double()
    m = zd.max()
    d = zd - m
    e_ref = (d.exp() * torch.where(torch.isinf(d), 0.0, d)).sum()
    lp = torch.log_softmax(zd, 0)
    h_ref = -(lp.exp() * torch.where(torch.isinf(lp), 0.0, lp)).sum()
    out = torch.empty(2, dtype=torch.float32)

    def metrics_of(row: torch.Tensor, label: int) -> list[float]:
        acc = torch.empty(5, dtype=torch.float32)
        harness.tofu_row_stats_ent(_ptr(row), n, beta, parts, label, _ptr(acc))
        harness.tofu_row_metrics(
            *acc.tolist(),
            float(row[label]) if 0 <= label < n else float(m),
            label,
            -100,
            n,
            _ptr(out),
        )
        return acc, out.tolist()

    top = int(zd.argmax())
    acc, got = metrics_of(z, top)
    assert torch.equal(acc[:3], plain), "the metrics' accumulators change the plain statistics"
    assert acc[3].item() == pytest.approx(e_ref.item(), rel=2e-5, abs=1e-6)
    assert acc[4].item() == (zd[:top].max().item() if top > 0 else -math.inf)  # exact: a max
    assert got[0] == pytest.approx(h_ref.item(), rel=2e-5, abs=2e-6) and got[1] == 1.0
    low = int(zd.argmin())
    assert metrics_of(z, low)[1][1] == (1.0 if n == 1 else 0.0)
    if n > 1:  # the maximum tied at a column before and after the first
        tied = z.clone()
        other = (top + n // 2) % n
        first, second = sorted((top, other if other != 3 else (other + 1) % n))
        tied[first] = tied[second] = z.max()
        assert metrics_of(tied, first)[1][1] == 1.0 and metrics_of(tied, second)[1][1] == 0.0
    metrics_of(z, -100)
    assert out.tolist() == [0.0, 0.0]
    metrics_of(z, n)
    assert all(math.isnan(v) for v in out.tolist())


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.0, 3.0, 4.5])
def test_header_focal_weight(harness, gamma):
    for lp in [0.0, -1e-30, -1e-7, -1e-3, -math.log(2), -5.0, -70.0, -1e4, -math.inf]:
        got = harness.tofu_focal_weight(lp, gamma)
        ref = tk.focal_weight(torch.tensor(lp, dtype=torch.float64), gamma).item()
        assert math.isfinite(got)
        assert got == pytest.approx(ref, rel=2e-6, abs=1e-30), f"log p = {lp}"


@pytest.mark.parametrize("gamma,beta", [(0.0, 1.0), (3.0, 0.8), (0.5, 1.5), (1.0, 0.5)])
def test_header_finalize_matches_reference(harness, gamma, beta):
    torch.manual_seed(3)
    n, v = 12, 50
    z = torch.randn(n, v, dtype=torch.float64) * 3
    labels = torch.randint(0, v, (n,))
    labels[1], labels[2], labels[3] = -100, v, -7  # ignored, too large, negative
    z[4, labels[4]] = z[4].max() + 40  # p = 1 in fp32
    m = z.amax(1)
    t = labels.clamp(0, v - 1)
    stats = torch.stack(
        [
            m,
            (z - m[:, None]).exp().sum(1),
            ((z - m[:, None]) / beta).exp().sum(1),
            z.gather(1, t[:, None]).squeeze(1),
        ],
        1,
    ).float()
    ref = finalize_stats(stats.double(), labels, gamma, beta, -100, v)
    for i in range(n):
        out = torch.empty(6, dtype=torch.float32)
        s = stats[i].tolist()
        harness.tofu_finalize_row(*s, int(labels[i]), -100, v, gamma, beta, _ptr(out))
        expect = torch.tensor(
            [ref.loss[i], ref.ce[i], ref.g[i], ref.m[i], ref.log_sb[i], ref.qt_m1[i]]
        )
        torch.testing.assert_close(
            out.double(), expect.double(), rtol=2e-5, atol=2e-6, equal_nan=True
        )


@pytest.mark.parametrize("beta", [0.5, 1.0, 1.7])
def test_header_grad_row(harness, beta):
    z = torch.randn(300, dtype=torch.float32) * 3
    t, coef = 17, 0.37
    zd = z.double()
    m = zd.max()
    log_sb = torch.log(((zd - m) / beta).exp().sum())
    q = torch.softmax(zd / beta, 0)
    qt_m1 = torch.expm1((zd[t] - m) / beta - log_sb)
    out = torch.empty(300, dtype=torch.float32)
    harness.tofu_grad_row(
        _ptr(z), 300, t, coef, float(m), float(log_sb), float(qt_m1), beta, _ptr(out)
    )
    expect = coef * (q - torch.nn.functional.one_hot(torch.tensor(t), 300).double())
    torch.testing.assert_close(out.double(), expect, rtol=2e-5, atol=1e-7 * coef)
