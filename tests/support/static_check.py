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
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.static_check",
            "--json",
            str(out),
            "--work",
            str(tmp_path / "work"),
            *args,
        ],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
    )
    result = json.loads(out.read_text()) if out.exists() else {}
    return p.returncode, p.stdout + p.stderr, result


def run_fake_cuda() -> list[dict]:
    """One record per (backend, scenario, trace or compiler) of tools.static_check.fake_cuda."""
    p = subprocess.run(
        [sys.executable, "-m", "tools.static_check.fake_cuda"],
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
    )
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
    return [
        v
        for v in result["violations"]
        if v.startswith(f"{rule}: {backend} ") or (rule == "written tensors" and v.startswith(rule))
    ]


def assert_docs_section_current(result: dict, backend: str) -> None:
    """docs/static_check.md's section of ``backend`` is what this run's check writes, where
    the page was generated with this run's toolchain (else the test is skipped, naming both)."""
    import re

    from tools.static_check import table

    page = (ROOT / "docs" / "static_check.md").read_text()
    current = table.sections(page).get(backend, "")
    tool = "Triton" if backend == "triton" else "nvcc"
    found = re.search(rf"Compiled with {tool} (\S+) \(torch (\S+)\)", current)
    v = result["versions"]
    mine = (v["triton"] if backend == "triton" else v["nvcc"], v["torch"])
    if found and (found.group(1), found.group(2)) != mine:
        pytest.skip(
            f"docs/static_check.md was generated with {tool} {found.group(1)} / torch {found.group(2)}; "
            f"this run has {mine[0]} / {mine[1]}"
        )
    assert current == table.section(result, backend), (
        "docs/static_check.md is out of date: python -m tools.static_check --write-docs"
    )
