"""Build script: the Python package, plus the CUDA extension when it can be built.

    pip install --no-build-isolation .      # builds tofu_kernels._C if nvcc + CUDA torch exist
    TOFU_BUILD_CUDA=0 pip install .         # never build it (pure Python: torch + Triton backends)
    TOFU_BUILD_CUDA=1 pip install --no-build-isolation .   # build it or fail with the reason

``--no-build-isolation`` lets the build see the installed torch: pip's default, isolated
build environment holds only setuptools and wheel, so there the extension is skipped. Such a
build uses this environment's setuptools and torch, so install them first (``pip install
setuptools wheel torch``): pip installs the torch dependency only after the build, too late
for it, and without setuptools pip cannot even start this script.
``TORCH_CUDA_ARCH_LIST`` is honoured (default "8.0;9.0;10.0+PTX": cubins for A100, H100/H200 and
B200, plus PTX that the driver compiles for newer cards; no GPU is needed to build). The
architectures nvcc actually compiles for (read from torch's ``-gencode`` flags) are compiled
into the extension as ``tofu_kernels._C.ARCHS``, from which the package decides whether the
CUDA backend runs on a card (``tofu_kernels.extension_status()`` says it).
Where the extension is skipped, the pure-Python package installs; pip shows the reason
only with ``-v``, so it is also written into the package (``tofu_kernels/_build_info.json``),
where ``tofu_kernels.extension_status()`` reads it.
"""

import json
import os
import re
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"tofu-kernels setup: {msg}", file=sys.stderr)


def _is_toolkit(root: str | None) -> bool:
    """A CUDA toolkit root holds bin/nvcc and lib64/libcudart.so (else -lcudart fails)."""
    return (
        bool(root)
        and os.path.exists(os.path.join(root, "bin", "nvcc"))
        and any(os.path.exists(os.path.join(root, lib, "libcudart.so")) for lib in ("lib64", "lib"))
    )


