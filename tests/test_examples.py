"""The README's torchrun example runs as documented (2 CPU ranks, gloo)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_vocab_parallel_example_torchrun():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "examples" / "vocab_parallel.py"), "--vocab", "4000"],
        capture_output=True, text=True, timeout=300, env=env, cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("rank ")]
    assert len(lines) == 2, out.stdout
    assert lines[0].split("(")[0].split(":")[1] == lines[1].split("(")[0].split(":")[1]  # same loss


def test_hf_sft_example_runs_as_written():
    """The README's Hugging Face / TRL example: the three ways train with TOFU (loss falls),
    TOFUSFTTrainer first, with TRL's token accuracy logged."""
    import pytest

    pytest.importorskip("trl")
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_sft.py")], capture_output=True, text=True,
                         timeout=600, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if "TOFU loss" in line]
    assert len(lines) == 3 and lines[0].startswith("TOFUSFTTrainer:") and "token accuracy" in lines[0], \
        out.stdout[-2000:]
    for line in lines:
        first, last = (float(x) for x in line.split("TOFU loss ")[1].split(" over")[0].split(" -> "))
        assert last < 0.8 * first, line
