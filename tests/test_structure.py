"""The package's architecture, held by tests: backends as registered objects of one
interface, one spec per GPU op, one parameter object, the public signatures, the defaults
written once, imports in one direction (layers, no cycles), a fast path that never imports
the fp64 spec, one orchestration core, no private imports between modules, and launch
constants defined once per language and tied together. Nothing here counts call sites or
strings: each test names a rule of the layout (docs/design.md, "Layout")."""

from __future__ import annotations

import ast
import inspect
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tofu_kernels as tk
from tofu_kernels import params as P
from tofu_kernels.backends import REGISTRY, Backend, get_backend

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "tofu_kernels"


def test_backends_are_registered_objects_of_one_interface():
    """Every backend name a user can pass is one registered instance of the Backend base
    class (its abstract methods implemented, or it could not be instantiated), made in its
    own module; dispatch returns that object."""
    assert set(REGISTRY) == set(P.BACKENDS) - {"auto"}
    for name, backend in REGISTRY.items():
        assert isinstance(backend, Backend) and backend.name == name
        assert type(backend).__module__ == f"tofu_kernels.backends.{name}_backend"
        ok, why = backend.available(torch.device("cpu"))
        assert ok == (
            name == "torch" or (name == "triton" and os.environ.get("TRITON_INTERPRET") == "1")
        ), why
    assert get_backend("torch", torch.device("cpu")) is REGISTRY["torch"]
    assert get_backend("auto", torch.device("cpu")) is REGISTRY["torch"]


def test_dispatch_names_no_modules():
    """No backend is found by a module-name string or re-exported from a module of bound
    functions: the backends package imports its modules, and none of them uses importlib."""
    for path in (PKG / "backends").glob("*.py"):
        tree = ast.parse(path.read_text())
        assert "importlib" not in {n.split(".")[0] for n in _imported_modules(path)}, path.name
        for node in ast.walk(tree):  # no module-level "row_stats = adaptor.row_stats"
            if isinstance(node, ast.Assign) and node in tree.body:
                for t in node.targets:
                    names = [
                        e.id
                        for e in (t.elts if isinstance(t, ast.Tuple) else [t])
                        if isinstance(e, ast.Name)
                    ]
                    assert not set(names) & {
                        "row_stats",
                        "epilogue",
                        "grad",
                        "grad_in_forward",
                        "rescale",
                    }, path.name


def test_public_functions_are_keyword_only_after_labels_in_one_order():
    single = inspect.signature(tk.tofu_loss).parameters
    parallel = inspect.signature(tk.vocab_parallel_tofu_loss).parameters
    for sig in (single, parallel):
        kinds = [p.kind for p in sig.values()]
        assert kinds[:2] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 2
        assert all(k == inspect.Parameter.KEYWORD_ONLY for k in kinds[2:])
    shared = [n for n in list(single)[2:] if n in parallel]
    assert shared == [n for n in list(parallel)[2:] if n in single], (
        "shared keywords in different orders"
    )
    assert shared == [
        "gamma",
        "beta",
        "ignore_index",
        "reduction",
        "backend",
        "inplace_backward",
        "return_ce",
        "return_metrics",
        "check_inputs",
    ]
    # the fused linear functions: three positional inputs, then the same keywords in the same order
    for fn in (tk.linear_tofu_loss, tk.vocab_parallel_linear_tofu_loss):
        sig = inspect.signature(fn).parameters
        kinds = [p.kind for p in sig.values()]
        assert kinds[:3] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 3
        assert all(k == inspect.Parameter.KEYWORD_ONLY for k in kinds[3:])
        assert [n for n in list(sig)[3:] if n in single] == [
            n for n in shared if n != "inplace_backward"
        ]
    assert [
        n for n in inspect.signature(tk.vocab_parallel_linear_tofu_loss).parameters if n in parallel
    ][-3:] == ["group", "vocab_start", "vocab_end"]
    x, y = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError):
        tk.tofu_loss(x, y, 3.0)  # a positional gamma is refused, not misread
    with pytest.raises(TypeError):
        tk.vocab_parallel_tofu_loss(x, y, 3.0)


