"""What the README and the docs pages tell users to run, runs.

The pages are README.md and every docs/*.md (readme.pages()). Every ```python block of a
page is either run here, in a fresh interpreter on the CPU (with a prelude where the block
is a fragment, and with the GPU sizes shrunk by the replacements listed below), or marked
as not runnable here by an HTML comment right before its fence, which a reader of the
rendered page does not see (`<!-- not run here: tests/<file>.py::<twin test> (why) -->`),
naming a twin test that runs its part. Every shell command of a ```bash block is either run
by a named test or listed with the reason it cannot run here. A block or command the tables
below do not know fails the test: no page can drift from what is run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import readme
from tests.support.megatron_lm import TINY

ROOT = readme.ROOT

_HF_PRELUDE = """
import torch, transformers, trl
from datasets import Dataset
from tests.support.checkout import load_script
tiny_model_and_tokenizer = load_script("examples/hf_sft.py").tiny_model_and_tokenizer
from tofu_kernels.hf import apply_tofu, revert_tofu, tofu_loss_func
model, tokenizer = tiny_model_and_tokenizer()
texts = [" ".join(f"w{(3 * i + j) % 40}" for j in range(12)) for i in range(16)]
dataset = Dataset.from_dict({"text": texts})
tokens = dataset.map(lambda r: tokenizer(r["text"]), remove_columns=["text"])
collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
args = transformers.TrainingArguments(output_dir="out", max_steps=2, per_device_train_batch_size=4, report_to=[],
                                      save_strategy="no", disable_tqdm=True, use_cpu=True)
