"""The benchmark harness runs end to end in CPU smoke mode and writes its table."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_loss  # noqa: E402


def test_bench_cpu_smoke(tmp_path, capsys):
    rc = bench_loss.main(["--cpu-smoke", "--tokens", "4", "--vocab", "96", "--reps", "2", "--out", str(tmp_path)])
    assert rc == 0
    md = (tmp_path / "bench_loss.md").read_text()
    assert "NOT a performance result" in md and "CPU (no GPU)" in md
    rows = [line for line in md.splitlines() if line.startswith("| 4 | 96 |")]
    names = {r.split("|")[4].strip() for r in rows}
    assert {"ours-torch TOFU", "ours-triton TOFU", "authors TOFU (PyTorch)"} <= names
    assert not any("error" in r for r in rows)
    assert "[1/1" in capsys.readouterr().out  # progress line per configuration
