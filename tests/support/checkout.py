"""The checkout the tests run in: its root, and its examples/ and benchmarks/ scripts as modules.

The scripts are written to be run (``python examples/diversity_demo.py``), with their own
folder first on ``sys.path``, so they import their siblings by bare name (``import tiny_sft``).
``load_script`` is the one place the tests import such a script: by its path, with its folder
on ``sys.path`` only while it is imported, never left there for the tests that run after it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
BENCHMARKS = ROOT / "benchmarks"


def load_script(path: str) -> ModuleType:
    """The checkout's script ``path`` (relative to the root, e.g. ``"examples/diversity_demo.py"``)
    as the module its file name names, imported once per process (``sys.modules``, where
    dataclasses and pickle look it up). The siblings it imports are imported from its folder."""
    file = (ROOT / path).resolve()
    name = file.stem
    mod = sys.modules.get(name)
    if mod is not None:
        if Path(getattr(mod, "__file__", "") or "").resolve() != file:
            raise ImportError(
                f"cannot load {path}: a module {name!r} is already imported from {mod.__file__}"
            )
        return mod
    spec = importlib.util.spec_from_file_location(name, file)
    mod = importlib.util.module_from_spec(spec)
    folder = str(file.parent)
    sys.path.insert(0, folder)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        del sys.modules[name]
        raise
    finally:
        sys.path.remove(folder)
    return mod
