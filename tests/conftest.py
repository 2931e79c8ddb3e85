"""Test setup: Triton's CPU interpreter where there is no GPU, the markers by folder, and
the gpu marker's skip.

TRITON_INTERPRET must be set before triton.jit decorates our kernels, i.e. before
tofu_kernels' Triton backend is imported, so it is set here at collection time.

Layout and markers: tests/README.md. Every test under tests/megatron/ is marked
``megatron``, every test under tests/hf/ ``hf`` and every test under tests/static/ ``static`` here;
a test elsewhere that runs
those frameworks carries the marker itself, as the ``slow`` and ``gpu`` tests do.
"""

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_GPU = torch.cuda.is_available()
HERE = Path(__file__).resolve().parent
FOLDER_MARKERS = {
    "megatron": pytest.mark.megatron,
    "hf": pytest.mark.hf,
    "static": pytest.mark.static,
}


@pytest.hookimpl(tryfirst=True)  # before -m selects by marker
def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run by tools/gpu/gpu_check.sh")
    # the longest files first (static/: a file handed out last keeps the other worker idle)
    items.sort(key=lambda item: Path(item.path).resolve().relative_to(HERE).parts[0] != "static")
    for item in items:
        folder = Path(item.path).resolve().relative_to(HERE).parts[0]
        if folder in FOLDER_MARKERS:
            item.add_marker(FOLDER_MARKERS[folder])
        if not HAS_GPU and "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
