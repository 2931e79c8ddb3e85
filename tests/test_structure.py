"""The package's shape, held by tests: the backend interface, one parameter object, the
public signatures, the defaults written once, a fast path that never imports the spec, one
orchestration core (each step called from one place), no private imports between modules,
and launch constants defined once per language and tied together."""

from __future__ import annotations

import ast
import inspect
import math
import re
from pathlib import Path

import pytest
import torch

import tofu_kernels as tk
from tofu_kernels import params as P
from tofu_kernels.backends import Backend, _load

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "tofu_kernels"


@pytest.mark.parametrize("name", ["torch", "triton", "cuda"])
def test_every_backend_implements_the_interface(name):
    mod, why = _load(name)
    if mod is None:
        assert name == "cuda" and not tk.extension_loaded(), why
        pytest.skip(f"the CUDA extension is not built here: {why}")
    assert isinstance(mod, Backend)
    assert mod.NAME == name
    for fn in ("row_stats", "epilogue", "grad", "fused", "rescale"):  # declared, never looked up by getattr
        assert callable(getattr(mod, fn))


def test_public_functions_are_keyword_only_after_labels_in_one_order():
    single = inspect.signature(tk.tofu_loss).parameters
    parallel = inspect.signature(tk.vocab_parallel_tofu_loss).parameters
    for sig in (single, parallel):
        kinds = [p.kind for p in sig.values()]
        assert kinds[:2] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 2
        assert all(k == inspect.Parameter.KEYWORD_ONLY for k in kinds[2:])
    shared = [n for n in list(single)[2:] if n in parallel]
    assert shared == [n for n in list(parallel)[2:] if n in single], "shared keywords in different orders"
    assert shared == ["gamma", "beta", "ignore_index", "reduction", "backend", "inplace_backward",
                      "return_ce", "return_metrics", "check_inputs"]
    # the fused linear functions: three positional inputs, then the same keywords in the same order
    for fn in (tk.linear_tofu_loss, tk.vocab_parallel_linear_tofu_loss):
        sig = inspect.signature(fn).parameters
        kinds = [p.kind for p in sig.values()]
        assert kinds[:3] == [inspect.Parameter.POSITIONAL_OR_KEYWORD] * 3
        assert all(k == inspect.Parameter.KEYWORD_ONLY for k in kinds[3:])
        assert [n for n in list(sig)[3:] if n in single] == [n for n in shared if n != "inplace_backward"]
    assert [n for n in inspect.signature(tk.vocab_parallel_linear_tofu_loss).parameters if n in parallel][-3:] == \
        ["group", "vocab_start", "vocab_end"]
    x, y = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(TypeError):
        tk.tofu_loss(x, y, 3.0)  # a positional gamma is refused, not misread
    with pytest.raises(TypeError):
        tk.vocab_parallel_tofu_loss(x, y, 3.0)


def test_defaults_are_written_once():
    defaults = {"gamma": P.DEFAULT_GAMMA, "beta": P.DEFAULT_BETA, "ignore_index": P.DEFAULT_IGNORE_INDEX}
    for fn in (tk.tofu_loss, tk.vocab_parallel_tofu_loss, tk.TOFULoss, tk.tofu_loss_reference,
               tk.authors_tofu_loss, tk.linear_tofu_loss, tk.vocab_parallel_linear_tofu_loss, tk.LinearTOFULoss):
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
    for flag, bad in (("--tofu-gamma", "-0.5"), ("--tofu-gamma", "nan"), ("--tofu-beta", "0"),
                      ("--tofu-beta", "inf")):
        with pytest.raises(argparse.ArgumentError, match="must be a finite number"):
            parser.parse_args([flag, bad])


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [(dict(gamma=math.inf), ValueError, "gamma"), (dict(gamma=True), ValueError, "gamma"),
     (dict(beta=-0.0), ValueError, "beta"), (dict(ignore_index=1.5), TypeError, "ignore_index"),
     (dict(reduction="avg"), ValueError, "reduction"), (dict(backend="xla"), ValueError, "backend")],
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
            anchor = base[:len(base) - (node.level - 1)] if node.level > 1 else base
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
                raise AssertionError(f"import cycle: {' -> '.join(stack[stack.index(nxt):] + [nxt])}")
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
        assert not any(n.endswith("reference") for n in _imported_modules(path)), path.relative_to(ROOT)


