"""A shortened `make demo` end to end: pretrain, two SFT runs (CE, TOFU), table and plot."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is installed by make test")

ROOT = Path(__file__).resolve().parent.parent


def test_demo_short_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "examples" / "diversity_demo.py"), "--pretrain-iters", "10", "--sft-iters", "6",
         "--eval-interval", "3", "--log-interval", "5", "--samples", "3", "--prompts-per-category", "1",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    text = (tmp_path / "demo_results.md").read_text()
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows == ["model", "pre-SFT", "SFT cross_entropy", "SFT tofu"]
    assert "Diversity: TOFU" in text and "Forgetting:" in text and "Quality:" in text
    assert (tmp_path / "demo_curves.png").stat().st_size > 10_000
    assert "[sft tofu] eval @ 6" in out.stdout and "[pretrain] iter" in out.stdout  # progress
