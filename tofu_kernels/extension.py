"""The compiled CUDA extension ``tofu_kernels._C``: whether it loaded (it can without a GPU),
why not (:func:`extension_status`), and which cards its kernels run on (:func:`runs_on`, from
``_C.ARCHS``, e.g. "sm_80 sm_90 sm_100 compute_100"). Importing it registers the CUDA kernels
of the ops :mod:`tofu_kernels.backends.gpu` defines."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path

import torch  # noqa: F401  (loads libtorch and libc10, which _C links against, before _C)

try:
    from . import _C as EXTENSION
except ImportError as e:  # not built (no nvcc / CPU-only torch)
    EXTENSION, EXTENSION_ERROR = None, e
else:
    EXTENSION_ERROR = None

__all__ = [
    "EXTENSION",
    "extension_loaded",
    "extension_status",
    "held_archs",
    "runs_on",
    "runs_on_device",
]

# What a build of a given TORCH_CUDA_ARCH_LIST runs: its last step (setup.py's BUILD).
REBUILD = "pip install --no-build-isolation ."
_ARCH = re.compile(r"(sm|compute)_(\d+)(\d)([a-z]?)")


def extension_loaded() -> bool:
    """True when the compiled CUDA extension imported (it can load without a GPU).
    :func:`extension_status` says from which file, or why not."""
    return EXTENSION is not None


def held_archs() -> tuple[str, ...]:
    """The architectures the loaded extension holds, as its build recorded them (``_C.ARCHS``):
    cubins ``sm_XY`` and PTX ``compute_XY``; () where none loaded, or where it was built before
    the build recorded them."""
    return tuple(str(getattr(EXTENSION, "ARCHS", "")).split()) if EXTENSION is not None else ()


def _parse(arch: str) -> tuple[str, tuple[int, int], str] | None:
    """ "sm_86" -> ("sm", (8, 6), ""), "compute_100" -> ("compute", (10, 0), ""), "sm_90a" ->
    ("sm", (9, 0), "a"); None for anything else."""
    found = _ARCH.fullmatch(arch)
    return None if found is None else (found[1], (int(found[2]), int(found[3])), found[4])


def _arch_list(archs: Iterable[str], capability: tuple[int, int]) -> str:
    """A ``TORCH_CUDA_ARCH_LIST`` that builds ``archs`` again plus a cubin for ``capability``."""
    entries: dict[tuple[tuple[int, int], str], bool] = {
        (capability, ""): False
    }  # (version, suffix) -> +PTX
    for parsed in filter(None, map(_parse, archs)):
        kind, version, suffix = parsed
        entries[(version, suffix)] = entries.get((version, suffix), False) or kind == "compute"
    return ";".join(
        f"{major}.{minor}{suffix}{'+PTX' if ptx else ''}"
        for ((major, minor), suffix), ptx in sorted(entries.items())
    )


def runs_on(capability: tuple[int, int], archs: Iterable[str]) -> tuple[bool, str]:
    """Whether an extension holding ``archs`` (:func:`held_archs`) runs on a card of compute
    capability ``capability`` (major, minor), and why (a sentence; where it does not run, it
    names the card's capability, the architectures held and the build that adds the card).

    A cubin ``sm_XY`` runs on a card of major X and minor Y or higher (sm_80 on an A100, 8.0,
    and on an RTX 3090, 8.6); an architecture-specific one (``sm_90a``, ``sm_100f``) only on
    capability X.Y exactly. PTX ``compute_XY`` is compiled by the driver (JIT, when it first
    loads the kernels; it caches the result) for any card of capability X.Y or higher. A cubin
    is preferred over PTX, as the driver does.
    """
    archs = tuple(archs)
    capability = (int(capability[0]), int(capability[1]))
    card = f"{capability[0]}.{capability[1]}"
    cubins, ptx = [], []
    for arch in archs:
        parsed = _parse(arch)
        if parsed is None:
            continue
        kind, (major, minor), suffix = parsed
        if kind == "sm" and (
            capability == (major, minor)
            if suffix
            else capability[0] == major and capability[1] >= minor
        ):
            cubins.append((minor, arch))
        elif kind == "compute" and (
            capability == (major, minor) if suffix else capability >= (major, minor)
        ):
            ptx.append(((major, minor), arch))
    if cubins:
        arch = max(cubins)[1]
        return True, f"runs on capability {card} through its {arch} cubin"
    if ptx:
        arch = max(ptx)[1]
        return True, (
            f"runs on capability {card} through its {arch} PTX, which the driver compiles for the card "
            "when it first loads the kernels (no cubin for it)"
        )
    held = " ".join(archs) if archs else "no recorded architecture"
    return False, (
        f"the CUDA extension has no kernel image for capability {card}: it holds {held} (a cubin sm_XY "
        f"runs on capability X.Y up to X.9, PTX compute_XY on X.Y and later). Rebuild it for this card: "
        f'TORCH_CUDA_ARCH_LIST="{_arch_list(archs, capability)}" {REBUILD}'
    )


# Device index -> runs_on's answer for that card (a card's capability does not change).
_ON_DEVICE: dict[int, tuple[bool, str]] = {}


@torch.compiler.assume_constant_result  # torch.compile: evaluated when traced, a constant in the graph
def runs_on_device(index: int) -> tuple[bool, str]:
    """:func:`runs_on` for CUDA device ``index`` and the loaded extension, once per device; the
    reason names the device."""
    verdict = _ON_DEVICE.get(index)
    if verdict is None:
        ok, why = runs_on(torch.cuda.get_device_capability(index), held_archs())
        verdict = _ON_DEVICE[index] = (ok, f"cuda:{index}: {why}")
    return verdict


def _on_visible_devices() -> list[str]:
    """Whether the kernels run on each visible CUDA device, devices of one capability together."""
    if not torch.cuda.is_available():
        return ["no CUDA device is visible"]
    by_verdict: dict[str, list[str]] = {}
    for index in range(torch.cuda.device_count()):
        try:
            why = runs_on_device(index)[1].split(": ", 1)[1]
        except RuntimeError as e:  # a device the CUDA runtime cannot query
            why = f"its capability is unknown ({e})"
        by_verdict.setdefault(why, []).append(str(index))
    return [f"cuda:{','.join(indices)}: {why}" for why, indices in by_verdict.items()]


def extension_status() -> str:
    """One line: the compiled extension's file, the architectures it holds and whether its
    kernels run on each visible CUDA device (and why, :func:`runs_on`); or why it did not
    load. The reasons: the import error; what the build of the imported package recorded (e.g.
    pip's isolated build, where torch is not importable, skips it; the record says what to
    run); and, loaded or not, whether this ``tofu_kernels`` is a source checkout that shadows
    an installed package (Python run from the checkout's root imports its folder first)."""
    pkg = Path(os.path.realpath(__file__)).parent
    shadowed = _shadowed_installs(pkg)
    if EXTENSION is not None:
        archs = held_archs()
        notes = [
            f"loaded: {EXTENSION.__file__}",
            f"holds {' '.join(archs)}"
            if archs
            else f"records no architectures (built before they were recorded: rebuild it, {REBUILD})",
            *_on_visible_devices(),
        ]
        if shadowed:
            notes.append(f"tofu_kernels imported from {pkg}")
    else:
        if any(pkg.glob("_C.*")):
            notes = [
                f"not loaded ({type(EXTENSION_ERROR).__name__}: {EXTENSION_ERROR})",
                f"tofu_kernels imported from {pkg}",
            ]
        else:  # (Python's own words for a missing submodule speak of a circular import)
            notes = [
                "not loaded: no compiled extension in this package (no _C file)",
                f"tofu_kernels imported from {pkg}",
            ]
        info = pkg / "_build_info.json"
        if info.is_file():
            rec = json.loads(info.read_text())
            if rec.get("cuda_extension") != "built":
                notes.append(f"its build did not build the extension: {rec.get('reason')}")
    for installed in shadowed:
        has = "has its" if any(installed.glob("_C.*")) else "has no"
        notes.append(
            f"this source checkout shadows the installed package in {installed.parent}, which {has} "
            "compiled extension (Python puts the current directory first): run from another directory "
            "to use that package"
        )
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
