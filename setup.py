"""Build script: the Python package, plus the CUDA extension when it can be built.

    pip install --no-build-isolation .      # builds tofu_kernels._C if nvcc + CUDA torch exist
    TOFU_BUILD_CUDA=0 pip install .         # never build it (pure Python: torch + Triton backends)
    TOFU_BUILD_CUDA=1 pip install --no-build-isolation .   # build it or fail with the reason

``--no-build-isolation`` lets the build see the installed torch: pip's default, isolated
build environment holds only setuptools and wheel, so there the extension is skipped. Such a
build uses this environment's setuptools and torch, so install them first (``pip install
setuptools wheel torch``): pip installs the torch dependency only after the build, too late
for it, and without setuptools pip cannot even start this script.
``TORCH_CUDA_ARCH_LIST`` is honoured (default "9.0", Hopper; no GPU is needed to build).
Where the extension is skipped, the pure-Python package installs; pip shows the reason
only with ``-v``, so it is also written into the package (``tofu_kernels/_build_info.json``),
where ``tofu_kernels.extension_status()`` reads it.
"""

import json

import os
import shutil
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(msg: str) -> None:
    print(f"tofu-kernels setup: {msg}", file=sys.stderr)


def _is_toolkit(root: str | None) -> bool:
    """A CUDA toolkit root holds bin/nvcc and lib64/libcudart.so (else -lcudart fails)."""
    return bool(root) and os.path.exists(os.path.join(root, "bin", "nvcc")) and any(
        os.path.exists(os.path.join(root, lib, "libcudart.so")) for lib in ("lib64", "lib")
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


def cannot_build(torch, torch_error: str, cuda_home: str | None) -> str:
    """Why the extension cannot be built here and what to run, in order ("" where it can).

    ``torch``: the module, or None where it did not import (``torch_error`` says why);
    ``cuda_home``: the toolkit :func:`_cuda_home` found, or None.
    """
    reasons, steps = [], []
    if torch is None:
        # pip's default build is isolated (setuptools and wheel only), and a
        # --no-build-isolation build sees only what was installed before it: pip installs
        # the torch dependency after the build, too late.
        reasons.append(f"torch is not importable at build time ({torch_error})")
        steps.append("install torch first (pip install torch)")
    elif torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is a CPU-only build")
        steps.append("install a CUDA build of torch")
    if cuda_home is None:
        reasons.append("no CUDA toolkit found")
        steps.append("install a CUDA toolkit or set CUDA_HOME to one (the folder holding bin/nvcc and "
                     "lib64/libcudart.so)")
    if not reasons:
        return ""
    steps.append(BUILD)
    return (f"the CUDA extension cannot be built: {'; '.join(reasons)}. "
            f"To build it: {', '.join(f'{i}. {step}' for i, step in enumerate(steps, 1))}")


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
    msg = cannot_build(torch, torch_error, cuda_home)
    if msg:
        if mode == "1":
            raise SystemExit(f"TOFU_BUILD_CUDA=1 but {msg}")
        _log(f"{msg} -- Installing the pure-Python package now (torch and Triton backends).")
        _record(False, msg)
        return [], {}

    # torch's cpp_extension reads these at import time.
    os.environ["CUDA_HOME"] = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    # csrc/ includes only CUDA runtime and c10/cuda headers (not ATen/cuda/CUDAContext.h,
    # which would need the pip wheel's nvidia/cu13/include for cusparse.h).
    include_dirs = [os.path.join(HERE, "csrc")]
    _log(f"building the CUDA extension with {cuda_home}/bin/nvcc for TORCH_CUDA_ARCH_LIST="
         f"{os.environ['TORCH_CUDA_ARCH_LIST']}")
    ext = CUDAExtension(
        "tofu_kernels._C",
        sources=["csrc/tofu_ops.cpp", "csrc/tofu_kernels.cu"],
        include_dirs=include_dirs,
        extra_compile_args={
            "cxx": ["-O3"],
            "nvcc": ["-O3", "-lineinfo"],
        },
    )
    # Until build_ext has run to its end, the record says the build did not finish.
    how = f"with {cuda_home}/bin/nvcc for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}"
    _record(False, f"the CUDA extension's build ({how}) did not finish")
    return [ext], {"build_ext": recording(BuildExtension, f"built {how}")}


if __name__ == "__main__":  # as setuptools runs it (tests import cannot_build without building)
    ext_modules, cmdclass = cuda_extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
