"""The compiled CUDA extension ``tofu_kernels._C``: whether it loaded, and why not.

Importing ``_C`` registers the CUDA kernels of the ops :mod:`tofu_kernels.backends.gpu`
defines (and carries the launch constants of ``csrc/tofu_kernels.h``). It can load without a
GPU; where it was not built (no nvcc, a CPU-only torch, pip's isolated build) the CUDA backend
is unavailable and :func:`extension_status` says why and what to run.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path

import torch  # noqa: F401  (loads libtorch and libc10, which _C links against, before _C)

try:
    from . import _C as EXTENSION
except ImportError as e:  # not built (no nvcc / CPU-only torch)
    EXTENSION, EXTENSION_ERROR = None, e
else:
    EXTENSION_ERROR = None

__all__ = ["EXTENSION", "extension_loaded", "extension_status"]


def extension_loaded() -> bool:
    """True when the compiled CUDA extension imported (it can load without a GPU).
    :func:`extension_status` says from which file, or why not."""
    return EXTENSION is not None


def extension_status() -> str:
    """One line: the compiled extension's file, or why it did not load. The reasons: the
    import error; what the build of the imported package recorded (e.g. pip's isolated
    build, where torch is not importable, skips it; the record says what to run); and, loaded
    or not, whether this ``tofu_kernels`` is a source checkout that shadows an installed
    package (Python run from the checkout's root imports its folder first)."""
    pkg = Path(os.path.realpath(__file__)).parent
    shadowed = _shadowed_installs(pkg)
    if EXTENSION is not None:
        notes = [f"loaded: {EXTENSION.__file__}"]
        if shadowed:
            notes.append(f"tofu_kernels imported from {pkg}")
    else:
        notes = [f"not loaded ({type(EXTENSION_ERROR).__name__}: {EXTENSION_ERROR})",
                 f"tofu_kernels imported from {pkg}"]
        info = pkg / "_build_info.json"
        if info.is_file():
            rec = json.loads(info.read_text())
            if rec.get("cuda_extension") != "built":
                notes.append(f"its build did not build the extension: {rec.get('reason')}")
    for installed in shadowed:
        has = "has its" if any(installed.glob("_C.*")) else "has no"
        notes.append(f"this source checkout shadows the installed package in {installed.parent}, which {has} "
                     "compiled extension (Python puts the current directory first): run from another directory "
                     "to use that package")
    return "; ".join(notes)


def _shadowed_installs(pkg: Path) -> list[Path]:
    """The installed tofu_kernels folders that ``pkg``, a source checkout's package, hides.

    Every tofu-kernels distribution is looked at, not the first found: a checkout's root may
    hold its own metadata (an egg-info), found first when Python runs from there. An
    editable install of the checkout points at no folder of its own and hides nothing.
    """
    if not (pkg.parent / "setup.py").is_file():  # not a source checkout
        return []
    found = []
    for dist in metadata.distributions(name="tofu-kernels"):
        try:
            installed = Path(os.path.realpath(dist.locate_file("tofu_kernels")))
        except TypeError:  # a distribution without a location
            continue
        if installed != pkg and installed.is_dir() and installed not in found:
            found.append(installed)
    return found