def test_defaults_are_written_once():
    defaults = {
        "gamma": P.DEFAULT_GAMMA,
        "beta": P.DEFAULT_BETA,
        "ignore_index": P.DEFAULT_IGNORE_INDEX,
    }
    for fn in (
        tk.tofu_loss,
        tk.vocab_parallel_tofu_loss,
        tk.TOFULoss,
        tk.tofu_loss_reference,
        tk.authors_tofu_loss,
        tk.linear_tofu_loss,
        tk.vocab_parallel_linear_tofu_loss,
        tk.LinearTOFULoss,
    ):
        sig = inspect.signature(fn).parameters
        for name, value in defaults.items():
            assert sig[name].default == value, (fn.__name__, name)
    fields = {f: getattr(P.TOFUParams(), f) for f in defaults}
    assert fields == defaults
    # the literals themselves appear in params.py only
    for path in PKG.rglob("*.py"):
        if path.name == "params.py":
            continue
        text = path.read_text()
        for literal in ("= 3.0", "= 0.8", "= -100"):
            assert literal not in text, f"{path.relative_to(ROOT)} writes a default ({literal!r})"


def test_megatron_flags_use_the_same_defaults_and_rule():
    pytest.importorskip("megatron.core", reason="megatron-core is installed by make test")
    import argparse

    import megatron_patch

    args = megatron_patch.add_arguments(argparse.ArgumentParser()).parse_args([])
    assert (args.tofu_gamma, args.tofu_beta) == (P.DEFAULT_GAMMA, P.DEFAULT_BETA)
    sig = inspect.signature(megatron_patch.apply).parameters
    assert (sig["gamma"].default, sig["beta"].default) == (P.DEFAULT_GAMMA, P.DEFAULT_BETA)
    parser = megatron_patch.add_arguments(argparse.ArgumentParser(exit_on_error=False))
    for flag, bad in (
        ("--tofu-gamma", "-0.5"),
        ("--tofu-gamma", "nan"),
        ("--tofu-beta", "0"),
        ("--tofu-beta", "inf"),
    ):
        with pytest.raises(argparse.ArgumentError, match="must be a finite number"):
            parser.parse_args([flag, bad])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(gamma=math.inf), ValueError, "gamma"),
        (dict(gamma=True), ValueError, "gamma"),
        (dict(beta=-0.0), ValueError, "beta"),
        (dict(ignore_index=1.5), TypeError, "ignore_index"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(backend="xla"), ValueError, "backend"),
    ],
)
def test_params_validate_once_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        P.TOFUParams(**kwargs)
    with pytest.raises(dataclasses_frozen_error()):
        P.TOFUParams().gamma = 1.0


def dataclasses_frozen_error():
    import dataclasses

    return dataclasses.FrozenInstanceError


