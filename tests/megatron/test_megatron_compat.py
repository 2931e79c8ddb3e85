"""The patch on megatron-core 0.16 (the oldest supported), next to the pinned 0.19.2.

`make test` installs megatron-core 0.16.0 into .venv/megatron-core-0.16.0; the tiny
TP=2 GPTModel (and BERT / T5) tests of test_megatron_patch.py then run again with it first on the path.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.checkout import ROOT

MCORE_016 = Path(sys.prefix) / "megatron-core-0.16.0"


@pytest.mark.slow
@pytest.mark.skipif(not MCORE_016.is_dir(), reason="make test installs megatron-core 0.16.0 there")
def test_patch_on_megatron_core_0_16():
    env = {**os.environ, "PYTHONPATH": str(MCORE_016)}
    ver = subprocess.run(
        [sys.executable, "-c", "import megatron.core as m; print(m.__version__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert ver.stdout.strip() == "0.16.0", ver.stdout + ver.stderr[-2000:]
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/megatron/test_megatron_patch.py::test_tiny_gpt_tp2",
            "tests/megatron/test_megatron_patch.py::test_apply_twice_and_revert_restore_the_original_object",
            "tests/megatron/test_megatron_patch.py::test_cross_entropy_leaves_megatron_untouched",
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0 and "5 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
