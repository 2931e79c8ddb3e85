"""The ``--no-deps`` side folders ``make test`` installs beside the venv's packages.

Frameworks too heavy to install whole (DeepSpeed, and the like) go into
``<venv>/<name>-<version>``; a test that needs one puts it on its own path (or on its
subprocesses' ``PYTHONPATH``) and is skipped, with the command that installs it, where the
folder is missing (a venv not made by ``make test``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

DEEPSPEED = "deepspeed-0.19.8"
AXOLOTL = "axolotl-0.21.0"
TORCHTITAN = "torchtitan-0.3.0"


def side_folder(name: str) -> Path:
    """``<venv>/<name>``, or skip the test saying how to make it."""
    path = Path(sys.prefix) / name
    if not path.is_dir():
        pytest.skip(
            f"{name} not installed beside the venv (make test installs it: see the Makefile's venv target)"
        )
    return path


def with_side_folder(name: str, env: dict) -> dict:
    """``env`` (a subprocess's environment) with ``<venv>/<name>`` first on ``PYTHONPATH``."""
    return {
        **env,
        "PYTHONPATH": os.pathsep.join([str(side_folder(name)), env.get("PYTHONPATH", "")]),
    }
