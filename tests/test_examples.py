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
