"""The benchmark harness runs end to end in CPU smoke mode and writes its table."""

import argparse
import re
import sys
from pathlib import Path

import pytest

from tests.support.checkout import ROOT, load_script


@pytest.mark.slow
def test_bench_cpu_smoke(tmp_path):
    """make bench's CPU mode: table, JSON and plot, every implementation ran."""
    import subprocess

    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_loss.py"),
            "--cpu-smoke",
            "--tokens",
            "4",
            "--vocab",
            "96",
            "--reps",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    md = (tmp_path / "bench_loss.md").read_text()
    assert "NOT a performance result" in md and "CPU (no GPU)" in md
    rows = [line for line in md.splitlines() if line.startswith("| 4 | 96 |")]
    names = {r.split("|")[4].strip() for r in rows}
    assert {
        "ours-torch TOFU",
        "ours-triton TOFU",
        "authors TOFU (PyTorch)",
        "Megatron vocab_parallel_cross_entropy",
        "Megatron fused CE",
    } <= names
    assert not any("Error" in r or "out of memory" in r for r in rows), rows
    assert (tmp_path / "bench_loss.png").stat().st_size > 10_000
    assert "[1/1" in res.stdout  # progress line per configuration


def _bench():
    """benchmarks/bench_loss.py as a module."""
    return load_script("benchmarks/bench_loss.py")


@pytest.mark.parametrize(
    "fwd, both, shown",
    [
        ((1.0, 0.9, 1.1), (3.0, 2.9, 3.1), "2.000 (derived)"),  # clearly apart: the difference
        (
            (2.0, 1.9, 2.1),
            (1.8, 1.7, 1.9),
            "n/a (medians cross)",
        ),  # would be negative (was "0.000")
        ((1.0, 0.8, 1.4), (1.2, 1.1, 1.5), "n/a (within the timing noise)"),  # spreads overlap
    ],
)
def test_bench_derived_backward_only_where_it_means_something(fwd, both, shown):
    """A backward that cannot be replayed alone is reported as fwd+bwd minus fwd only where
    fwd+bwd is measurably slower than fwd; else the table says why it has no number."""
    import torch

    bench = _bench()

    class Once(torch.autograd.Function):  # a backward that consumes what it saved, as Megatron's CE
        @staticmethod
        def forward(ctx, x):
            ctx.used = False
            return x.sum()

        @staticmethod
        def backward(ctx, g):
            if ctx.used:
                raise RuntimeError("backward replayed")
            ctx.used = True
            return g.expand(2, 8)

    times = iter([fwd, both])

    def tbench(fn, grad_to_none=None):  # runs fn as a timer does (warm-up, then timed), times given
        fn()
        fn()
        return next(times)

    impl = bench.Impl("once", lambda x, y: Once.apply(x), "baseline", "ce")
    row = bench.bench_one(impl, 2, 8, torch.float32, "cpu", tbench)
    assert row.error == "" and row.both == both, row
    md = bench.to_markdown([row], 10.0, "cpu", argparse.Namespace(gamma=3.0, beta=0.8), [], [])
    cells = [
        c.strip()
        for c in next(line for line in md.splitlines() if line.startswith("| 2 | 8 |")).split("|")
    ]
    assert cells[5:8] == [bench.fmt_ms(fwd), shown, bench.fmt_ms(both)], cells


def test_bench_speedup_is_over_our_default_path():
    """A baseline's speedup compares it with our fastest backend on the default path (mean,
    gradient in the forward), not with the two-pass or vocab_parallel rows, which take
    another path (per-token losses, summed) even where they measured faster."""
    bench = _bench()

    def row(name, kind, mode, ms):
        return bench.Row(bench.Impl(name, None, kind, mode), 64, 512, "bf16", both=(ms, ms, ms))

    rows = [
        row("ours-torch TOFU", "ours", "tofu", 2.0),
        row("ours-triton TOFU", "ours", "tofu", 4.0),
        row("ours-torch TOFU two-pass", "ours", "tofu", 1.5),
        row("ours-torch TOFU vocab_parallel (tp=1)", "ours", "tofu", 1.0),
        row("ours-torch CE", "ours", "ce", 0.5),
        row("authors TOFU (PyTorch)", "baseline", "tofu", 8.0),
        row("torch F.cross_entropy (fp32 upcast)", "baseline", "ce", 1.0),
    ]
    bench.add_speedups(rows)
    assert [r.speedup for r in rows if r.impl.kind == "baseline"] == [
        "4.00x (ours-torch TOFU)",
        "2.00x (ours-torch CE)",
    ]
    assert all(r.speedup == "" for r in rows if r.impl.kind == "ours")


