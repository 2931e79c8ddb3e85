"""`pip install .` without a CUDA toolkit yields a working pure-Python package."""

import os
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


def test_forced_build_without_toolkit_fails_with_reason(tmp_path):
    build = _pip_wheel(tmp_path, CUDA_HOME=str(tmp_path / "no-toolkit"), TOFU_BUILD_CUDA="1")
    assert build.returncode != 0
    assert "TOFU_BUILD_CUDA=1 but the CUDA extension cannot be built" in build.stdout + build.stderr
