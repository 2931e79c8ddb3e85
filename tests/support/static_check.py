"""Running the static GPU check (tools/static_check) from the tests: in a subprocess, without
Triton's interpreter (the check compiles real kernels), its JSON result read back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support.checkout import ROOT


def env() -> dict:
    e = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    e["PYTHONPATH"] = str(ROOT)
    return e


def run_check(tmp_path, *args: str) -> tuple[int, str, dict]:
    """(exit status, output, the JSON result) of ``python -m tools.static_check ARGS``."""
    out = tmp_path / "result.json"
    p = subprocess.run([sys.executable, "-m", "tools.static_check", "--json", str(out), "--work",
                        str(tmp_path / "work"), *args], cwd=ROOT, env=env(), capture_output=True, text=True)
    result = json.loads(out.read_text()) if out.exists() else {}
    return p.returncode, p.stdout + p.stderr, result


def run_fake_cuda() -> list[dict]:
    """One record per (backend, scenario, trace or compiler) of tools.static_check.fake_cuda."""
    p = subprocess.run([sys.executable, "-m", "tools.static_check.fake_cuda"], cwd=ROOT, env=env(),
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    return [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]


def need_nvcc() -> None:
    from tools.static_check import cuda_build

    try:
        cuda_build.nvcc()
    except FileNotFoundError as e:
        pytest.skip(f"the CUDA part of the static check needs a CUDA toolkit: {e}")
    if shutil.which("c++filt") is None:
        pytest.skip("the CUDA part of the static check needs c++filt (binutils)")


def by_rule(result: dict, rule: str, backend: str) -> list[str]:
    return [v for v in result["violations"] if v.startswith(f"{rule}: {backend} ")
            or (rule == "written tensors" and v.startswith(rule))]