"""

# How each runnable block runs here: keyed by a line of the block. "replace": the GPU
# example's device and sizes, shrunk for the CPU (each must be found in the block);
# "prelude": what a fragment takes from the surrounding text.
RUN = {
    "logits = torch.randn(8, 1024, 32000": {
        "replace": {
            'device="cuda"': 'device="cpu"',
            "8, 1024, 32000": "2, 16, 320",
            "(8, 1024)": "(2, 16)",
            "randint(0, 32000": "randint(0, 320",
            "[:, :100]": "[:, :4]",
        },
    },
    "hidden = torch.randn(8192, 4096": {
        "prelude": "import torch\nimport tofu_kernels as tk\n",
        "replace": {
            'device="cuda"': 'device="cpu"',
            "8192, 4096": "64, 32",
            "128256, 4096": "500, 32",
            "randint(0, 128256, (8192,)": "randint(0, 500, (64,)",
        },
    },
    "per_token = tk.vocab_parallel_tofu_loss(logits_shard": {
        # one process, no process group: the same call without communication
        "prelude": (
            "import torch\nimport tofu_kernels as tk\nlogits_shard = torch.randn(6, 50)\n"
            "labels = torch.randint(0, 50, (6,))\ntp_group = None\n"
        ),
    },
    "compute_loss_func=tofu_loss_func(gamma=3.0, beta=0.8)": {
        "prelude": _HF_PRELUDE,
        "replace": {
            'trl.SFTConfig(output_dir="out")': 'trl.SFTConfig(output_dir="out", use_cpu=True)'
        },  # bf16 default
    },
    "apply_tofu(model, gamma=3.0, beta=0.8, fused_linear=True)": {"prelude": _HF_PRELUDE},
    "tofu_beta=0.8)   # the paper's values (and the defaults)": {  # runs as written on a CPU, two steps
        "prelude": _HF_PRELUDE,
        "replace": {
            "use_cpu=not torch.cuda.is_available())": "use_cpu=not torch.cuda.is_available(), max_steps=2)"
        },
        "after": "assert trainer.state.global_step == 2\n",
    },
    'megatron_patch.apply(loss_type="tofu", gamma=3.0, beta=0.8, backend="auto")': {
        # Megatron-LM's parser reads sys.argv: a tiny model's flags and the TOFU flags
        "prelude": f"import sys\nsys.argv = ['pretrain_gpt.py', *{TINY!r}, '--loss-type', 'tofu']\n",
        "after": (
            "assert megatron_patch.is_applied() and megatron_patch.tofu_params().gamma == 3.0\n"
            "megatron_patch.revert()\n"
        ),
    },
}

# Blocks that cannot run here: the page marks them with an HTML comment on the line before
# the fence, naming the twin test that runs the part that is ours. User code carries no
# such bookkeeping (OLD_MARK).
NOT_HERE_MARK = re.compile(r"^<!-- not run here: (tests/\S+\.py)::(\w+)\b.*-->$")
OLD_MARK = "not run by this repository's tests"
NOT_HERE = {
    "AutoBridge.import_ckpt(": "tests/megatron/test_megatron_sft.py::test_a_provider_built_model_trains_tofu",
    "from megatron.bridge.recipes.llama import llama31_8b_sft_config": "tests/megatron/test_megatron_sft.py::test_a_provider_built_model_trains_tofu",
    'bnb_4bit_quant_type="nf4"': "tests/hf/test_hf_trainer.py::test_lora_adapter_gradients_equal_fp64",
}

# Shell commands: the test that runs each (its flags, its script), or why it cannot run here.
COMMANDS = {
    "make demo": "tests/docs/test_demo.py (the demo's code path, shortened; make demo itself takes 5 minutes)",
    "make test": "CI (.ci/run runs it)",
    "make test-fast": "a selection of this suite, which CI runs whole (tests/README.md)",
    "make study": "tests/docs/test_study.py (the study's code path on a tiny grid; make study itself takes ~15 CPU-minutes per rank)",
    "make bench": "tests/docs/test_bench_smoke.py",
    "pip install --no-build-isolation .": "tests/docs/test_install.py (pip builds this checkout; the CI venv installs it so)",
    "pip install .": "tests/docs/test_install.py",
    "pip install setuptools wheel torch": "CI installs these from requirements-dev.txt before the package",
    'pip install --no-build-isolation ".[megatron]"': "CI installs these pins from requirements-dev.txt",
    'pip install --no-build-isolation ".[trl]"': "CI installs these pins from requirements-dev.txt",
    "torchrun --nproc-per-node 8 -m megatron_patch.launch pretrain_gpt.py": "GPUs (the launcher on Megatron-LM's pretrain_gpt.py, CPU: tests/megatron/test_megatron_lm.py)",
    "accelerate launch --multi_gpu --num_processes 8 examples/hf_sft.py": "GPUs (real DDP under accelerate launch --multi_gpu on 2 CPU processes: tests/hf/test_hf_launch.py)",
    "accelerate launch --config_file examples/accelerate/zero3.yaml --deepspeed_config_file": "GPUs (ZeRO-2 under accelerate launch on 2 CPU processes: tests/hf/test_hf_launch.py)",
    "torchrun --nproc-per-node 2 examples/vocab_parallel.py": "tests/docs/test_examples.py::test_vocab_parallel_example_torchrun",
    "torchrun --nproc-per-node 8 examples/vocab_parallel.py --cuda": "GPUs (the CPU twin: tests/docs/test_examples.py)",
    "python examples/hf_sft.py": "tests/docs/test_examples.py::test_hf_sft_example_runs_as_written",
    "python examples/hf_sft.py --lora": "tests/hf/test_hf_trainer.py::test_lora_adapter_gradients_equal_fp64 (the "
    "LoRA path of both trainers, on CPU; the example adds nothing to it)",
    "python examples/hf_sft.py --model Qwen/Qwen3-0.6B": "downloads a checkpoint (tests/docs/test_examples.py runs the tiny one)",
    "export CUDA_DEVICE_MAX_CONNECTIONS=1": "part of the multi-node command",
    "accelerate launch --config_file examples/accelerate/fsdp2.yaml": "GPUs (accelerate selects FSDP only on "
    "accelerators): FSDP2 on CPU in tests/distributed/test_hf_distributed.py",
    "accelerate launch --config_file examples/accelerate/zero3.yaml": "tests/docs/test_examples.py::test_hf_sft_example_under_accelerate_launch_zero3 (the tiny model, 2 CPU processes)",
    "torchrun --nnodes 2": "tests/megatron/test_megatron_sft.py (the command's flags, read from docs/megatron.md, on CPU)",
    "axolotl train examples/axolotl/llama_tofu.yaml": "tests/hf/test_axolotl.py::test_example_yaml_loads_through_axolotls_config_with_the_plugin (the file through "
    "Axolotl's load_cfg on CPU; Axolotl's trainer on a tiny Llama: test_axolotls_trainer_trains_tofu_equal_to_fp64)",
    "torchrun --nproc-per-node 8 -m torchtitan.train --module examples.torchtitan.tofu_llama3": "tests/distributed/test_torchtitan.py::test_example_configs_through_torchtitans_config_manager (the --module "
    "and --config through torchtitan's ConfigManager on CPU; its Trainer needs a GPU)",
}


def _blocks(lang: str) -> list[tuple[Path, str]]:
    return readme.blocks(lang)


def _matching(key: str) -> list[tuple[Path, str]]:
    found = [(page, b) for page, b in _blocks("python") if key in b]
    assert found, (
        f"no python block of {[p.name for p in readme.pages()]} holds {key!r}: update the table"
    )
    return found


def test_every_page_is_read():
    """README.md and every docs page, so that a new page's blocks are covered without a change here."""
    names = {p.relative_to(ROOT).as_posix() for p in readme.pages()}
    assert (
        "README.md" in names
        and {
            "docs/api.md",
            "docs/megatron.md",
            "docs/huggingface.md",
            "docs/study.md",
            "docs/benchmarks.md",
            "docs/design.md",
            "docs/automodel.md",
            "docs/axolotl.md",
            "docs/torchtitan.md",
        }
        <= names
    ), names