GPU_CHECK = ROOT / "tools" / "gpu" / "gpu_check.sh"
# in the order of the run: what a user meets first and is least proven first
STEPS = (
    "build",
    "gpu_tests",
    "fused_linear",
    "megatron_step",
    "sft_step",
    "qlora",
    "bench",
    "megatron_lm",
)
GPU_ONLY = ("qlora", "megatron_lm")  # skipped in the smoke mode, with the reason


def _gpu_check(*args, timeout=600):
    import os
    import subprocess

    return subprocess.run(
        ["bash", str(GPU_CHECK), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable},
    )


@pytest.mark.slow
def test_gpu_check_script_cpu_smoke(tmp_path):
    """tools/gpu/gpu_check.sh --cpu-smoke: the GPU run's command path, tiny, no GPU. Every step
    that can run here passes, in the run's order; the gpu tests are collected and skip with
    their reason; the steps that need a GPU say so; the sizes of what a run copies to a node
    are printed; one archive holds the results folder."""
    import tarfile

    out, pack = tmp_path / "out", tmp_path / "packed" / "gpu_check.tar.gz"
    res = _gpu_check("--cpu-smoke", "--out", str(out), "--pack", str(pack), timeout=300)
    summary = (out / "summary.txt").read_text()
    assert res.returncode == 0, summary + res.stderr[-2000:]
    assert "failed: none; cut by the budget: none" in summary
    ran = [s for s in STEPS if s not in GPU_ONLY]
    for step in ran:
        assert f"OK {step}" in summary, step
    assert [summary.index(f"START {s} ") for s in ran] == sorted(
        summary.index(f"START {s} ") for s in ran
    )
    for step in GPU_ONLY:
        assert f"SKIP {step}: needs a GPU (" in summary and f"START {step}" not in summary
    # the gpu tests: collected (hundreds), none run here, none failed or errored at collection
    skipped = re.search(r"^(\d+) skipped, (\d+) deselected in", summary, re.M)
    assert skipped and int(skipped[1]) > 100, summary
    assert "needs a CUDA GPU; run by tools/gpu/gpu_check.sh" in (out / "gpu_tests.log").read_text()
    # the sizes: the checkout and the two planned runs (no limit given: sizes only)
    checkout = re.search(r"^carry: checkout ([\d.]+) MiB", summary, re.M)
    assert checkout and 0.1 < float(checkout[1]) < 64, summary
    for plan in ("run 1 (default)", "QLoRA run"):
        m = re.search(
            rf"^carry: {re.escape(plan)} = checkout .*: ([\d.]+) MiB"
            r"( \(not here: [^)]*\))?$",
            summary,
            re.M,
        )
        assert m and float(m[1]) >= float(checkout[1]), (plan, summary)
    assert "packages: triton " in summary and "CUDA extension loaded:" in summary
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        [
            "summary.txt",
            *[f"{step}.log" for step in ran],
            "bench_megatron_step.md",
            "bench_fused_linear.md",
            "bench_fused_linear.json",
            "bench_sft_step.md",
            "bench_sft_step.json",
            "bench_loss.md",
            "bench_loss.png",
            "bench_loss.json",
        ]
    )
    fused = (out / "bench_fused_linear.md").read_text()
    assert "| composed TOFU (torch stand-in) |" in fused and "| ours fused TOFU |" in fused
    sft = (out / "bench_sft_step.md").read_text()
    assert "| TOFUSFTTrainer |" in sft and "| SFTTrainer + tofu_loss_func |" in sft
    # one archive, to bring back, with every file of the folder
    m = re.search(r"packed (\d+) files of .* into (\S+) \((\d+) KiB\)", summary)
    assert m and Path(m[2]) == pack and int(m[1]) == len(files), summary
    with tarfile.open(pack) as tar:
        assert sorted(Path(n).name for n in tar.getnames() if tar.getmember(n).isfile()) == files
    assert int(re.search(r"done in (\d+)s", summary)[1]) < 240  # 45-95 s on this 2-core machine


