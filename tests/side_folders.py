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


def side_folder(name: str) -> Path:
    """``<venv>/<name>``, or skip the test saying how to make it."""
    path = Path(sys.prefix) / name
    if not path.is_dir():
        pytest.skip(f"{name} not installed beside the venv (make test installs it: see the Makefile's venv target)")
    return path


def on_path(name: str) -> Path:
    """Put ``<venv>/<name>`` first on this process's path and on its children's ``PYTHONPATH``
    (spawned workers inherit ``sys.path``; subprocesses read the environment variable)."""
    path = str(side_folder(name))
    if path not in sys.path:
        sys.path.insert(0, path)
    parts = os.environ.get("PYTHONPATH", "").split(os.pathsep)
    if path not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([path] + [p for p in parts if p])
    return Path(path)
