"""`make demo`: its committed result says what docs/study.md says (TOFU kept more diversity among
valid answers than cross entropy), and a shortened run goes end to end (pretrain, two SFT
runs, results, table and plot)."""

import argparse
import json
import os
import shutil
import subprocess
import sys

import pytest

from tests.support.checkout import ROOT, load_script
from tests.support.megatron_utils import require_megatron_core

RESULTS = ROOT / "examples" / "results"
MODELS = ["pre-SFT", "SFT cross_entropy", "SFT tofu"]


def test_committed_result_tofu_keeps_more_diversity():
    """The committed run (examples/results/demo_results.json): TOFU's answer entropy and rare
    share exceed cross entropy's, and the committed table shows those same numbers."""
    data = json.loads((RESULTS / "demo_results.json").read_text())
    results = data["results"]
    assert list(results) == MODELS
    ce, tofu = results["SFT cross_entropy"], results["SFT tofu"]
    assert tofu["answer_entropy"] > ce["answer_entropy"], (
        tofu["answer_entropy"],
        ce["answer_entropy"],
    )
    assert tofu["rare_share"] > ce["rare_share"], (tofu["rare_share"], ce["rare_share"])
    assert data["more_diversity"] is True
    assert (data["settings"]["tofu_gamma"], data["settings"]["tofu_beta"]) == (3.0, 0.8)
    table = (RESULTS / "demo_results.md").read_text()
    for name in MODELS:  # columns 6 and 7 of the table: answer entropy, rare share of valid
        row = next(line for line in table.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[5:7] == [
            f"{results[name]['answer_entropy']:.3f}",
            f"{results[name]['rare_share']:.3f}",
        ], name


def test_readme_quotes_the_committed_demo():
    """docs/study.md's demo table is the committed run's table, row for row."""
    table = (RESULTS / "demo_results.md").read_text().splitlines()
    readme = (ROOT / "docs" / "study.md").read_text().split("\n## The study")[0].splitlines()
    for name in MODELS:
        row = next(line for line in table if line.startswith(f"| {name} |"))
        assert row in readme, name


def test_make_demo_and_study_write_to_a_git_ignored_folder():
    """`make demo` / `make study` leave the checkout clean: the scripts' default output folder and
    make's OUT are examples/results/local/, which git ignores; OUT=examples/results is the
    deliberate way to replace the committed results."""
    demo = load_script("examples/diversity_demo.py")
    assert demo.add_arguments(argparse.ArgumentParser()).parse_args([]).out == demo.LOCAL_OUT
    assert demo.LOCAL_OUT == RESULTS / "local"
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    for target, script in (("demo", "diversity_demo.py"), ("study", "diversity_study.py")):
        for extra, out in (
            ([], "examples/results/local"),
            (["OUT=examples/results"], "examples/results"),
        ):
            # -n: print the recipe only; -o: take the virtualenv as made
            dry = subprocess.run(
                ["make", "-n", "-o", ".venv/.installed", target, *extra],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert dry.returncode == 0, dry.stderr
            assert f"examples/{script} --out {out} " in dry.stdout, dry.stdout
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for name in ("demo_results.md", "demo_curves.png", "study_results.json"):
        ignored = subprocess.run(
            ["git", "check-ignore", "-q", str(demo.LOCAL_OUT / name)], cwd=ROOT
        )
        assert ignored.returncode == 0, f"{name} in {demo.LOCAL_OUT} is not git-ignored"


@pytest.mark.slow
@pytest.mark.megatron
def test_demo_short_run(tmp_path):
    require_megatron_core()
    _short_run(tmp_path)


def _short_run(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(ROOT / "examples" / "diversity_demo.py"),
            "--pretrain-iters",
            "10",
            "--sft-iters",
            "6",
            "--eval-interval",
            "3",
            "--log-interval",
            "5",
            "--samples",
            "3",
            "--prompts-per-category",
            "1",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    data = json.loads((tmp_path / "demo_results.json").read_text())
    assert list(data["results"]) == MODELS and list(data["curves"]) == ["cross_entropy", "tofu"]
    for r in data["results"].values():
        assert {
            "answer_entropy",
            "rare_share",
            "rare_coverage",
            "valid",
            "sft_ce",
            "broad_ce",
        } <= set(r)
    assert isinstance(data["more_diversity"], bool) and isinstance(data["less_forgetting"], bool)
    text = (tmp_path / "demo_results.md").read_text()
    rows = [
        line.split("|")[1].strip()
        for line in text.splitlines()
        if line.startswith("| ") and "---" not in line
    ]
    assert rows == ["model", *MODELS]
    assert "Diversity: TOFU" in text and "Forgetting:" in text and "Quality:" in text
    assert (tmp_path / "demo_curves.png").stat().st_size > 10_000
    assert "[sft tofu] eval @ 6" in out.stdout and "[pretrain] iter" in out.stdout  # progress
    # the SFT progress counts the whole run (6 iterations), not each evaluation segment of 3
    assert (
        "[sft tofu] iter     3/6 |" in out.stdout and "[sft tofu] iter     6/6 |" in out.stdout
    ), out.stdout
    assert "/3 |" not in out.stdout, out.stdout


def test_sft_progress_counts_the_whole_run(monkeypatch):
    """finetune trains in segments of --eval-interval iterations: its progress lines count the
    whole SFT run (announced as --sft-iters iterations), never restart per segment."""
    import types

    import torch

    demo = load_script("examples/diversity_demo.py")
    sft = demo.sft
    monkeypatch.setattr(sft, "train_step", lambda *a: (torch.tensor(2.0), torch.tensor(1.0)))
    monkeypatch.setattr(sft.dist, "get_rank", lambda *a: 0)
    monkeypatch.setattr(
        demo,
        "evaluate",
        lambda *a, **kw: {
            key: 0.0 for key in ("sft_ce", "broad_ce", "valid", "answer_entropy", "rare_share")
        },
    )
    monkeypatch.setattr(
        demo,
        "megatron_patch",
        types.SimpleNamespace(apply=lambda *a, **k: None, revert=lambda: None),
    )
    args = argparse.Namespace(
        sft_iters=7,
        eval_interval=3,
        log_interval=2,
        micro_batch_size=2,
        device="cpu",
        seed=0,
        sft_lr=1e-3,
        tofu_backend="torch",
    )
    data = types.SimpleNamespace(sft_train=sft.Batches.mock(4, 2, seed=0))
    lines = []
    _, curve = demo.finetune(
        "cross_entropy",
        ("cross_entropy",),
        torch.nn.Linear(1, 1),
        torch.nn.Linear(1, 1).state_dict(),
        data,
        args,
        lines.append,
    )
    assert [c["iter"] for c in curve] == [3, 6, 7]
    progress = [line.split(" | ")[0] for line in lines if " iter " in line]
    # every log interval, and each segment's last iteration
    assert progress == [f"[sft cross_entropy] iter {i:5d}/7" for i in (2, 3, 4, 6, 7)], lines