@pytest.mark.slow
def test_gpu_check_options(tmp_path):
    """The script's options: documented by --help, refused when unknown, and obeyed: a step the
    budget left cannot fit is skipped with the reason (exit 3: cut, none failed) while a later
    one that fits still runs; --skip and --only leave steps out without failing."""
    res = _gpu_check("--help", timeout=30)
    assert res.returncode == 0
    for option in (
        "--out DIR",
        "--budget SECONDS",
        "--skip",
        "--only",
        "--pack FILE",
        "--bench-args",
        "--cpu-smoke",
        ".whl/base/",
        ".whl/hf/",
        ".whl/qlora/",
        *STEPS,
    ):
        assert option in res.stdout, option
    for bad in (
        ["--frobnicate"],
        ["--skip", "lunch"],
        ["--only", "lunch"],
        ["--budget", "ten"],
        ["--pack", "results.zip"],
    ):
        res = _gpu_check(*bad, timeout=30)
        assert res.returncode == 2 and "gpu_check.sh:" in res.stderr, (bad, res.stderr)
    out = tmp_path / "spent"
    res = _gpu_check(
        "--cpu-smoke", "--out", str(out), "--budget", "0", "--skip", "bench", timeout=120
    )
    summary = (out / "summary.txt").read_text()
    assert res.returncode == 3, summary
    for step in ("build", "gpu_tests", "fused_linear", "megatron_step", "sft_step"):
        assert f"SKIP {step}: time budget: 0s left, it needs at least" in summary, step
    assert "SKIP bench: --skip" in summary and "START" not in summary
    assert (
        "failed: none; cut by the budget: build gpu_tests fused_linear megatron_step sft_step"
        in summary
    )
    # 85 s less the 10 s kept for the archive and the set-up (~5 s): gpu_tests (needs 90) is cut,
    # fused_linear (needs 45) runs
    out = tmp_path / "tight"
    res = _gpu_check(
        "--cpu-smoke",
        "--out",
        str(out),
        "--budget",
        "85",
        "--only",
        "gpu_tests fused_linear",
        timeout=120,
    )
    summary = (out / "summary.txt").read_text()
    assert res.returncode == 3, summary
    assert re.search(r"SKIP gpu_tests: time budget: \d+s left, it needs at least 90s", summary), (
        summary
    )
    assert "OK fused_linear" in summary and "SKIP build: not in --only" in summary
    assert re.search(r"START fused_linear \(limit (\d+)s\)", summary)[1] in {
        str(t) for t in range(45, 76)
    }


def test_carry_size_counts_each_wheel_group(tmp_path):
    """tools/gpu/carry_size.sh on a tree without git (as a copy without .git on a node): the
    tree without .whl, each group's size, the planned runs; with --limit 64 a plan over 64 MiB
    flagged, without a limit sizes only; a bad --limit refused."""
    import shutil
    import subprocess

    (tmp_path / "tools" / "gpu").mkdir(parents=True)
    shutil.copy(ROOT / "tools" / "gpu" / "carry_size.sh", tmp_path / "tools" / "gpu")
    (tmp_path / "src.py").write_bytes(b"x" * (1 << 20))
    for group, mib in (("base", 3), ("hf", 16), ("qlora", 50)):
        (tmp_path / ".whl" / group).mkdir(parents=True)
        with open(tmp_path / ".whl" / group / f"{group}-1.0-py3-none-any.whl", "wb") as f:
            f.truncate(mib << 20)  # sparse: du -b counts the apparent size, as the transfer does

    def carry_size(*args):
        return subprocess.run(
            ["bash", str(tmp_path / "tools" / "gpu" / "carry_size.sh"), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )

    res = carry_size("--limit", "64")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    assert (
        lines[0].startswith("carry: checkout 1.0 MiB (du of the tree")
        and "; .whl/base 3.0 MiB" in lines[0]
    )
    assert "; .whl/hf 16.0 MiB" in lines[0] and "; .whl/qlora 50.0 MiB" in lines[0]
    assert lines[1] == (
        "carry: run 1 (default) = checkout + .whl/base .whl/hf: 20.0 MiB of 64 MiB "
        "(not here: .whl/megatron-lm-core_v0.19.0)"
    )
    assert (
        lines[2]
        == "carry: QLoRA run = checkout + .whl/hf .whl/qlora: 67.0 MiB of 64 MiB (OVER THE LIMIT)"
    )
    assert lines[3].startswith(
        "carry: everything in one run = checkout + .whl/base .whl/hf .whl/qlora: 70.0 MiB"
    )
    # no limit: the same lines, sizes only
    res = carry_size()
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        lines[0],
        "carry: run 1 (default) = checkout + .whl/base .whl/hf: 20.0 MiB "
        "(not here: .whl/megatron-lm-core_v0.19.0)",
        "carry: QLoRA run = checkout + .whl/hf .whl/qlora: 67.0 MiB",
        "carry: everything in one run = checkout + .whl/base .whl/hf .whl/qlora: 70.0 MiB "
        "(not here: .whl/megatron-lm-core_v0.19.0)",
    ]
    for bad in (["--limit", "lots"], ["--frobnicate"]):
        res = carry_size(*bad)
        assert res.returncode == 2 and "carry_size.sh:" in res.stderr, (bad, res.stderr)