def test_readme_is_short_and_install_comes_first():
    """The README is for users: at most 25,000 bytes, and its install block within the first 80 lines."""
    data = readme.README.read_bytes()
    assert len(data) <= 25_000, f"README.md is {len(data)} bytes: move the depth into docs/"
    lines = data.decode().splitlines()
    fence = next(
        i
        for i, line in enumerate(lines)
        if line == "```bash"
        and any(lines[j].startswith("pip install") for j in range(i + 1, lines.index("```", i + 1)))
    )
    assert fence + 1 <= 80, f"the install block starts at line {fence + 1} of README.md"


def test_every_python_block_is_known():
    for page, block in _blocks("python"):
        keys = [k for k in (*RUN, *NOT_HERE) if k in block]
        assert len(keys) == 1, (
            f"a {page.name} python block the tests do not run or know ({keys}):\n{block}"
        )


def test_no_test_bookkeeping_in_user_code():
    for page, block in (*_blocks("python"), *_blocks("bash")):
        assert OLD_MARK not in block, (
            f"{page.name}: mark the block with an HTML comment before its fence:\n{block}"
        )


@pytest.mark.parametrize("key", list(NOT_HERE))
def test_blocks_that_cannot_run_here_say_so_and_have_a_twin(key):
    for page, block in _matching(key):
        text = page.read_text()
        before = text[: text.index("```python\n" + block)].rstrip("\n").rsplit("\n", 1)[-1]
        m = NOT_HERE_MARK.match(before)
        assert m, (
            f"{page.name}: put '<!-- not run here: <twin test> (why) -->' right before the block:\n{block}"
        )
        assert "::".join(m.groups()) == NOT_HERE[key], (page.name, m.groups(), NOT_HERE[key])
        path, name = m.groups()
        assert f"def {name}(" in (ROOT / path).read_text()


@pytest.mark.parametrize("key", list(RUN))
def test_python_block_runs(tmp_path, key):
    how = RUN[key]
    for page, block in _matching(key):
        code = block
        for old, new in how.get("replace", {}).items():
            assert old in code, (
                f"{page.name} block changed: {old!r} not found, update the test's sizes"
            )
            code = code.replace(old, new)
        code = how.get("prelude", "") + code + how.get("after", "")
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
        )
        assert out.returncode == 0, f"{page.name} block failed:\n{code}\n{out.stderr[-3000:]}"