# ----------------------------------------------------------------- defaults: no literal copies

DEFAULT_NAMES = {"gamma": P.DEFAULT_GAMMA, "beta": P.DEFAULT_BETA, "ignore_index": P.DEFAULT_IGNORE_INDEX,
                 "ignore-index": P.DEFAULT_IGNORE_INDEX}


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
                name = t.id if isinstance(t, ast.Name) else t.attr if isinstance(t, ast.Attribute) else None
                if name:
                    yield name, v
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        a = node.args
        positional = a.posonlyargs + a.args
        yield from ((arg.arg, d) for arg, d in zip(positional[len(positional) - len(a.defaults):], a.defaults))
        yield from ((arg.arg, d) for arg, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None)
    elif isinstance(node, ast.Dict):
        yield from ((k.value, v) for k, v in zip(node.keys, node.values)
                    if isinstance(k, ast.Constant) and isinstance(k.value, str))
    if isinstance(node, ast.Call):
        labels = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
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


@pytest.mark.parametrize("src", [
    "f(gamma=3)", "f(x, gamma=3.0)", "gamma = 3.0", "f(beta=.8)", "def f(beta: float = 0.80): pass",
    "def f(*, gamma=3e0): pass", "x = {'beta': 8e-1}", "self.tofu_gamma = 3.", "GAMMA, BETA = 3, 0.8",
    "def f(ignore_index=-100): pass", "p.add_argument('--tofu-gamma', type=float, default=3.0)",
    "cfg.beta: float = 0.8",
])
def test_default_literal_detector_catches_every_spelling(src):
    assert default_literals(src), src


@pytest.mark.parametrize("src", [
    "f(gamma=DEFAULT_GAMMA)", "f(gamma=0.0, beta=1.0)", "x = 3.0", "f(beta=0.5)", '"""tofu_loss(gamma=3.0)"""',
    "p.add_argument('--tofu-gamma', default=DEFAULT_GAMMA)",
])
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
                    if (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name):
                        where.append(f"{path.relative_to(PKG)}:{fn.name}")
    return where


@pytest.mark.parametrize("name,caller", [
    ("all_gather_stats", "core.py:finish"),  # the one collective
    ("check_shards", "core.py:finish"),
    ("exchange_meta", "core.py:finish"),  # the checked calls' 16-byte metadata exchange
    ("host_checks_allowed", "core.py:plan"),  # whether host-synchronising checks run
    ("meta_record", "core.py:chunk_stats"),
    ("_grad_in_forward", "core.py:plan"),  # the rule for the path: gradient in the forward or two passes
    ("get_backend", "core.py:plan"),
    ("resolve", "core.py:plan"),  # this rank's shard and the tensor-parallel group
    ("dense_layout", "core.py:grad_buffer"),  # the gradient's own buffer
])
def test_each_orchestration_step_has_one_caller_in_the_core(name, caller):
    assert _calls(name) == [caller]


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
                is_module = (base / f"{alias.name}.py").exists() or (base / alias.name).is_dir() or alias.name == "_C"
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
        assert not any(n in (f".{other}", f"tofu_kernels.{other}") for n in imported), (path.name, imported)
        assert ".core" in imported or "core" in imported


# ----------------------------------------------------------------- launch constants, once per language


def _header_constants() -> dict[str, int]:
    header = (ROOT / "csrc" / "tofu_kernels.h").read_text()
    return {name: int(value) for name, value in re.findall(r"constexpr\s+\w+\s+(k\w+)\s*=\s*(\d+);", header)}


