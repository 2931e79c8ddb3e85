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


def test_gpu_check_script_cpu_smoke(tmp_path):
    """benchmarks/gpu_check.sh --cpu-smoke: every step of the GPU run, tiny, no GPU."""
    import os
    import subprocess

    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"],
                         capture_output=True, text=True, timeout=600, env=env)
    summary = (out / "summary.txt").read_text()
    assert res.returncode == 0, summary + res.stderr[-2000:]
    assert "failed: none" in summary
    for step in ("build", "gpu_tests", "sft", "bench"):
        assert f"OK {step}" in summary
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["summary.txt", "env.txt", "build.log", "gpu_tests.log", "sft.log",
                            "bench_loss.md", "bench_loss.png", "bench_loss.json"])
    assert len(files) <= 8  # what the device tool brings back
