"""The static GPU check of the Triton kernels (docs/design.md section 3, tools/static_check):
every launch the entry points make, compiled for sm_80, sm_90 and sm_100 without a GPU; the
SASS and PTX held against the budgets; Inductor's written-tensor analysis against each op's
schema; the ops on fake CUDA tensors; and a deliberately broken kernel, which must fail."""

from __future__ import annotations

import pytest

from tests.support.checkout import ROOT
from tests.support.static_check import (
    assert_docs_section_current,
    by_rule,
    run_check,
    run_fake_cuda,
)
from tools.static_check import check

ARCHS = (80, 90, 100)
KERNELS = {
    "stats_kernel",
    "epilogue_kernel",
    "grad_kernel",
    "count_kernel",
    "grad_in_forward_kernel",
    "reduce_kernel",
    "rescale_kernel",
}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    rc, out, res = run_check(tmp_path_factory.mktemp("triton"), "--backend", "triton")
    assert res, out
    res["exit"], res["output"] = rc, out
    return res


def test_every_launch_compiles_for_every_target(result):
    assert not result["errors"], result["errors"]
    assert result["launches"] > 100
    for arch in ARCHS:
        names = {r["kernel"] for r in result["reports"] if r["arch"] == arch}
        assert names == KERNELS, (arch, names)
    # the cases reach every specialization that matters: each dtype, aligned and unaligned rows
    specs = {
        (r["kernel"], r["spec"].split()[0], r["aligned"])
        for r in result["reports"]
        if r["arch"] == 90
    }
    for dtype in ("bf16", "fp16", "fp32"):
        for aligned in (True, False):
            assert ("stats_kernel", dtype, aligned) in specs, (dtype, aligned)
            assert ("grad_kernel", dtype, aligned) in specs, (dtype, aligned)


@pytest.mark.parametrize("rule", check.RULES)
def test_budget(result, rule):
    assert not by_rule(result, rule, "triton"), "\n".join(by_rule(result, rule, "triton"))


def test_the_check_passes(result):
    assert result["exit"] == 0, result["output"][-4000:]


def test_the_streaming_loops_are_what_the_design_counts(result):
    """Not only within budget: the aligned bf16 statistics loop loads 128 bits at a time and
    spends 2 + 2/8 exponentials per element at most, the gradient 1."""
    reps = [
        r
        for r in result["reports"]
        if r["arch"] == 90 and r["aligned"] and r["spec"].startswith("bf16")
    ]
    stats = [
        g for r in reps if r["kernel"] == "stats_kernel" and not r["beta_one"] for g in r["regions"]
    ]
    grad = [g for r in reps if r["kernel"] == "grad_kernel" for g in r["regions"]]
    assert stats and grad
    assert all(
        {int(b) for b in g["loads"]} == {128} and 2.0 <= g["ex2_per_element"] <= 2.25 for g in stats
    ), stats
    assert all(
        {int(b) for b in g["stores"]} == {128} and g["ex2_per_element"] == 1.0 for g in grad
    ), grad


def test_written_tensors_match_the_schemas(result):
    from tofu_kernels.backends import gpu

    writes = result["writes"]
    assert {w["op"] for w in writes} == set(gpu.OPS)  # every op was analysed
    bad = [w for w in writes if w["written"] != w["schema"]]
    assert not bad, bad
    assert not by_rule(result, "written tensors", "triton")


def test_docs_table_is_current(result):
    assert_docs_section_current(result, "triton")


def test_a_broken_kernel_fails(tmp_path):
    """A copy of the kernels whose gradient store cannot be vectorised (its mask is no longer
    constant over 16 bytes): the check must fail on 128-bit stores, and only there."""
    src = (ROOT / "tofu_kernels" / "backends" / "triton_kernels.py").read_text()
    good = "tl.store(o_row + cols, (coef * q).to(OUT.dtype.element_ty), mask=cols < width)"
    assert src.count(good) == 2, "the mutation's target moved: update this test"
    broken = src.replace(good, good.replace("mask=cols < width", "mask=cols < width - 1"), 1)
    path = tmp_path / "triton_kernels_broken.py"
    path.write_text(broken)
    rc, out, res = run_check(
        tmp_path,
        "--backend",
        "triton",
        "--arch",
        "90",
        "--triton-module",
        str(path),
        "--cases",
        "tofu_loss none bfloat16 16384x16032",
    )
    assert rc == 1, out
    bad = by_rule(res, "128-bit", "triton")
    assert bad and all("grad_kernel" in v and "store(s) of the gradient" in v for v in bad), res[
        "violations"
    ]


def test_ops_on_fake_cuda_tensors():
    """The Triton backend's ops on fake CUDA tensors, as a training step calls them: traced
    forward and backward (make_fx), compiled with fullgraph=True (eager: the registered ops;
    aot_eager: traced into the kernels)."""
    recs = [r for r in run_fake_cuda() if r["backend"] == "triton"]
    failed = [r for r in recs if not r["ok"]]
    assert not failed, failed
    ops = {(r["scenario"], r["how"]): r["ops"] for r in recs}
    assert ops[("mean", "make_fx")] == ["triton_grad_in_forward", "triton_rescale"]
    assert ops[("none", "make_fx")] == ["triton_row_stats", "triton_epilogue", "triton_grad"]
    assert ops[("megatron", "make_fx")] == [
        "triton_row_stats",
        "triton_epilogue",
        "triton_grad_inplace",
    ]
    assert ops[("linear", "make_fx")] == [
        "triton_grad_in_forward_inplace",
        "triton_rescale",
        "triton_rescale",
    ]
    for scenario in ("none", "megatron", "metrics"):
        assert ops[(scenario, "eager")] == ["triton_row_stats", "triton_epilogue"], scenario
        assert ops[(scenario, "aot_eager")] == ["kernel:stats_kernel", "kernel:epilogue_kernel"], (
            scenario
        )
    shapes = {(r["scenario"], r["how"]): r["outputs"] for r in recs}
    assert shapes[("megatron", "make_fx")] == [[2, 32], [2, 32, 1000]]
    assert shapes[("linear", "make_fx")] == [[], [64, 48], [1000, 48]]