def _imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add(("." * node.level) + (node.module or ""))
            names.update(("." * node.level) + a.name for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def _package_import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports (relative imports, at any depth of the file:
    lazy imports inside functions count), by dotted name below the package."""

    def module_of(path: Path) -> str:
        parts = path.relative_to(package).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {module_of(p): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        base = name.split(".") if path.name == "__init__.py" and name else name.split(".")[:-1]
        base = [b for b in base if b]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.ImportFrom) and node.level > 0):
                continue
            anchor = base[: len(base) - (node.level - 1)] if node.level > 1 else base
            stem = anchor + (node.module.split(".") if node.module else [])
            for alias in node.names:  # "from . import x" may name a module
                if alias.name == "_C" and not node.module:
                    continue  # the compiled CUDA extension: no Python source, imports nothing back
                for cand in (".".join(stem + [alias.name]), ".".join(stem)):
                    if cand in modules and cand != name:
                        targets.add(cand)
                        break
        graph[name] = targets
    return graph


@pytest.mark.parametrize("package", ["tofu_kernels", "megatron_patch"])
def test_no_import_cycles(package):
    """The modules form layers: no module imports (even lazily) one that imports it back."""
    graph = _package_import_graph(ROOT / package)
    assert sum(map(len, graph.values())) > 5  # the graph was read
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError(
                    f"import cycle: {' -> '.join(stack[stack.index(nxt) :] + [nxt])}"
                )
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_fast_path_never_imports_the_reference():
    """reference.py is the fp64 oracle: kernels, backends, autograd and TP code do not use it."""
    for path in PKG.rglob("*.py"):
        if path.name in ("__init__.py", "reference.py") and path.parent == PKG:
            continue  # the package root re-exports the reference for users
        assert not any(n.endswith("reference") for n in _imported_modules(path)), path.relative_to(
            ROOT
        )


# ----------------------------------------------------------------- defaults: no literal copies

DEFAULT_NAMES = {
    "gamma": P.DEFAULT_GAMMA,
    "beta": P.DEFAULT_BETA,
    "ignore_index": P.DEFAULT_IGNORE_INDEX,
    "ignore-index": P.DEFAULT_IGNORE_INDEX,
}


def _number(node: ast.AST):
    try:
        v = ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None
    return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _named_values(node: ast.AST):
    """(name, value node) pairs a default could be written as: a keyword argument, an
    assignment (tuples element by element; attributes by their last name), a parameter
    default, a dict entry with a string key, and argparse's ``add_argument("--tofu-gamma",
    default=...)`` (the option string names the value)."""
    if isinstance(node, ast.keyword) and node.arg:
        yield node.arg, node.value
    elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
        for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
            targets, values = [target], [node.value]
            if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                targets, values = target.elts, node.value.elts
            for t, v in zip(targets, values):
                name = (
                    t.id
                    if isinstance(t, ast.Name)
                    else t.attr
                    if isinstance(t, ast.Attribute)
                    else None
                )
                if name:
                    yield name, v
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        a = node.args
        positional = a.posonlyargs + a.args
        yield from (
            (arg.arg, d)
            for arg, d in zip(positional[len(positional) - len(a.defaults) :], a.defaults)
        )
        yield from ((arg.arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None)
    elif isinstance(node, ast.Dict):
        yield from (
            (k.value, v)
            for k, v in zip(node.keys, node.values)
            if isinstance(k, ast.Constant) and isinstance(k.value, str)
        )
    if isinstance(node, ast.Call):
        labels = [
            a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)
        ]
        for kw in node.keywords:
            if kw.arg == "default":
                yield from ((label, kw.value) for label in labels)


def default_literals(source: str) -> list[tuple[int, str]]:
    """Where ``source``'s code (not its docstrings) writes gamma, beta or ignore_index's
    default value as a number, in any spelling (``3``, ``3.0``, ``3e0``, ``.8``, ``0.80``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        for name, value in _named_values(node):
            for key, default in DEFAULT_NAMES.items():
                if key in name.lower() and _number(value) == default:
                    found.append((getattr(node, "lineno", getattr(value, "lineno", 0)), name))
    return found


@pytest.mark.parametrize(
    "src",
    [
        "f(gamma=3)",
        "f(x, gamma=3.0)",
        "gamma = 3.0",
        "f(beta=.8)",
        "def f(beta: float = 0.80): pass",
        "def f(*, gamma=3e0): pass",
        "x = {'beta': 8e-1}",
        "self.tofu_gamma = 3.",
        "GAMMA, BETA = 3, 0.8",
        "def f(ignore_index=-100): pass",
        "p.add_argument('--tofu-gamma', type=float, default=3.0)",
        "cfg.beta: float = 0.8",
    ],
)
def test_default_literal_detector_catches_every_spelling(src):
    assert default_literals(src), src


@pytest.mark.parametrize(
    "src",
    [
        "f(gamma=DEFAULT_GAMMA)",
        "f(gamma=0.0, beta=1.0)",
        "x = 3.0",
        "f(beta=0.5)",
        '"""tofu_loss(gamma=3.0)"""',
        "p.add_argument('--tofu-gamma', default=DEFAULT_GAMMA)",
    ],
)
def test_default_literal_detector_passes_other_code(src):
    assert not default_literals(src), src


def test_default_values_are_written_in_params_only():
    """gamma=3.0, beta=0.8, ignore_index=-100 as literals in the shipped code: params.py only
    (everything else names DEFAULT_GAMMA / DEFAULT_BETA / DEFAULT_IGNORE_INDEX)."""
    for path in sorted([*PKG.rglob("*.py"), *(ROOT / "megatron_patch").rglob("*.py")]):
        if path == PKG / "params.py":
            continue
        assert not default_literals(path.read_text()), f"{path.relative_to(ROOT)} writes a default"


# ----------------------------------------------------------------- one core, one caller each


def _calls(name: str) -> list[str]:
    """``file:function`` of every call of ``name`` (as a bare name or an attribute) in the package."""
    where = []
    for path in sorted(PKG.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Call):
                    f = node.func
                    if (isinstance(f, ast.Name) and f.id == name) or (
                        isinstance(f, ast.Attribute) and f.attr == name
                    ):
                        where.append(f"{path.relative_to(PKG)}:{fn.name}")
    return where


@pytest.mark.parametrize(
    "name",
    [
        "all_gather_stats",  # the one collective
        "check_shards",
        "exchange_meta",  # the checked calls' 16-byte metadata exchange
        "host_checks_allowed",  # whether host-synchronising checks run
        "meta_record",
        "get_backend",
        "resolve",
        "dense_layout",
    ],
)
def test_orchestration_steps_are_called_from_the_core_only(name):
    """One core: the steps every entry point shares are taken in core.py, nowhere else."""
    callers = {c.split(":")[0] for c in _calls(name)}
    assert callers == {"core.py"}, (name, callers)


def test_backends_are_reached_through_the_core_only():
    """The entry points (loss, linear, the framework glue) hand a Plan to the core; only the
    core calls a backend's methods (``backend.<method>`` or ``p.backend.<method>``)."""
    methods = {"row_stats", "epilogue", "grad", "grad_in_forward", "rescale"}
    for path in sorted(PKG.rglob("*.py")):
        if path.parent.name == "backends" or path.name == "core.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in methods
                and isinstance(node.func.value, ast.Attribute)
                and node.func.value.attr == "backend"
            ):
                raise AssertionError(
                    f"{path.relative_to(ROOT)}:{node.lineno} calls a backend directly"
                )


