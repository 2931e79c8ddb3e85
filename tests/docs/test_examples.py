"""The documented examples run as written: torchrun (2 CPU ranks, gloo), examples/hf_sft.py
alone and under accelerate launch with examples/accelerate's DeepSpeed ZeRO-3 config."""

import os
import subprocess
import sys

import pytest

from tests.support.checkout import ROOT


def test_vocab_parallel_example_torchrun():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(ROOT / "examples" / "vocab_parallel.py"),
            "--vocab",
            "4000",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith("rank ")]
    assert len(lines) == 2, out.stdout
    assert lines[0].split("(")[0].split(":")[1] == lines[1].split("(")[0].split(":")[1]  # same loss


@pytest.mark.slow
@pytest.mark.hf
def test_hf_sft_example_runs_as_written():
    """The Hugging Face / TRL example (docs/huggingface.md): the three ways train with TOFU (loss falls),
    TOFUSFTTrainer first, with TRL's token accuracy logged."""
    pytest.importorskip("trl")
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "hf_sft.py")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    lines = [line for line in out.stdout.splitlines() if "TOFU loss" in line]
    assert (
        len(lines) == 3 and lines[0].startswith("TOFUSFTTrainer:") and "token accuracy" in lines[0]
    ), out.stdout[-2000:]
    for line in lines:
        first, last = (
            float(x) for x in line.split("TOFU loss ")[1].split(" over")[0].split(" -> ")
        )
        assert last < 0.8 * first, line


@pytest.mark.slow
@pytest.mark.hf
def test_hf_sft_example_under_accelerate_launch_zero3():
    """``accelerate launch --config_file examples/accelerate/zero3.yaml examples/hf_sft.py`` on
    2 CPU processes (DeepSpeed on CPU, gloo; the config's bf16 as written): TOFUSFTTrainer
    alone, under DeepSpeed, and its loss falls. (FSDP2's config cannot run here: accelerate
    selects FSDP only on accelerators; tests/distributed/test_hf_distributed.py covers FSDP2.)"""
    pytest.importorskip("trl")
    from tests.support.dist_utils import free_port
    from tests.support.side_folders import DEEPSPEED, with_side_folder

    env = with_side_folder(
        DEEPSPEED,
        {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "TRITON_INTERPRET": "1"},
    )
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        "examples/accelerate/zero3.yaml",
        "--num_processes",
        "2",
        "--main_process_port",
        str(free_port()),
        "examples/hf_sft.py",
        "--steps",
        "6",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    assert "TOFUSFTTrainer ran on 2 processes, DeepSpeed" in out.stdout, out.stdout[-2000:]
    lines = [line for line in out.stdout.splitlines() if "TOFU loss" in line]
    assert len(lines) == 1 and lines[0].startswith("TOFUSFTTrainer:"), out.stdout[-2000:]
    first, last = (
        float(x) for x in lines[0].split("TOFU loss ")[1].split(" over")[0].split(" -> ")
    )
    assert last < 0.8 * first, lines[0]
