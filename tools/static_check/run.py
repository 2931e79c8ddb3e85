"""The static GPU check, end to end: compile every kernel for each target, read what the
compiler made of it, hold it against the budgets; write the results (JSON) and the
per-kernel tables (docs/static_check.md).

    python -m tools.static_check                     # sm_80, sm_90, sm_100; Triton and CUDA
    python -m tools.static_check --write-docs        # and regenerate docs/static_check.md
    python -m tools.static_check --backend triton --arch 90 --json out.json

Exit status 1 when a budget is broken, a kernel fails to compile or an op writes other
tensors than its schema says. Needs Triton (its wheel brings ptxas and cuobjdump) and, for
the CUDA kernels, nvcc; no GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ARCHS = (80, 90, 100)
BACKENDS = ("triton", "cuda")


def _templates(source: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Per CUDA kernel: its template parameter names and its argument names, read from the source."""
    text = source.read_text()
    out = {}
    pat = re.compile(
        r"(?:template\s*<([^>]*)>\s*)?__global__\s+void\s+(?:__launch_bounds__\([^)]*\)\s*)?(\w+)\s*"
        r"\(([^)]*)\)",
        re.S,
    )
    for m in pat.finditer(text):
        tparams = [t.split()[-1] for t in m.group(1).split(",")] if m.group(1) else []
        params = [re.findall(r"\w+", p)[-1] for p in m.group(3).split(",") if p.strip()]
        out[m.group(2)] = (tparams, params)
    return out


def run_cuda(archs, work: Path, source: Path | None = None) -> tuple[list, list[str]]:
    from . import check, cuda_build, ptx, sass

    source = source or cuda_build.SOURCE
    signatures = _templates(source)
    reports, errors = [], []
    for arch in archs:
        try:
            b = cuda_build.build(arch, work / f"cuda-sm{arch}", source)
        except Exception as e:  # a compile error is a finding, reported with the compiler's words
            errors.append(f"cuda sm_{arch}: {getattr(e, 'stderr', '') or e}")
            continue
        funcs = ptx.parse(b.ptx)
        sfuncs = sass.disassemble(b.cubin)
        res = sass.resources(b.cubin)
        for mangled, k in b.kernels.items():
            family = k.name.split("<")[0]
            tparams, params = signatures.get(family, ([], []))
            targs = dict(zip(tparams, k.template))
            dtype = targs.get("T", "float")
            reports.append(
                check.analyse(
                    "cuda",
                    arch,
                    family,
                    k.name[len(family) :] or "",
                    targs.get("Aligned", "true") == "true",
                    targs.get("BetaOne") == "true",
                    check.ELEMENT_BITS.get(dtype, 32),
                    params,
                    funcs[mangled],
                    sfuncs[mangled],
                    res[mangled],
                    k.spills,
                )
            )
    return reports, errors


def run_triton(
    archs, work: Path, module_path: Path | None = None, cases: str | None = None
) -> tuple[list, list[str], list[dict], int]:
    from . import check, ptx, sass, triton_aot, written

    module = triton_aot.K if module_path is None else _load_module(module_path)
    selected = [c for c in triton_aot.cases() if cases is None or cases in c.label]
    launches = triton_aot.record(selected, module=module)
    reports, errors, writes = [], [], []
    for arch in archs:
        try:
            compiled = triton_aot.compile_all(launches, arch, module)
        except Exception as e:
            errors.append(f"triton sm_{arch}: {type(e).__name__}: {e}")
            continue
        if arch == archs[0]:
            writes = written.compare(launches)
        cubins = []
        for c in compiled:
            cubin = work / f"triton-sm{arch}" / f"{c.name}-{c.key[:16]}.cubin"
            cubin.parent.mkdir(parents=True, exist_ok=True)
            cubin.write_bytes(c.cubin)
            cubins.append(cubin)
        with ThreadPoolExecutor(
            os.cpu_count() or 2
        ) as pool:  # the disassembler takes ~0.4 s a cubin
            disassembled = list(pool.map(sass.disassemble, cubins))
        for c, cubin, sfns in zip(compiled, cubins, disassembled):
            sfn = sfns[c.name]
            pfn = ptx.parse(c.ptx)[c.name]
            names = [n for n, t in c.signature.items() if t != "constexpr"]
            dtype = next((t[1:] for n, t in c.signature.items() if n in ("X", "OUT")), "fp32")
            res = sass.resources(cubin)[c.name]
            res.shared = max(
                res.shared, c.shared
            )  # Triton's shared memory is dynamic: its own count
            reports.append(
                check.analyse(
                    "triton",
                    arch,
                    c.name,
                    c.spec,
                    _aligned(c),
                    bool(c.constants.get("BETA_IS_ONE", False)),
                    check.ELEMENT_BITS.get(dtype, 32),
                    names,
                    pfn,
                    sfn,
                    res,
                    triton_aot.ptxas_spills(c.ptxas_log),
                    c.cases,
                )
            )
    return reports, errors, writes, len(launches)