def _cuda_home() -> str | None:
    explicit = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if explicit:  # the user's choice is final: no silent fallback to another toolkit
        return explicit if _is_toolkit(explicit) else None
    candidates = ["/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:  # nvcc on PATH may be a wrapper script or a link: try both locations
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        candidates.append(os.path.dirname(os.path.dirname(nvcc)))
    return next((c for c in candidates if _is_toolkit(c)), None)


def _record(built: bool, why: str, root: str = HERE) -> None:
    """What this build did about the extension, installed with the package (package data):
    written into ``root``'s ``tofu_kernels`` folder (the source tree, or a build's copy of it)."""
    with open(os.path.join(root, "tofu_kernels", "_build_info.json"), "w") as f:
        json.dump({"cuda_extension": "built" if built else "not built", "reason": why}, f)


def recording(build_ext, built: str):
    """``build_ext`` (a setuptools command class) that records "built" (with ``built`` as the
    reason) only once its ``run()`` has succeeded, and "not built" with the error where it
    raised. The record goes into the source tree and into the build's copy of the package:
    ``build_py`` copies the package data before ``build_ext`` runs."""

    class RecordingBuildExt(build_ext):
        def run(self):
            try:
                super().run()
            except BaseException as e:
                self._record(False, f"the CUDA extension's build failed: {type(e).__name__}: {e}")
                raise
            self._record(True, built)

        def _record(self, ok: bool, why: str) -> None:
            roots = [HERE]
            if not self.inplace and os.path.isdir(os.path.join(self.build_lib, "tofu_kernels")):
                roots.append(self.build_lib)
            for root in roots:
                _record(ok, why, root)

    return RecordingBuildExt


# The last step of every way to build the extension: a build that sees this environment's torch.
BUILD = "pip install --no-build-isolation ."
# Cubins for A100 (sm_80), H100/H200 (sm_90) and B200 (sm_100), and compute_100 PTX, which the
# driver JIT-compiles for any later card (sm_103, sm_120, ...).
DEFAULT_ARCH_LIST = "8.0;9.0;10.0+PTX"


def arch_flags(arch_list: str) -> list[str]:
    """The ``-gencode`` flags torch's cpp_extension passes nvcc for ``arch_list`` (a
    ``TORCH_CUDA_ARCH_LIST``), from torch itself where it has the (private) function; else
    parsed here the same way, for numeric entries ("8.0", "9.0a", "10.0+PTX")."""
    try:
        from torch.utils.cpp_extension import _get_cuda_arch_flags
    except ImportError:
        _get_cuda_arch_flags = None
    if _get_cuda_arch_flags is not None:
        saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch_list
        try:
            return list(_get_cuda_arch_flags())
        finally:
            if saved is None:
                del os.environ["TORCH_CUDA_ARCH_LIST"]
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = saved
    flags = set()
    for entry in filter(None, arch_list.replace(" ", ";").split(";")):
        found = re.fullmatch(r"(\d+)\.(\d)([af]?)(\+PTX)?", entry)
        if found is None:
            raise SystemExit(
                f"TORCH_CUDA_ARCH_LIST entry {entry!r} is not of the form 9.0, 9.0a or 10.0+PTX"
            )
        num = found[1] + found[2] + found[3]
        flags.add(f"-gencode=arch=compute_{num},code=sm_{num}")
        if found[4]:
            flags.add(f"-gencode=arch=compute_{num},code=compute_{num}")
    return sorted(flags)


def held_archs(flags: list[str]) -> str:
    """What nvcc puts into the binary for these ``-gencode`` flags, cubins first, each in
    ascending order: e.g. "sm_80 sm_90 sm_100 compute_100" (a cubin ``sm_XY``, PTX
    ``compute_XY``)."""
    codes = set()
    for flag in flags:
        for code in re.findall(r",code=\[?([\w,]+)", flag):
            codes.update(code.split(","))

    def order(code: str):
        kind, num = code.split("_", 1)
        digits = re.match(r"\d+", num)[0]
        return kind != "sm", int(digits), num

    return " ".join(sorted(codes, key=order))


def isolated_build() -> bool:
    """pip's default, isolated build: its own temporary environment (setuptools and wheel
    only), on the path as a pip-build-env folder."""
    return any("pip-build-env" in p for p in sys.path)


def cannot_build(torch, torch_error: str, cuda_home: str | None, isolated: bool = False) -> str:
    """Why the extension cannot be built here and what to run, in order ("" where it can).

    ``torch``: the module, or None where it did not import (``torch_error`` says why);
    ``cuda_home``: the toolkit :func:`_cuda_home` found, or None; ``isolated``: pip's isolated
    build (:func:`isolated_build`), which never sees the environment's torch.
    """
    reasons, steps = [], []
    if torch is None and isolated:
        reasons.append(
            "pip built the package in an isolated environment (its default, `pip install .`), "
            "which has no torch, whatever the environment you install into has"
        )
        steps.append("install torch into that environment if it has none (pip install torch)")
    elif torch is None:
        # a --no-build-isolation build sees only what was installed before it: pip installs
        # the torch dependency after the build, too late.
        reasons.append(f"torch is not importable at build time ({torch_error})")
        steps.append("install torch first (pip install torch)")
    elif torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
        steps.append("install a CUDA build of torch")
    if cuda_home is None:
        reasons.append("no CUDA toolkit found")
        steps.append(
            "install a CUDA toolkit or set CUDA_HOME to one (the folder holding bin/nvcc and "
            "lib64/libcudart.so)"
        )
    if not reasons:
        return ""
    steps.append(BUILD)
    return (
        f"the CUDA extension cannot be built: {'; '.join(reasons)}. "
        f"To build it: {', '.join(f'{i}. {step}' for i, step in enumerate(steps, 1))}"
    )


def cuda_extensions():
    mode = os.environ.get("TOFU_BUILD_CUDA", "auto").strip().lower()
    if mode not in ("0", "1", "auto"):
        raise SystemExit(f"TOFU_BUILD_CUDA must be 0, 1 or auto, got {mode!r}")
    if mode == "0":
        _log("TOFU_BUILD_CUDA=0: not building the CUDA extension")
        _record(False, "TOFU_BUILD_CUDA=0 at build time")
        return [], {}
    try:
        import torch
    except ImportError as e:
        torch, torch_error = None, str(e)
    else:
        torch_error = ""
    cuda_home = _cuda_home()
    msg = cannot_build(torch, torch_error, cuda_home, isolated_build())
    if msg:
        if mode == "1":
            raise SystemExit(f"TOFU_BUILD_CUDA=1 but {msg}")
        _log(f"{msg} -- Installing the pure-Python package now (torch and Triton backends).")
        _record(False, msg)
        return [], {}

    # torch's cpp_extension reads these at import time.
    os.environ["CUDA_HOME"] = cuda_home
    arch_list = os.environ["TORCH_CUDA_ARCH_LIST"] = (
        os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
    )
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    try:
        archs = held_archs(arch_flags(arch_list))
    except ValueError as e:  # torch's: an architecture it does not know
        raise SystemExit(f"TORCH_CUDA_ARCH_LIST={arch_list!r}: {e}") from None
    if not archs:
        raise SystemExit(f"TORCH_CUDA_ARCH_LIST={arch_list!r} names no CUDA architecture")

    # csrc/ includes only CUDA runtime and c10/cuda headers (not ATen/cuda/CUDAContext.h,
    # which would need the pip wheel's nvidia/cu13/include for cusparse.h).
    include_dirs = [os.path.join(HERE, "csrc")]
    how = f"with {cuda_home}/bin/nvcc for TORCH_CUDA_ARCH_LIST={arch_list} ({archs})"
    _log(f"building the CUDA extension {how}")
    ext = CUDAExtension(
        "tofu_kernels._C",
        sources=["csrc/tofu_ops.cpp", "csrc/tofu_kernels.cu"],
        include_dirs=include_dirs,
        extra_compile_args={
            # the architectures the binary holds, as tofu_kernels._C.ARCHS
            "cxx": ["-O3", f'-DTOFU_CUDA_ARCHS="{archs}"'],
            "nvcc": ["-O3", "-lineinfo"],
        },
    )
    # Until build_ext has run to its end, the record says the build did not finish.
    _record(False, f"the CUDA extension's build ({how}) did not finish")
    return [ext], {"build_ext": recording(BuildExtension, f"built {how}")}


if __name__ == "__main__":  # as setuptools runs it (tests import cannot_build without building)
    ext_modules, cmdclass = cuda_extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
