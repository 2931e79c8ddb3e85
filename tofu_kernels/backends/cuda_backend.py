"""CUDA C++ backend: loads the compiled extension ``tofu_kernels._C``.

Importing this module raises ImportError (with the fix) when the extension was not
built, which the dispatch turns into a clear "backend 'cuda' is unavailable" error.
"""

from __future__ import annotations

try:
    from .. import _C  # noqa: F401
except ImportError as e:
    raise ImportError(
        "the CUDA extension tofu_kernels._C is not built; install from source on a "
        "machine with nvcc and a CUDA build of torch: "
        "pip install --no-build-isolation .  (see README, 'Install')"
    ) from e
