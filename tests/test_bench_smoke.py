"""The benchmark harness runs end to end in CPU smoke mode and writes its table."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_cpu_smoke(tmp_path):
    """make bench's CPU mode: table, JSON and plot, every implementation ran."""
    import subprocess

    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_loss.py"), "--cpu-smoke", "--tokens", "4",
         "--vocab", "96", "--reps", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    md = (tmp_path / "bench_loss.md").read_text()
    assert "NOT a performance result" in md and "CPU (no GPU)" in md
    rows = [line for line in md.splitlines() if line.startswith("| 4 | 96 |")]
    names = {r.split("|")[4].strip() for r in rows}
    assert {"ours-torch TOFU", "ours-triton TOFU", "authors TOFU (PyTorch)",
            "Megatron vocab_parallel_cross_entropy", "Megatron fused CE"} <= names
    assert not any("Error" in r or "out of memory" in r for r in rows), rows
    assert (tmp_path / "bench_loss.png").stat().st_size > 10_000
    assert "[1/1" in res.stdout  # progress line per configuration


GPU_CHECK = ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ("build", "gpu_tests", "megatron_lm", "megatron_step", "fused_linear", "sft_step", "bench")


def _gpu_check(*args, timeout=600):
    import os
    import subprocess

    return subprocess.run(["bash", str(GPU_CHECK), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHON": sys.executable})


def test_gpu_check_script_cpu_smoke(tmp_path):
    """benchmarks/gpu_check.sh --cpu-smoke: every step of the GPU run, tiny, no GPU."""
    out = tmp_path / "out"
    res = _gpu_check("--cpu-smoke", "--out", str(out))
    summary = (out / "summary.txt").read_text()
    assert res.returncode == 0, summary + res.stderr[-2000:]
    assert "failed: none" in summary
    for step in STEPS:
        assert f"OK {step}" in summary
    files = sorted(p.name for p in out.iterdir())
    logs = [f"{step}.log" for step in STEPS]
    assert files == sorted(["summary.txt", *logs, "megatron_lm.md", "bench_megatron_step.md", "bench_fused_linear.md",
                            "bench_fused_linear.json", "bench_sft_step.md", "bench_sft_step.json", "bench_loss.md",
                            "bench_loss.png", "bench_loss.json"])
    sft = (out / "bench_sft_step.md").read_text()
    assert "| TOFUSFTTrainer |" in sft and "| SFTTrainer + tofu_loss_func |" in sft
    megatron_lm = (out / "megatron_lm.md").read_text()
    from .megatron_lm import FIXTURE

    if FIXTURE is None:  # a clone without the project's shared fixtures: said, not faked
        assert "not run" in megatron_lm and "was not found" in megatron_lm
    else:
        assert "Result: OK" in megatron_lm and "LanguageModule.compute_language_model_loss is TOFU" in megatron_lm


def test_gpu_check_options(tmp_path):
    """The script's options: documented by --help, refused when unknown, and obeyed: a
    budget spent before a step skips it (and the run fails), --skip skips without failing."""
    res = _gpu_check("--help", timeout=30)
    assert res.returncode == 0
    for option in ("--out DIR", "--budget SECONDS", "--skip", "--bench-args", "--cpu-smoke", *STEPS):
        assert option in res.stdout, option
    for bad in (["--frobnicate"], ["--skip", "lunch"], ["--budget", "ten"]):
        res = _gpu_check(*bad, timeout=30)
        assert res.returncode == 2 and "gpu_check.sh:" in res.stderr, (bad, res.stderr)
    out = tmp_path / "spent"
    res = _gpu_check("--cpu-smoke", "--out", str(out), "--budget", "0", "--skip", "bench", timeout=120)
    summary = (out / "summary.txt").read_text()
    assert res.returncode == 1, summary
    for step in STEPS[:-1]:
        assert f"SKIP {step}: time budget spent" in summary
    assert "SKIP bench: --skip" in summary and "START" not in summary


def test_bench_fused_linear_cpu_smoke(tmp_path):
    """bench_fused_linear.py's CPU mode: every implementation ran, the table is written."""
    import subprocess

    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_fused_linear.py"), "--cpu-smoke",
                          "--reps", "2", "--out", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    md = (tmp_path / "bench_fused_linear.md").read_text()
    assert "NOT a performance result" in md and "CPU (no GPU)" in md
    names = {line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ") and "---" not in line}
    assert {"ours fused TOFU", "ours fused TOFU [chunk 16]", "ours fused CE", "matmul + ours TOFU",
            "matmul + authors TOFU", "matmul + torch CE (fp32)"} <= names
    assert "Error" not in md
    assert "[6/6 V=300" in res.stdout  # progress line per implementation and vocabulary
    assert "## V = 300" in md and md.count("## V = ") == 1


def test_megatron_log_parser():
    """megatron_lm_check reads Megatron 0.19's log lines (formats of megatron/training/training.py)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import megatron_lm_check as m

    log = "\n".join([
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
    ])
    r = m.parse_log(log)
    assert [i["iter"] for i in r["iters"]] == [1, 2]
    assert r["iters"][0] == {"iter": 1, "ms": 1234.5, "lm loss": 9.123457, "lm cross entropy": 11.81234}
    assert r["iters"][1]["ms"] == 98.7 and r["peak_mb"] == 21000.5
    assert r["validation"] == {"lm loss": 8.5, "lm cross entropy": 11.0}
    assert r["applied"].startswith("megatron_patch: --loss-type tofu") and not r["cuda_stop"]