# The layers, lowest first: a module imports only from its own layer or lower ones.
LAYERS = [
    {"params", "records", "layout", "checks", "tofu_math", "extension", "reference", "patching"},
    {
        "backends",
        "backends.base",
        "backends.gpu",
        "backends.triton_kernels",
        "backends.triton_backend",
        "backends.cuda_backend",
        "backends.torch_backend",
    },
    {"vocab_parallel"},
    {"core"},
    {"loss", "linear"},
    {"hf", "hf.forward", "hf.trainer", "automodel", "axolotl", "torchtitan"},
    {""},  # the package root: re-exports
]


def test_imports_go_one_way_down_the_layers():
    graph = _package_import_graph(PKG)
    assert set(graph) == set().union(*LAYERS), set(graph) ^ set().union(*LAYERS)
    level = {m: i for i, layer in enumerate(LAYERS) for m in layer}
    for module, targets in graph.items():
        up = sorted(t for t in targets if level[t] > level[module])
        assert not up, f"{module or 'tofu_kernels'} imports {up} from a higher layer"


# megatron_patch, lowest first: the loss and the fused output step read what apply() stored
# (settings) and report through reporting; nothing calls back up (no callbacks handed down).
MEGATRON_LAYERS = [
    {"once", "settings"},
    {"reporting"},
    {"fused_linear"},
    {"patch"},
    {"arguments"},
    {"launch", ""},
]


def test_megatron_patch_imports_go_one_way():
    graph = _package_import_graph(ROOT / "megatron_patch")
    assert set(graph) == set().union(*MEGATRON_LAYERS), set(graph) ^ set().union(*MEGATRON_LAYERS)
    level = {m: i for i, layer in enumerate(MEGATRON_LAYERS) for m in layer}
    for module, targets in graph.items():
        up = sorted(t for t in targets if level[t] >= level[module] and t != module)
        assert not up, f"megatron_patch.{module or '__init__'} imports {up} from its layer or above"
    # nothing handed down to be called back: the fused step reads settings, reports itself
    from megatron_patch import fused_linear

    assert not inspect.signature(fused_linear.install).parameters


def test_one_monkeypatch_idiom():
    """The glue replaces framework attributes only through tofu_kernels.patching (no marker
    attributes, no hand-kept originals)."""
    files = [*(ROOT / "megatron_patch").rglob("*.py"), *(PKG / "hf").rglob("*.py")]
    for path in files:
        text = path.read_text()
        for old in ("_tofu_patched", "_tofu_installed", "_tofu_hook_original", "_State.original"):
            assert old not in text, f"{path.relative_to(ROOT)} keeps its own idiom ({old})"
    users = {p.relative_to(ROOT).as_posix() for p in files if "patching" in p.read_text()}
    assert {
        "megatron_patch/patch.py",
        "megatron_patch/reporting.py",
        "megatron_patch/arguments.py",
        "megatron_patch/fused_linear.py",
        "tofu_kernels/hf/forward.py",
    } <= users


