"""`pip install .` without a CUDA toolkit yields a working pure-Python package, and a build or
an import that cannot use the extension says why and what to run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.checkout import ROOT


def _pip_wheel(tmp_path, **env):
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-v",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path / "wheels"),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, **env},
        cwd=tmp_path,
    )


@pytest.mark.slow
def test_install_without_cuda_toolkit_is_pure_python(tmp_path):
    build = _pip_wheel(tmp_path, CUDA_HOME=str(tmp_path / "no-toolkit"), TOFU_BUILD_CUDA="auto")
    assert build.returncode == 0, build.stderr[-3000:]
    assert "cannot be built: no CUDA toolkit found" in build.stdout + build.stderr
    wheel = next((tmp_path / "wheels").glob("tofu_kernels-*.whl"))
    assert "py3-none-any" in wheel.name, "a pure-Python wheel was expected"
    # Install the wheel into its own folder and import it from there (ahead of this
    # checkout's editable install), with this venv's torch.
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(target),
            str(wheel),
        ],
        check=True,
    )
    assert not list(target.glob("tofu_kernels/_C*")), "no extension expected in this wheel"
    code = (
        # hide this checkout's editable install, which would resolve tofu_kernels._C by name
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
        "getattr(f, '__module__', '')]; "
        "import torch, tofu_kernels as tk; assert tk.__file__.startswith(%r), tk.__file__; "
        "assert not tk.extension_loaded(); "
        "x = torch.randn(4, 50, requires_grad=True); y = torch.randint(0, 50, (4,)); "
        "l = tk.tofu_loss(x, y); l.backward(); assert x.grad is not None; print('ok', float(l))"
    ) % str(target)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr[-3000:]

    # The installed package knows why it has no extension (pip shows it only with -v) ...
    status = _status(target, cwd=tmp_path)
    assert f"tofu_kernels imported from {target / 'tofu_kernels'}" in status, status
    assert (
        "its build did not build the extension: the CUDA extension cannot be built: no CUDA toolkit found"
        in status
    )
    # ... and Python started in a source checkout's root imports the checkout instead: said so.
    checkout = tmp_path / "checkout"
    shutil.copytree(
        ROOT / "tofu_kernels",
        checkout / "tofu_kernels",
        ignore=shutil.ignore_patterns("_C*", "_build_info.json", "__pycache__"),
    )
    shutil.copy(ROOT / "setup.py", checkout / "setup.py")
    status = _status(target, cwd=checkout)
    assert f"tofu_kernels imported from {checkout / 'tofu_kernels'}" in status, status
    assert f"this source checkout shadows the installed package in {target}" in status, status


def _status(target, cwd) -> str:
    """tk.extension_status() in a fresh interpreter that finds the package installed in ``target``."""
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
        "getattr(f, '__module__', '')]; import tofu_kernels as tk; print(tk.extension_status())"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(target)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_forced_build_without_toolkit_fails_with_reason(tmp_path):
    build = _pip_wheel(tmp_path, CUDA_HOME=str(tmp_path / "no-toolkit"), TOFU_BUILD_CUDA="1")
    assert build.returncode != 0
    assert "TOFU_BUILD_CUDA=1 but the CUDA extension cannot be built" in build.stdout + build.stderr


# ------------------------------------------------ what a build that cannot make the extension says


def _setup_py() -> dict:
    """setup.py's functions, without running the build (runpy: __name__ is not __main__)."""
    import runpy

    return runpy.run_path(str(ROOT / "setup.py"), run_name="tofu_setup")


def test_build_without_torch_says_what_to_run_in_order():
    """A --no-build-isolation build in an environment without torch (pip installs the torch
    dependency after the build) is told to install torch first, then build again: not to run
    the command it ran."""
    msg = _setup_py()["cannot_build"](None, "No module named 'torch'", "/usr/local/cuda")
    assert msg.startswith(
        "the CUDA extension cannot be built: torch is not importable at build time "
        "(No module named 'torch')"
    ), msg
    steps = msg.split("To build it: ", 1)[1]
    assert (
        steps == "1. install torch first (pip install torch), 2. pip install --no-build-isolation ."
    ), msg
    assert "use pip install --no-build-isolation" not in msg