def test_every_shell_command_is_run_or_explained():
    known = sorted(COMMANDS, key=len, reverse=True)  # the longest prefix names the command
    for page, block in _blocks("bash"):
        for argv in readme.commands(block):
            line = " ".join(argv)
            match = next((k for k in known if line.startswith(k)), None)
            assert match is not None, (
                f"a {page.name} command the tests neither run nor explain: {line}"
            )
            where = COMMANDS[match]
            if where.startswith("tests/"):
                path = where.split("::")[0].split(" ")[0]
                assert (ROOT / path).is_file(), where
                if "::" in where:
                    assert (
                        f"def {where.split('::')[1].split(' ')[0]}(" in (ROOT / path).read_text()
                    ), where


# ------------------------------------------------------------ numbers quoted in the README and docs/benchmarks.md

GPU_RESULTS = ROOT / "benchmarks" / "results" / "gpu"
RUN3 = GPU_RESULTS / "2026-11-27b-h100" / "run3_bench" / "bench_loss.md"  # this version's kernels
FIRST = GPU_RESULTS / "2026-11-27-h100" / "bench_loss.md"  # the first version's run, every baseline
# README benchmark table rows -> (results file, implementation as the file names it)
TABLE_ROWS = {
    "**ours, CUDA, TOFU** (gradient in the forward)": (RUN3, "ours-cuda TOFU"),
    "ours, CUDA, TOFU two-pass (Megatron's path)": (RUN3, "ours-cuda TOFU two-pass"),
    "ours, Triton, TOFU": (RUN3, "ours-triton TOFU"),
    "ours, CUDA, CE mode (gamma 0, beta 1)": (RUN3, "ours-cuda CE"),
    "Liger CE": (RUN3, "Liger CE"),
    "TOFU composed of two Liger CE calls": (RUN3, "composed TOFU (Liger CE x2)"),
    "Megatron `vocab_parallel_cross_entropy`": (RUN3, "Megatron vocab_parallel_cross_entropy"),
    "authors' TOFU (PyTorch; first version's run)": (FIRST, "authors TOFU (PyTorch)"),
}


def _md_rows(path) -> dict[tuple[int, int, str], dict[str, str]]:
    """A benchmark markdown table: (N, V, implementation) -> {column: cell}."""
    rows, header = {}, None
    for line in path.read_text().splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == "N":
            header = cells
        elif header and cells[0].isdigit():
            rec = dict(zip(header, cells))
            rows[int(rec["N"]), int(rec["V"]), rec["implementation"]] = rec
    return rows


def _median(cell: str) -> float:
    return float(cell.split()[0])


def test_benchmark_table_is_the_results_files():
    """Every cell of the README's H100 table: the fwd+bwd median, the graph-replayed time
    and the share of copy bandwidth, as the results file has them."""
    text = readme.README.read_text()
    table = text[text.index("| implementation (ms, fwd+bwd) |") :]
    lines = table.split("\n\n")[0].splitlines()
    shapes = [tuple(int(x) for x in c.split(" x ")) for c in lines[0].strip("|").split("|")[1:]]
    files = {path: _md_rows(path) for path, _ in TABLE_ROWS.values()}
    seen = set()
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        path, impl = TABLE_ROWS[cells[0]]
        seen.add(cells[0])
        for (n, v), cell in zip(shapes, cells[1:]):
            rec = files[path][n, v, impl]
            nums = re.findall(r"[\d.]+", cell.replace("**", ""))
            # to the README's two decimals (the file has three)
            assert abs(float(nums[0]) - _median(rec["fwd+bwd ms"])) <= 0.0051, (
                impl,
                n,
                v,
                cell,
                rec["fwd+bwd ms"],
            )
            if "replayed" in cell:
                assert abs(float(nums[1]) - _median(rec["graph fwd+bwd ms"])) <= 0.0051, (
                    impl,
                    n,
                    v,
                    cell,
                )
            if "%" in cell:
                assert f"({rec['copy'].rstrip('%')} %)" in cell, (impl, n, v, cell, rec["copy"])
    assert seen == set(TABLE_ROWS)


def _ratios(path, slow: str, fast: tuple[str, ...], shapes=None) -> list[float]:
    rows = _md_rows(path)
    out = []
    for n, v, impl in rows:
        if impl == slow and (shapes is None or (n, v) in shapes):
            out.append(
                _median(rows[n, v, slow]["fwd+bwd ms"])
                / min(_median(rows[n, v, f]["fwd+bwd ms"]) for f in fast if (n, v, f) in rows)
            )
    return out


