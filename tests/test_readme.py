"""What the README tells users to run, runs.

Every ```python block of README.md is either run here, in a fresh interpreter on the CPU
(with a prelude where the block is a fragment, and with the GPU sizes shrunk by the
replacements listed below), or marked in the README itself as not runnable here, with a
twin test that runs its part. Every shell command of a ```bash block is either run by a
named test or listed with the reason it cannot run here. A block or command the tables
below do not know fails the test: the README cannot drift from what is run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from . import readme
from .megatron_lm import TINY

ROOT = readme.README.parent

_HF_PRELUDE = """
import sys
sys.path.insert(0, {examples!r})
import torch, transformers, trl
from datasets import Dataset
from hf_sft import tiny_model_and_tokenizer
from tofu_kernels.hf import apply_tofu, revert_tofu, tofu_loss_func
model, tokenizer = tiny_model_and_tokenizer()
texts = [" ".join(f"w{{(3 * i + j) % 40}}" for j in range(12)) for i in range(16)]
dataset = Dataset.from_dict({{"text": texts}})
tokens = dataset.map(lambda r: tokenizer(r["text"]), remove_columns=["text"])
collator = transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
args = transformers.TrainingArguments(output_dir="out", max_steps=2, per_device_train_batch_size=4, report_to=[],
                                      save_strategy="no", disable_tqdm=True, use_cpu=True)
