"""`pip install .` without a CUDA toolkit yields a working pure-Python package."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pip_wheel(tmp_path, **env):
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path / "wheels"), str(ROOT)],
        capture_output=True, text=True, timeout=600, env={**os.environ, **env}, cwd=tmp_path,
    )


def test_install_without_cuda_toolkit_is_pure_python(tmp_path):
    build = _pip_wheel(tmp_path, CUDA_HOME=str(tmp_path / "no-toolkit"), TOFU_BUILD_CUDA="auto")
    assert build.returncode == 0, build.stderr[-3000:]
    assert "cannot be built: no CUDA toolkit found" in build.stdout + build.stderr
    wheel = next((tmp_path / "wheels").glob("tofu_kernels-*.whl"))
    assert "py3-none-any" in wheel.name, "a pure-Python wheel was expected"
    # Install the wheel into its own folder and import it from there (ahead of this
    # checkout's editable install), with this venv's torch.
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True)
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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert out.returncode == 0 and out.stdout.startswith("ok"), out.stdout + out.stderr[-3000:]

    # The installed package knows why it has no extension (pip shows it only with -v) ...
    status = _status(target, cwd=tmp_path)
    assert f"tofu_kernels imported from {target / 'tofu_kernels'}" in status, status
    assert "its build did not build the extension: the CUDA extension cannot be built: no CUDA toolkit found" in status
    # ... and Python started in a source checkout's root imports the checkout instead: said so.
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT / "tofu_kernels", checkout / "tofu_kernels",
                    ignore=shutil.ignore_patterns("_C*", "_build_info.json", "__pycache__"))
    shutil.copy(ROOT / "setup.py", checkout / "setup.py")
    status = _status(target, cwd=checkout)
    assert f"tofu_kernels imported from {checkout / 'tofu_kernels'}" in status, status
    assert f"this source checkout shadows the installed package in {target}" in status, status


def _status(target, cwd) -> str:
    """tk.extension_status() in a fresh interpreter that finds the package installed in ``target``."""
    code = ("import sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
            "getattr(f, '__module__', '')]; import tofu_kernels as tk; print(tk.extension_status())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip()


def test_forced_build_without_toolkit_fails_with_reason(tmp_path):
    build = _pip_wheel(tmp_path, CUDA_HOME=str(tmp_path / "no-toolkit"), TOFU_BUILD_CUDA="1")
    assert build.returncode != 0
    assert "TOFU_BUILD_CUDA=1 but the CUDA extension cannot be built" in build.stdout + build.stderr
