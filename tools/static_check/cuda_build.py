"""The CUDA kernels (``csrc/tofu_kernels.cu``) compiled for one target without a GPU: nvcc
to PTX with the extension's device flags, ptxas to a cubin with its ``-v`` log, and each
kernel's name made readable (``row_stats_kernel<__nv_bfloat16, false, true>``)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCE = ROOT / "csrc" / "tofu_kernels.cu"


def nvcc() -> str:
    import os

    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    for cand in (home and f"{home}/bin/nvcc", "/usr/local/cuda/bin/nvcc", shutil.which("nvcc")):
        if cand and Path(cand).exists():
            return cand
    raise FileNotFoundError(
        "nvcc not found (a CUDA toolkit is needed for the CUDA part of the static check)"
    )


def device_flags() -> list[str]:
    """The device-side flags of the extension's build (setup.py: -O3 -lineinfo, plus torch's
    cpp_extension defaults)."""
    import os

    os.environ.setdefault(
        "CUDA_HOME", str(Path(nvcc()).resolve().parents[1])
    )  # torch looks for one at import
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return ["-O3", "-lineinfo", "-std=c++17", *COMMON_NVCC_FLAGS]


@dataclass
class CudaKernel:
    mangled: str
    name: str  # demangled, without namespaces and parameters: "grad_kernel<__nv_bfloat16>"
    template: list[str]  # template arguments as written: ["__nv_bfloat16"]
    spills: tuple[int, int]  # ptxas: spill store bytes, spill load bytes


@dataclass
class CudaBuild:
    arch: int
    ptx: str
    cubin: Path
    kernels: dict[str, CudaKernel]  # by mangled name


def build(arch: int, out: Path, source: Path = SOURCE) -> CudaBuild:
    """PTX and cubin of ``source`` for ``sm_<arch>`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    ptx = out / f"{source.stem}.sm{arch}.ptx"
    cubin = out / f"{source.stem}.sm{arch}.cubin"
    subprocess.run(
        [
            nvcc(),
            *device_flags(),
            f"-arch=compute_{arch}",
            "-ptx",
            f"-I{ROOT / 'csrc'}",
            "-o",
            str(ptx),
            str(source),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    ptxas = str(Path(nvcc()).parent / "ptxas")
    log = subprocess.run(
        [ptxas, "-v", "-O3", "-lineinfo", f"--gpu-name=sm_{arch}", str(ptx), "-o", str(cubin)],
        check=True,
        capture_output=True,
        text=True,
    ).stderr
    text = ptx.read_text()
    mangled = re.findall(r"^\s*\.(?:visible\s+)?entry\s+([\w$]+)\s*\(", text, re.M)
    kernels = {}
    for m, (name, template) in zip(mangled, demangle(mangled)):
        kernels[m] = CudaKernel(m, name, template, _spills(log, m))
    return CudaBuild(arch, text, cubin, kernels)


def demangle(mangled: list[str]) -> list[tuple[str, list[str]]]:
    """(``kernel<args>``, [args]) of each mangled name (c++filt, namespaces dropped)."""
    out = subprocess.run(
        ["c++filt"], input="\n".join(mangled), capture_output=True, text=True, check=True
    ).stdout
    result = []
    for full in out.splitlines():
        full = full.replace("(anonymous namespace)::", "")
        head = re.sub(r"^void\s+", "", full[: full.index("(")] if "(" in full else full)
        m = re.match(r"(?:\w+::)*(\w+)(?:<(.*)>)?$", head)
        template = [t.strip() for t in m.group(2).split(",")] if m.group(2) else []
        result.append((m.group(1) + (f"<{m.group(2)}>" if m.group(2) else ""), template))
    return result


def _spills(log: str, mangled: str) -> tuple[int, int]:
    m = re.search(
        rf"Function properties for {re.escape(mangled)}\s*\n\s*(\d+) bytes stack frame, (\d+) bytes spill "
        rf"stores, (\d+) bytes spill loads",
        log,
    )
    return (int(m.group(2)), int(m.group(3))) if m else (0, 0)
