"""The static GPU check of the CUDA kernels (docs/design.md section 3, tools/static_check):
csrc/tofu_kernels.cu compiled for sm_80, sm_90 and sm_100 with the extension's flags, every
template instance's SASS and PTX held against the budgets; the CUDA ops on fake CUDA
tensors; and a deliberately broken kernel, which must fail."""

from __future__ import annotations

import pytest

from tests.support.checkout import ROOT
from tests.support.static_check import (
    assert_docs_section_current,
    by_rule,
    need_nvcc,
    run_check,
    run_fake_cuda,
)
from tools.static_check import check

ARCHS = (80, 90, 100)
KERNELS = {
    "row_stats_kernel",
    "epilogue_kernel",
    "grad_kernel",
    "count_kernel",
    "grad_in_forward_kernel",
    "reduce_kernel",
    "rescale_kernel",
}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    need_nvcc()
    rc, out, res = run_check(tmp_path_factory.mktemp("cuda"), "--backend", "cuda")
    assert res, out
    res["exit"], res["output"] = rc, out
    return res


def test_the_extension_compiles_for_every_target(result):
    assert not result["errors"], result["errors"]
    for arch in ARCHS:
        names = {r["kernel"] for r in result["reports"] if r["arch"] == arch}
        assert names == KERNELS, (arch, names)


@pytest.mark.parametrize("rule", [r for r in check.RULES])
def test_budget(result, rule):
    assert not by_rule(result, rule, "cuda"), "\n".join(by_rule(result, rule, "cuda"))


def test_the_check_passes(result):
    assert result["exit"] == 0, result["output"][-4000:]


def test_the_streaming_loops_are_what_the_design_counts(result):
    """The aligned bf16 instances: 128-bit loads and stores in every streaming loop, at most
    2 + 2/8 exponentials per element in the statistics loops, 1 in the gradient's."""
    reps = [
        r
        for r in result["reports"]
        if r["arch"] == 90 and r["aligned"] and "__nv_bfloat16" in r["spec"]
    ]
    stats = [
        g
        for r in reps
        if r["kernel"] == "row_stats_kernel" and not r["beta_one"]
        for g in r["regions"]
    ]
    grad = [g for r in reps if r["kernel"] == "grad_kernel" for g in r["regions"]]
    assert stats and grad
    assert all(
        {int(b) for b in g["loads"]} == {128} and 2.0 <= g["ex2_per_element"] <= 2.25 for g in stats
    ), stats
    assert all(
        {int(b) for b in g["stores"]} == {128} and g["ex2_per_element"] <= 1.0 for g in grad
    ), grad
    assert any(g["ex2_per_element"] == 1.0 for g in grad)


def test_docs_table_is_current(result):
    assert_docs_section_current(result, "cuda")


def test_a_broken_kernel_fails(tmp_path):
    """A copy of csrc/tofu_kernels.cu whose 16-byte store is made element by element: the check
    must fail on 128-bit stores of the gradient (grad, grad_in_forward, rescale), and on
    nothing else."""
    need_nvcc()
    src = (ROOT / "csrc" / "tofu_kernels.cu").read_text()
    good = "__stwb(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));"
    assert src.count(good) == 1, "the mutation's target moved: update this test"
    broken = src.replace(good, "for (int k = 0; k < Vec<T>::N; ++k) p[k] = from_float<T>(in[k]);")
    path = tmp_path / "tofu_kernels.cu"
    path.write_text(broken)
    for header in ("tofu_kernels.h", "tofu_math.cuh"):
        (tmp_path / header).write_text((ROOT / "csrc" / header).read_text())
    rc, out, res = run_check(
        tmp_path, "--backend", "cuda", "--arch", "90", "--cuda-source", str(path)
    )
    assert rc == 1, out
    bad = res["violations"]
    assert bad and all(
        v.startswith("128-bit: cuda sm_90 ") and "store(s) of the gradient" in v for v in bad
    ), bad
    assert {v.split()[3] for v in bad} == {
        "grad_kernel",
        "grad_in_forward_kernel",
        "rescale_kernel",
    }


def test_ops_on_fake_cuda_tensors():
    """The CUDA backend's ops on fake CUDA tensors (an sm_90 device): traced forward and backward
    (make_fx) and compiled with fullgraph=True (eager, aot_eager)."""
    import tofu_kernels as tk

    if not tk.extension_loaded():
        pytest.skip(f"the CUDA extension is not built: {tk.extension_status()}")
    recs = [r for r in run_fake_cuda() if r["backend"] == "cuda"]
    failed = [r for r in recs if not r["ok"]]
    assert not failed, failed
    ops = {(r["scenario"], r["how"]): r["ops"] for r in recs}
    assert ops[("mean", "make_fx")] == ["grad_in_forward", "rescale"]
    assert ops[("none", "make_fx")] == ["row_stats", "epilogue", "grad"]
    assert ops[("megatron", "make_fx")] == ["row_stats", "epilogue", "grad_inplace"]
    assert ops[("linear", "make_fx")] == ["grad_in_forward_inplace", "rescale", "rescale"]
    for scenario in ("none", "megatron", "metrics"):
        for how in ("eager", "aot_eager"):
            assert ops[(scenario, how)] == ["row_stats", "epilogue"], (scenario, how)