def _private_imports(path: Path) -> list[str]:
    """Names starting with ``_`` imported from another module of the package (a private
    module itself, like ``_inputs`` or the extension ``_C``, may be imported)."""
    bad = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            base = path.parent
            for _ in range(node.level - 1):
                base = base.parent
            if node.module:
                base = base.joinpath(*node.module.split("."))
            for alias in node.names:
                is_module = (
                    (base / f"{alias.name}.py").exists()
                    or (base / alias.name).is_dir()
                    or alias.name == "_C"
                )
                if alias.name.startswith("_") and not is_module:
                    bad.append(f"from {'.' * node.level}{node.module or ''} import {alias.name}")
    return bad


def test_no_private_imports_between_modules():
    for path in sorted(PKG.rglob("*.py")):
        assert not _private_imports(path), (path.relative_to(ROOT), _private_imports(path))


def test_loss_and_linear_are_siblings_over_the_core():
    """The linear loss does not borrow from the logits loss (nor the other way round): both
    call the core."""
    for path, other in ((PKG / "linear.py", "loss"), (PKG / "loss.py", "linear")):
        imported = _imported_modules(path)
        assert not any(n in (f".{other}", f"tofu_kernels.{other}") for n in imported), (
            path.name,
            imported,
        )
        assert ".core" in imported or "core" in imported


# ----------------------------------------------------------------- launch constants, once per language


def _header_constants() -> dict[str, int]:
    header = (ROOT / "csrc" / "tofu_kernels.h").read_text()
    return {
        name: int(value)
        for name, value in re.findall(r"constexpr\s+\w+\s+(k\w+)\s*=\s*(\d+);", header)
    }


def test_launch_constants_tied_to_the_header():
    """csrc/tofu_kernels.h defines the launch constants; Python reads them from the extension
    where it is built, and its defaults for elsewhere equal the header's values."""
    from tofu_kernels.backends import gpu, triton_backend
    from tofu_kernels.extension import EXTENSION

    header = _header_constants()
    cxx = {
        "TILE_COLS": "kTileCols",
        "TARGET_BLOCKS": "kTargetBlocks",
        "EPILOGUE_THREADS": "kEpilogueThreads",
        "RESCALE_BLOCKS": "kRescaleBlocks",
    }
    assert set(gpu.HEADER_DEFAULTS) == set(cxx)
    for name, value in gpu.HEADER_DEFAULTS.items():
        assert header[cxx[name]] == value, name
        expect = getattr(EXTENSION, name) if EXTENSION is not None else value
        assert getattr(gpu, name) == expect, name
    # the Triton launch policy is the same constants, not copies of them
    assert triton_backend.TILE_COLS == gpu.TILE_COLS
    assert (
        triton_backend.TARGET_BLOCKS,
        triton_backend.EPILOGUE_THREADS,
        triton_backend.RESCALE_BLOCKS,
    ) == (gpu.TARGET_BLOCKS, gpu.EPILOGUE_THREADS, gpu.RESCALE_BLOCKS)
    source = (PKG / "backends" / "triton_backend.py").read_text()
    for name in gpu.HEADER_DEFAULTS:  # one name each: gpu.py's
        assert re.search(rf"^{name} = gpu\.{name}$", source, re.M), (
            f"triton_backend.{name} is not read from gpu.py"
        )


def test_gpu_ops_have_one_spec():
    """Each GPU op's schema is written once (gpu.OPS): the Triton op and, where the extension
    is built, the CUDA op are registered with exactly it; the C++ registers kernels only (no
    schema of its own); every op has its contract (the fake) and a Triton body."""
    from tofu_kernels.backends import gpu, triton_backend

    assert set(triton_backend.OPS) == set(gpu.OPS) == set(REGISTRY["cuda"].ops)
    for name, op in gpu.OPS.items():
        triton = getattr(torch.ops.tofu_kernels, f"triton_{name}").default._schema
        assert str(triton) == f"tofu_kernels::triton_{name}{op.schema}", name
        if tk.extension_loaded():
            assert (
                str(getattr(torch.ops.tofu_kernels, name).default._schema)
                == f"tofu_kernels::{name}{op.schema}"
            )
    cpp = (ROOT / "csrc" / "tofu_ops.cpp").read_text()
    assert "TORCH_LIBRARY(" not in cpp and "m.def(" not in cpp, (
        "csrc/tofu_ops.cpp defines a schema of its own"
    )
    assert sorted(re.findall(r'm\.impl\("(\w+)"', cpp)) == sorted(gpu.OPS)