def test_launch_constants_tied_to_the_header():
    """csrc/tofu_kernels.h defines the launch constants; Python reads them from the extension
    where it is built, and its defaults for elsewhere equal the header's values."""
    from tofu_kernels.backends import gpu, triton_ops

    header = _header_constants()
    cxx = {"TILE_COLS": "kTileCols", "TARGET_BLOCKS": "kTargetBlocks", "EPILOGUE_THREADS": "kEpilogueThreads",
           "RESCALE_BLOCKS": "kRescaleBlocks"}
    assert set(gpu.HEADER_DEFAULTS) == set(cxx)
    for name, value in gpu.HEADER_DEFAULTS.items():
        assert header[cxx[name]] == value, name
        expect = getattr(gpu.EXTENSION, name) if gpu.EXTENSION is not None else value
        assert getattr(gpu, name) == expect, name
    # the Triton launch policy is the same constants, not copies of them
    assert triton_ops.FWD_BLOCK == triton_ops.BWD_BLOCK == gpu.TILE_COLS
    assert (triton_ops.TARGET_PROGRAMS, triton_ops.EPILOGUE_ROWS, triton_ops.RESCALE_PROGRAMS) == (
        gpu.TARGET_BLOCKS, gpu.EPILOGUE_THREADS, gpu.RESCALE_BLOCKS)
    source = (PKG / "backends" / "triton_ops.py").read_text()
    for name in ("FWD_BLOCK", "BWD_BLOCK", "TARGET_PROGRAMS", "EPILOGUE_ROWS", "RESCALE_PROGRAMS"):
        assert re.search(rf"^{name} = gpu\.\w+$", source, re.M), f"triton_ops.{name} is not read from gpu.py"


def test_gpu_ops_share_one_schema_and_one_fake_each():
    """The Triton ops take the CUDA ops' arguments (csrc/tofu_ops.cpp) and every op has its
    own fake (gpu.FAKES), with the schema's arity."""
    from tofu_kernels.backends import gpu

    cpp = (ROOT / "csrc" / "tofu_ops.cpp").read_text()
    schemas = dict(re.findall(r'"(\w+)\((.*?)\) -> \(\)"', " ".join(cpp.replace('"\n      "', "").split())))
    assert set(schemas) == set(gpu.FAKES)
    for name, fake in gpu.FAKES.items():
        cxx_args = [a.split()[-1] for a in schemas[name].split(",")]
        assert list(inspect.signature(fake).parameters) == cxx_args, name
        triton = getattr(torch.ops.tofu_kernels, f"triton_{name}").default._schema
        assert [a.name for a in triton.arguments] == cxx_args, name


def test_hugging_face_paths_share_one_forward():
    """TOFUSFTTrainer reaches the loss only through the model's forward (apply_tofu's, with
    tofu_metrics=True), that forward only through lm_head's own call (_head_forward, where the
    data-parallel wrappers present the weight), and that only through _HFLoss.on_hidden: one
    mechanism."""
    assert [c for c in _calls("loss_of_hidden") if not c.startswith("linear.py:")] == ["hf/models.py:on_hidden"]
    assert _calls("on_hidden") == ["hf/models.py:_head_forward"]
    assert _calls("_HeadCall") == ["hf/models.py:_tofu_forward"]
    trainer = (PKG / "hf" / "trainer.py").read_text()
    assert "tofu_metrics=True" in trainer and "linear_tofu_loss(" not in trainer and "loss_of_hidden" not in trainer
    assert _calls("apply_tofu") == ["hf/trainer.py:__init__"]


def test_metrics_math_written_once_per_language():
    """The entropy and top-1 rules: tofu_math.row_metrics (torch), triton_kernels._metrics,
    tofu::row_metrics (CUDA); the accumulator's merge in combine_stats / _merge / tofu::merge."""
    assert sorted(set(_calls("row_metrics"))) == ["backends/torch_backend.py:epilogue"]
    assert sorted(set(_calls("entropy_terms"))) == ["backends/torch_backend.py:row_stats"]
    assert sorted(set(_calls("_metrics"))) == ["backends/triton_kernels.py:epilogue_kernel",
                                              "backends/triton_kernels.py:fused_kernel"]
    cu = (ROOT / "csrc" / "tofu_kernels.cu").read_text()
    assert cu.count("row_metrics(") == 2 and "logf(st.s1)" not in cu  # both kernels call the header's rule