def test_speedups_and_step_numbers_are_the_results_files():
    """The speedups under the README's table, and docs/benchmarks.md's Megatron step numbers."""
    text = " ".join(readme.README.read_text().split())
    shapes = {(4096, 16032), (16384, 16032), (16384, 32064), (16384, 128256)}  # the table's
    meg = _ratios(RUN3, "Megatron vocab_parallel_cross_entropy", ("ours-cuda TOFU",), shapes)
    assert (
        f"Ours is {int(min(meg))}-{round(max(meg))}x Megatron's cross entropy in the same run"
        in text
    ), meg
    authors = _ratios(FIRST, "authors TOFU (PyTorch)", ("ours-cuda TOFU", "ours-triton TOFU"))
    assert f"{min(authors):.1f}-{max(authors):.1f}x the authors' loss" in text, authors
    text = " ".join(readme.BENCHMARKS.read_text().split())
    step = (GPU_RESULTS / "2026-11-27b-h100" / "bench_megatron_step.md").read_text()
    native = re.search(r"\| Megatron native CE \| ([\d.]+) .*?\| (\d+) \|", step)
    tofu = re.search(r"\| TOFU \(gamma 3, beta 0.8\) \| ([\d.]+) .*?\| (\d+) \|", step)
    assert (
        f"TOFU took {float(tofu[1]):.1f} ms per step against {float(native[1]):.1f} for Megatron's native "
        f"cross entropy, with {tofu[2]} vs {native[2]} MiB"
    ) in text
    lm = (GPU_RESULTS / "2026-11-27b-h100" / "megatron_lm.md").read_text()
    ms = {
        k: float(v)
        for k, v in re.findall(r"^\| (cross_entropy|tofu) \| 0 \| \d+ \| ([\d.]+) \|", lm, re.M)
    }
    assert f"at {ms['tofu'] / ms['cross_entropy']:.2f}x the cross-entropy step time" in text


# ------------------------------------------------------------ links between the pages


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lowercased, punctuation but '-' and '_' dropped,
    spaces made '-'."""
    return {
        re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
        for h in re.findall(
            r"^#+ (.*)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S), re.M
        )
    }


def test_links_between_pages_resolve():
    """Each fact is written once and linked from elsewhere: every relative link of every page
    names a file that exists and, where it names one, a heading of that file."""
    for page in readme.pages():
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            assert dest.exists(), f"{page.name}: link to a missing file {target}"
            if anchor:
                assert anchor in _anchors(dest), (
                    f"{page.name}: no heading for #{anchor} in {dest.name}"
                )


def test_what_a_new_user_tripped_on_is_answered():
    """The README, read top to bottom by someone with a CPU-only machine: the two ways to
    install are separate blocks (run together, the second undid the first); the PyTorch
    example says what to write without a GPU; make can use an existing environment; the
    test time is written once, in tests/README.md."""
    text = (ROOT / "README.md").read_text()
    install = text.split("## Install", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", install, re.S)
    cuda = [b for b in blocks if "pip install --no-build-isolation ." in b]
    plain = [b for b in blocks if re.search(r"^pip install \.\s*$", b, re.M)]
    assert len(cuda) == 1 and len(plain) == 1 and cuda[0] != plain[0], blocks
    assert "do not run it after the first way" in install
    pytorch = next(
        b for _, b in readme.blocks("python") if "logits = torch.randn(8, 1024, 32000" in b
    )
    assert 'device="cpu"' in pytorch and "torch backend" in pytorch
    assert "make test VENV=" in text and re.search(
        r"^VENV \?= \.venv$", (ROOT / "Makefile").read_text(), re.M
    )
    minutes = re.compile(r"\d+(-\d+)? min(utes)?\b")
    assert not minutes.search(text.split("## The commands", 1)[1].split("\n## ", 1)[0])
    makefile = (ROOT / "Makefile").read_text()
    assert not any(minutes.search(line) for line in makefile.splitlines() if "make test" in line)
    assert re.search(
        r"`make test`: .*about \d+ minutes", (ROOT / "tests" / "README.md").read_text()
    )