""".format(examples=str(ROOT / "examples"))

# How each runnable block runs here: keyed by a line of the block. "replace": the GPU
# example's device and sizes, shrunk for the CPU (each must be found in the block);
# "prelude": what a fragment takes from the surrounding text.
RUN = {
    "logits = torch.randn(8, 1024, 32000": {
        "replace": {'device="cuda"': 'device="cpu"', "8, 1024, 32000": "2, 16, 320", "(8, 1024)": "(2, 16)",
                    "randint(0, 32000": "randint(0, 320", "[:, :100]": "[:, :4]"},
    },
    "hidden = torch.randn(8192, 4096": {
        "prelude": "import torch\nimport tofu_kernels as tk\n",
        "replace": {'device="cuda"': 'device="cpu"', "8192, 4096": "64, 32", "128256, 4096": "500, 32",
                    "randint(0, 128256, (8192,)": "randint(0, 500, (64,)"},
    },
    "per_token = tk.vocab_parallel_tofu_loss(logits_shard": {
        # one process, no process group: the same call without communication
        "prelude": ("import torch\nimport tofu_kernels as tk\nlogits_shard = torch.randn(6, 50)\n"
                    "labels = torch.randint(0, 50, (6,))\ntp_group = None\n"),
    },
    "compute_loss_func=tofu_loss_func(gamma=3.0, beta=0.8)": {
        "prelude": _HF_PRELUDE,
        "replace": {'trl.SFTConfig(output_dir="out")': 'trl.SFTConfig(output_dir="out", use_cpu=True)'},  # bf16 default
    },
    "apply_tofu(model, gamma=3.0, beta=0.8, fused_linear=True)": {"prelude": _HF_PRELUDE},
    "megatron_patch.apply(loss_type=\"tofu\", gamma=3.0, beta=0.8, backend=\"auto\")": {
        # Megatron-LM's parser reads sys.argv: a tiny model's flags and the TOFU flags
        "prelude": f"import sys\nsys.argv = ['pretrain_gpt.py', *{TINY!r}, '--loss-type', 'tofu']\n",
        "after": ("assert megatron_patch.is_applied() and megatron_patch.config().gamma == 3.0\n"
                  "megatron_patch.revert()\n"),
    },
}

# Blocks that cannot run here: the README marks them with this text, and a test runs the
# part that is ours.
NOT_HERE_MARK = "not run by this repository's tests"
NOT_HERE = {
    "AutoBridge.import_ckpt(": "tests/test_megatron_sft.py::test_a_provider_built_model_trains_tofu",
    "from megatron.bridge.recipes.llama import llama31_8b_sft_config":
        "tests/test_megatron_sft.py::test_a_provider_built_model_trains_tofu",
}

# Shell commands: the test that runs each (its flags, its script), or why it cannot run here.
COMMANDS = {
    "make demo": "tests/test_demo.py (the demo's code path, shortened; make demo itself takes 5 minutes)",
    "make test": "CI (.ci/run runs it)",
    "make bench": "tests/test_bench_smoke.py",
    "pip install --no-build-isolation .": "tests/test_install.py (pip builds this checkout; the CI venv installs it so)",
    "pip install .": "tests/test_install.py",
    'pip install --no-build-isolation ".[megatron]"': "CI installs these pins from requirements-dev.txt",
    'pip install --no-build-isolation ".[trl]"': "CI installs these pins from requirements-dev.txt",
    "torchrun --nproc-per-node 2 examples/vocab_parallel.py": "tests/test_examples.py::test_vocab_parallel_example_torchrun",
    "torchrun --nproc-per-node 8 examples/vocab_parallel.py --cuda": "GPUs (the CPU twin: tests/test_examples.py)",
    "python examples/hf_sft.py": "tests/test_examples.py::test_hf_sft_example_runs_as_written",
    "python examples/hf_sft.py --model Qwen/Qwen3-0.6B": "downloads a checkpoint (tests/test_examples.py runs the tiny one)",
    "export CUDA_DEVICE_MAX_CONNECTIONS=1": "part of the multi-node command",
    "torchrun --nnodes 2": "tests/test_megatron_sft.py (the command's flags, read from the README, on CPU)",
}


def _blocks(lang: str) -> list[str]:
    return re.findall(r"^```" + lang + r"\n(.*?)^```", readme.README.read_text(), re.M | re.S)


def _key(block: str, table: dict) -> str:
    keys = [k for k in table if k in block]
    assert len(keys) == 1, f"README block matched {keys} of the known blocks:\n{block}"
    return keys[0]


def test_every_python_block_is_known():
    for block in _blocks("python"):
        keys = [k for k in (*RUN, *NOT_HERE) if k in block]
        assert len(keys) == 1, f"a README python block the tests do not run or know:\n{block}"


@pytest.mark.parametrize("key", list(NOT_HERE))
def test_blocks_that_cannot_run_here_say_so_and_have_a_twin(key):
    block = next(b for b in _blocks("python") if key in b)
    assert NOT_HERE_MARK in block, f"README: mark the block visibly ({NOT_HERE_MARK!r}):\n{block}"
    path, name = NOT_HERE[key].split("::")
    assert f"def {name}(" in (ROOT / path).read_text()


@pytest.mark.parametrize("key", list(RUN))
def test_python_block_runs(tmp_path, key):
    block = next(b for b in _blocks("python") if key in b)
    how = RUN[key]
    code = block
    for old, new in how.get("replace", {}).items():
        assert old in code, f"README block changed: {old!r} not found, update the test's sizes"
        code = code.replace(old, new)
    code = how.get("prelude", "") + code + how.get("after", "")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, f"README block failed:\n{code}\n{out.stderr[-3000:]}"


def test_every_shell_command_is_run_or_explained():
    known = sorted(COMMANDS, key=len, reverse=True)  # the longest prefix names the command
    for block in _blocks("bash"):
        for argv in readme.commands(block):
            line = " ".join(argv)
            match = next((k for k in known if line.startswith(k)), None)
            assert match is not None, f"a README command the tests neither run nor explain: {line}"
            where = COMMANDS[match]
            if where.startswith("tests/"):
                path = where.split("::")[0].split(" ")[0]
                assert (ROOT / path).is_file(), where
                if "::" in where:
                    assert f"def {where.split('::')[1].split(' ')[0]}(" in (ROOT / path).read_text(), where