def test_bench_fused_linear_cpu_smoke(tmp_path):
    """bench_fused_linear.py's CPU mode: every implementation ran, the table is written."""
    import subprocess

    res = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "bench_fused_linear.py"),
            "--cpu-smoke",
            "--reps",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    md = (tmp_path / "bench_fused_linear.md").read_text()
    assert "NOT a performance result" in md and "CPU (no GPU)" in md
    rows = [
        [c.strip() for c in line.split("|")[1:-1]]
        for line in md.splitlines()
        if line.startswith("| ") and "---" not in line and "implementation" not in line
    ]
    names = {r[0] for r in rows}
    assert {
        "ours fused TOFU",
        "ours fused TOFU (every row)",
        "ours fused TOFU [chunk 16]",
        "ours fused CE",
        "matmul + ours TOFU",
        "matmul + authors TOFU",
        "matmul + torch CE (fp32)",
        "composed TOFU (torch stand-in)",
    } <= names
    assert "Error" not in md
    assert (
        "[8/8 V=300 prompt 50%" in res.stdout
    )  # progress line per implementation, vocabulary and prompt share
    for prompt in ("0%", "50%"):  # the default prompt fractions, each a set of rows
        # the loss column: every TOFU row (bf16, same inputs) within bf16 noise of ours, CE rows alike
        loss = {r[0]: float(r[6]) for r in rows if r[1] == prompt}
        for name in (
            "ours fused TOFU (every row)",
            "matmul + ours TOFU",
            "matmul + authors TOFU",
            "composed TOFU (torch stand-in)",
        ):
            assert abs(loss[name] - loss["ours fused TOFU"]) < 1e-2 * loss["ours fused TOFU"], (
                prompt,
                name,
                loss,
            )
        assert (
            abs(loss["matmul + torch CE (fp32)"] - loss["ours fused CE"])
            < 1e-2 * loss["ours fused CE"]
        ), loss
        assert (
            abs(loss["ours fused CE"] - loss["ours fused TOFU"]) > 1e-2 * loss["ours fused CE"]
        )  # different
        ratio = {
            r[0]: r[3] for r in rows if r[1] == prompt
        }  # ours over every row, measured in the same run
        assert (
            ratio["ours fused TOFU (every row)"] == "1.00" and float(ratio["ours fused TOFU"]) > 0
        ), ratio
    assert "composed TOFU (Liger FLCE) (needs Liger on a GPU)" in md
    assert "## V = 300" in md and md.count("## V = ") == 1


def test_megatron_log_parser():
    """megatron_lm_check reads Megatron 0.19's log lines (formats of megatron/training/training.py)."""
    m = load_script("tools/gpu/megatron_lm_check.py")

    log = "\n".join(
        [
            "megatron_patch: --loss-type tofu (gamma=3.0, beta=0.8, backend=auto): LanguageModule...",
            " [2026-11-27 08:00:00.000000] iteration        1/      25 | consumed samples:            1 | "
            "elapsed time per iteration (ms): 1234.5 | learning rate: 1.000000E-04 | global batch size:     1 | "
            "lm loss: 9.123457E+00 | lm cross entropy: 1.181234E+01 | loss scale: 1.0 | grad norm: 2.345 | "
            "number of skipped iterations:   0 | number of nan iterations:   0 |",
            "[Rank 0] (after 1 iterations) memory (MB) | allocated: 7000.25 | max allocated: 21000.50 | "
            "reserved: 22000.00 | max reserved: 22000.00",
            " iteration        2/      25 | consumed samples:            2 | elapsed time per iteration (ms): 98.7 | "
            "lm loss: 9.0E+00 | lm cross entropy: 1.17E+01 | loss scale: 1.0 |",
            " validation loss at iteration 25 on validation set | lm loss value: 8.500000E+00 | lm loss PPL: "
            "4.914769E+03 | lm cross entropy value: 1.100000E+01 | lm cross entropy PPL: 5.987414E+04 | ",
        ]
    )
    r = m.parse_log(log)
    assert [i["iter"] for i in r["iters"]] == [1, 2]
    assert r["iters"][0] == {
        "iter": 1,
        "ms": 1234.5,
        "lm loss": 9.123457,
        "lm cross entropy": 11.81234,
    }
    assert r["iters"][1]["ms"] == 98.7 and r["peak_mb"] == 21000.5
    assert r["validation"] == {"lm loss": 8.5, "lm cross entropy": 11.0}
    assert r["applied"].startswith("megatron_patch: --loss-type tofu") and not r["cuda_stop"]