def test_build_reasons_each_come_with_a_step():
    """Every reason the extension cannot be built has its step, in order, the build last."""
    import torch

    cannot_build = _setup_py()["cannot_build"]
    cpu_torch = type(
        "torch", (), {"__version__": "2.99+cpu", "version": type("v", (), {"cuda": None})}
    )
    msg = cannot_build(cpu_torch, "", None)
    assert "cannot be built: torch 2.99+cpu is a CPU-only build; no CUDA toolkit found." in msg, msg
    assert msg.endswith(
        "To build it: 1. install a CUDA build of torch, 2. install a CUDA toolkit or set CUDA_HOME "
        "to one (the folder holding bin/nvcc and lib64/libcudart.so), 3. pip install "
        "--no-build-isolation ."
    ), msg
    cuda_torch = type(
        "torch", (), {"__version__": "2.99", "version": type("v", (), {"cuda": "13.0"})}
    )
    assert cannot_build(cuda_torch, "", "/usr/local/cuda") == ""
    assert cannot_build(torch, "", None).startswith("the CUDA extension cannot be built: ")


class _Dist:
    """An importlib.metadata distribution of tofu-kernels whose package folder is ``folder``."""

    def __init__(self, folder: Path):
        self.folder = folder

    def locate_file(self, name):
        return self.folder.parent / name


@pytest.mark.parametrize("loaded", [True, False], ids=["extension loaded", "extension not loaded"])
def test_extension_status_names_a_shadowing_checkout(tmp_path, monkeypatch, loaded):
    """Python started in a source checkout imports the checkout's tofu_kernels ahead of an
    installed one: extension_status says so whether the checkout's extension loaded or not,
    and whether the shadowed package has an extension, also where the checkout's own metadata
    (an egg-info in its root, as ``pip install -e`` leaves) is the first distribution found."""
    from importlib import metadata

    import tofu_kernels
    from tofu_kernels import extension

    pkg = Path(os.path.realpath(tofu_kernels.__file__)).parent
    if not (pkg.parent / "setup.py").is_file():
        pytest.skip(f"tofu_kernels is imported from {pkg}, not from a source checkout")
    installed = tmp_path / "site" / "tofu_kernels"
    installed.mkdir(parents=True)
    dists = [_Dist(pkg), _Dist(installed)]  # the checkout's egg-info first, as sys.path finds it
    monkeypatch.setattr(metadata, "distribution", lambda name: dists[0])
    monkeypatch.setattr(metadata, "distributions", lambda **kw: iter(dists))
    if loaded:
        fake = type(sys)("tofu_kernels._C")
        fake.__file__ = str(pkg / "_C.cpython-fake.so")
        monkeypatch.setattr(extension, "EXTENSION", fake)
    else:
        monkeypatch.setattr(extension, "EXTENSION", None)
        monkeypatch.setattr(extension, "EXTENSION_ERROR", ImportError("no _C here"))
    status = tofu_kernels.extension_status()
    assert status.startswith(
        f"loaded: {pkg / '_C.cpython-fake.so'}"
        if loaded
        else "not loaded (ImportError: no _C here)"
    )
    assert f"tofu_kernels imported from {pkg}" in status, status
    assert (
        f"this source checkout shadows the installed package in {installed.parent}, which has no compiled "
        "extension (Python puts the current directory first): run from another directory"
    ) in status, status
    (installed / "_C.cpython-312-x86_64-linux-gnu.so").touch()
    assert (
        f"shadows the installed package in {installed.parent}, which has its compiled extension ("
        in tofu_kernels.extension_status()
    )
    # no installed package elsewhere: nothing shadowed, nothing said
    dists.pop()
    assert "shadows" not in tofu_kernels.extension_status()


# ------------------------------------------------ the build's record of the extension


def _build_tree(tmp_path) -> Path:
    """A copy of the build's inputs (setup.py, pyproject.toml, README.md) with a stub package
    and stub sources: a build here writes its records into this copy, not into the checkout."""
    tree = tmp_path / "tree"
    for folder in ("tofu_kernels", "csrc"):
        (tree / folder).mkdir(parents=True)
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, tree / name)
    for stub in ("tofu_kernels/__init__.py", "csrc/tofu_ops.cpp", "csrc/tofu_kernels.cu"):
        (tree / stub).touch()
    return tree


def _records(tree: Path) -> list:
    import json

    infos = [
        tree / "tofu_kernels" / "_build_info.json",
        *tree.glob("build/lib*/tofu_kernels/_build_info.json"),
    ]
    return [json.loads(p.read_text()) for p in infos]