# Arguments that position a row or bound its columns: 16-byte rows need them divisible by 16
_ROW_ARGS = (
    "s_outer",
    "s_inner",
    "xs_outer",
    "xs_inner",
    "os_outer",
    "os_inner",
    "n_valid",
    "width",
    "chunk",
)


def _aligned(c) -> bool:
    """Triton proved 16-byte alignment of the rows: the logits and gradient pointers and
    every row stride and bound are specialized as divisible by 16 (or constant)."""
    names = list(c.signature)
    for idx, name in enumerate(names):
        t = c.signature[name]
        if name in ("X", "OUT") or (name in _ROW_ARGS and t != "constexpr"):
            if ["tt.divisibility", 16] not in c.attrs.get((idx,), []):
                return False
    return True


def _load_module(path: Path):
    spec = importlib.util.spec_from_file_location(
        f"_static_check_{path.stem}", path, submodule_search_locations=None
    )
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "tofu_kernels.backends"
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def versions() -> dict:
    import torch
    import triton

    from . import cuda_build

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    try:
        import subprocess

        v = subprocess.run([cuda_build.nvcc(), "--version"], capture_output=True, text=True).stdout
        out["nvcc"] = re.search(r"release ([\d.]+)", v).group(1)
    except Exception:
        out["nvcc"] = None
    return out


def run(
    archs=ARCHS,
    backends=BACKENDS,
    work: Path | None = None,
    triton_module: Path | None = None,
    cuda_source: Path | None = None,
    cases: str | None = None,
) -> dict:
    from . import check

    work = Path(work or tempfile.mkdtemp(prefix="tofu-static-"))
    os.environ.setdefault(
        "TRITON_CACHE_DIR", str(work / "triton-cache")
    )  # compile, never reuse: ptxas logs
    budgets = check.budgets()
    result = {
        "versions": versions(),
        "archs": list(archs),
        "reports": [],
        "errors": [],
        "writes": [],
        "timings": {},
    }
    if "triton" in backends:
        t = time.time()
        reports, errors, writes, n = run_triton(archs, work, triton_module, cases)
        result["reports"] += reports
        result["errors"] += errors
        result["writes"] = writes
        result["launches"] = n
        result["timings"]["triton"] = round(time.time() - t, 1)
    if "cuda" in backends:
        t = time.time()
        reports, errors = run_cuda(archs, work, cuda_source)
        result["reports"] += reports
        result["errors"] += errors
        result["timings"]["cuda"] = round(time.time() - t, 1)
    result["violations"] = [v for r in result["reports"] for v in check.violations(r, budgets)]
    result["violations"] += [
        f"written tensors: op {w['op']} ({w['case']}): kernels write {w['written']}, schema marks {w['schema']}"
        for w in result["writes"]
        if w["written"] != w["schema"]
    ]
    result["reports"] = [r.to_json() for r in result["reports"]]
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tools.static_check", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--arch", default=",".join(map(str, ARCHS)), help="targets, e.g. 80,90,100")
    ap.add_argument("--backend", default=",".join(BACKENDS), help="triton, cuda or both")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--write-docs", action="store_true", help="regenerate docs/static_check.md")
    ap.add_argument("--work", type=Path, help="keep the PTX, cubins and caches here")
    ap.add_argument(
        "--triton-module", type=Path, help=argparse.SUPPRESS
    )  # a mutated copy (the self-test)
    ap.add_argument("--cuda-source", type=Path, help=argparse.SUPPRESS)
    ap.add_argument(
        "--cases", help=argparse.SUPPRESS
    )  # only the Triton cases whose label contains this
    a = ap.parse_args(argv)
    archs = tuple(int(x) for x in a.arch.split(","))
    backends = tuple(b.strip() for b in a.backend.split(","))
    for b in backends:
        if b not in BACKENDS:
            ap.error(f"--backend: {b!r} is not one of {BACKENDS}")
    print(
        f"static check: {', '.join(backends)} for {', '.join(f'sm_{x}' for x in archs)}", flush=True
    )
    result = run(archs, backends, a.work, a.triton_module, a.cuda_source, a.cases)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    if a.write_docs:
        from . import table

        table.write(result)
    n = len(result["reports"])
    print(
        f"{n} compiled kernels ({result.get('launches', 0)} Triton launches recorded), "
        f"{len(result['writes'])} op calls' written tensors, timings {result['timings']}"
    )
    for e in result["errors"]:
        print("COMPILE ERROR:", e)
    for v in result["violations"]:
        print("VIOLATION", v)
    return 1 if result["errors"] or result["violations"] else 0