def test_cuda_kernel_signatures_are_checked_against_the_spec(tmp_path):
    """torch refuses a C++ kernel whose signature disagrees with its op's schema: loading the
    extension alone and defining each op with one argument's type changed is refused, the
    spec itself is accepted (so a drift between csrc/tofu_ops.cpp and gpu.OPS fails at import)."""
    if not tk.extension_loaded():
        pytest.skip(f"the CUDA extension is not built here: {tk.extension_status()}")
    from tofu_kernels import _C
    from tofu_kernels.backends import gpu

    script = tmp_path / "check.py"
    script.write_text("""
import json, sys, torch
path, specs = sys.argv[1], json.loads(sys.argv[2])
torch.ops.load_library(path)
lib = torch.library.Library("tofu_kernels", "FRAGMENT")
for name, schema in specs.items():
    wrong = schema.replace("int ", "float ", 1) if "int " in schema else schema.replace("float ", "int ", 1)
    try:
        lib.define(name + wrong)
    except RuntimeError as e:
        assert "doesn't match the expected function schema" in str(e), e
    else:
        raise SystemExit(f"{name}: a wrong schema was accepted")
    lib2 = torch.library.Library("tofu_kernels", "FRAGMENT")
    lib2.define(name + schema)
print("checked", len(specs))
""")
    specs = {name: op.schema for name, op in gpu.OPS.items()}
    out = subprocess.run(
        [sys.executable, str(script), _C.__file__, json.dumps(specs)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and f"checked {len(specs)}" in out.stdout, out.stdout + out.stderr


def test_hugging_face_paths_share_one_forward():
    """TOFUSFTTrainer reaches the loss only through the model's forward (apply_tofu's, with
    tofu_metrics=True), that forward only through lm_head's own call (where the data-parallel
    wrappers present the weight), and that only through the fused linear loss: one mechanism,
    in hf/forward.py. (The other frameworks' glue hands its ready settings to the same
    loss_of_hidden.)"""
    assert {c.split(":")[0] for c in _calls("loss_of_hidden")} == {
        "hf/forward.py",
        "linear.py",
        "automodel.py",
        "torchtitan.py",
    }
    assert {c.split(":")[0] for c in _calls("on_hidden")} == {"hf/forward.py"}
    trainer = _imported_modules(PKG / "hf" / "trainer.py")
    assert ".forward" in trainer and not {
        n for n in trainer if n.endswith("linear") or n.endswith("core")
    }
    asks = [
        k
        for node in ast.walk(ast.parse((PKG / "hf" / "trainer.py").read_text()))
        if isinstance(node, ast.Call)
        for k in node.keywords
        if k.arg == "tofu_metrics"
    ]
    assert asks and all(isinstance(k.value, ast.Constant) and k.value.value is True for k in asks)
    assert {c.split(":")[0] for c in _calls("apply_tofu")} == {
        "hf/trainer.py",
        "axolotl.py",
    }  # + Axolotl's hook


def test_metrics_math_written_once_per_language():
    """The entropy and top-1 rules: tofu_math.row_metrics (torch), triton_kernels._metrics,
    tofu::row_metrics in the CUDA header (csrc/tofu_math.cuh, which the host harness tests):
    the kernels call the rule, none derives the entropy itself."""
    assert {c.split(":")[0] for c in _calls("row_metrics")} == {"backends/torch_backend.py"}
    assert {c.split(":")[0] for c in _calls("_metrics")} == {"backends/triton_kernels.py"}
    assert "row_metrics(" in (ROOT / "csrc" / "tofu_math.cuh").read_text()
    cu = (ROOT / "csrc" / "tofu_kernels.cu").read_text()
    assert "row_metrics(" in cu and "logf(st.s1)" not in cu and "logf(s1)" not in cu