def test_failed_build_is_not_recorded_as_built(tmp_path):
    """A build whose compile step fails (a stand-in toolkit whose nvcc refuses to compile)
    records "not built" with the error, in the source tree and in the build's copy of the
    package (build_py copies it before build_ext runs), not "built"."""
    import torch

    if torch.version.cuda is None or shutil.which("c++") is None:
        pytest.skip("the build path needs a CUDA build of torch and a C++ compiler")
    tree = _build_tree(tmp_path)
    toolkit = tmp_path / "toolkit"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "lib64").mkdir()
    (toolkit / "lib64" / "libcudart.so").touch()
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text(
        '#!/bin/sh\ncase "$*" in *--version*) echo "Cuda compilation tools, release 13.0"; exit 0;; esac\n'
        'echo "stand-in nvcc: no compiling here" >&2; exit 1\n'
    )
    nvcc.chmod(0o755)
    build = subprocess.run(
        [sys.executable, "setup.py", "build"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tree,
        env={**os.environ, "CUDA_HOME": str(toolkit), "TOFU_BUILD_CUDA": "1"},
    )
    assert build.returncode != 0, build.stdout[-3000:]
    assert "stand-in nvcc: no compiling here" in build.stdout + build.stderr, build.stderr[-3000:]
    records = _records(tree)
    assert len(records) == 2, records  # the source tree's and build/lib's
    for rec in records:
        assert rec["cuda_extension"] == "not built", rec
        assert rec["reason"].startswith("the CUDA extension's build failed: "), rec


def test_build_is_recorded_as_built_once_it_succeeded(tmp_path):
    """The command class records "built" after its build step returned, in both places."""
    import runpy

    from setuptools import Distribution
    from setuptools.command.build_ext import build_ext

    tree = _build_tree(tmp_path)
    (tree / "build" / "lib" / "tofu_kernels").mkdir(parents=True)
    seen = []

    class Step(build_ext):
        def run(self):  # the build step: nothing recorded as built while it runs
            seen.append([rec["cuda_extension"] for rec in _records(tree)])

    setup_py = runpy.run_path(str(tree / "setup.py"), run_name="tofu_setup")
    setup_py["_record"](False, "the build did not finish", str(tree))
    cmd = setup_py["recording"](Step, "built for this test")(Distribution())
    cmd.initialize_options()
    cmd.build_lib, cmd.inplace = str(tree / "build" / "lib"), 0
    cmd.run()
    assert seen == [["not built"]]
    assert _records(tree) == [{"cuda_extension": "built", "reason": "built for this test"}] * 2


def test_an_isolated_build_says_so_not_install_torch(monkeypatch):
    """pip's default build (`pip install .`) is isolated: its record says that, not 'install
    torch first' where torch may well be installed (a new user's reading)."""
    setup = _setup_py()
    monkeypatch.setattr(
        setup["sys"], "path", ["/tmp/pip-build-env-abc/overlay/lib/python3.12/site-packages"]
    )
    assert setup["isolated_build"]()
    msg = setup["cannot_build"](None, "No module named 'torch'", "/usr/local/cuda", isolated=True)
    assert (
        "pip built the package in an isolated environment (its default, `pip install .`)" in msg
    ), msg
    assert "install torch first" not in msg and msg.endswith(
        "2. pip install --no-build-isolation ."
    ), msg


def test_extension_status_without_a_compiled_extension(tmp_path, monkeypatch):
    """A package without _C (an isolated build replaced the extension) says so in plain words,
    with its build record, not Python's 'partially initialized module (circular import)'."""
    import json

    from tofu_kernels import extension

    pkg = tmp_path / "tofu_kernels"
    pkg.mkdir()
    (pkg / "_build_info.json").write_text(
        json.dumps({"cuda_extension": "not built", "reason": "REASON"})
    )
    monkeypatch.setattr(extension, "__file__", str(pkg / "extension.py"))
    monkeypatch.setattr(extension, "EXTENSION", None)
    monkeypatch.setattr(
        extension,
        "EXTENSION_ERROR",
        ImportError(
            "cannot import name '_C' from partially initialized module 'tofu_kernels' (most likely due to a circular "
            "import)"
        ),
    )
    status = extension.extension_status()
    assert status.startswith(
        f"not loaded: no compiled extension in this package (no _C file); "
        f"tofu_kernels imported from {pkg}"
    ), status
    assert "circular" not in status and "its build did not build the extension: REASON" in status, (
        status
    )
