"""`make study` (examples/diversity_study.py) on a very small configuration: the JSON, table and
plot it writes, the cross-entropy baseline really sampled at its temperatures, and a seed's
numbers given again by a rerun whatever else runs beside it."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.support.checkout import EXAMPLES, ROOT, load_script
from tests.support.megatron_utils import require_megatron_core

require_megatron_core()

demo = load_script("examples/diversity_demo.py")

pytestmark = pytest.mark.megatron

TEMPERATURES = ["1", "1.25", "1.5"]  # a shorter sweep than the default, with every pair's rows
CE_ROWS = [f"CE T={t}" for t in TEMPERATURES]
# --gammas 0 3 --betas 1 0.8: the grid's corners, enough for every paired difference
TOFU_ROWS = ["TOFU g=3 b=1", "TOFU g=0 b=0.8", "TOFU g=3 b=0.8"]
TINY = [
    "--pretrain-iters",
    "8",
    "--sft-iters",
    "3",
    "--log-interval",
    "4",
    "--samples",
    "4",
    "--prompts-per-category",
    "1",
    "--temperatures",
    *TEMPERATURES,
]


def _study(out: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            str(EXAMPLES / "diversity_study.py"),
            *TINY,
            "--out",
            str(out),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    return run


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    run = _study(out, "--seeds", "1", "2", "--gammas", "0", "3", "--betas", "1", "0.8")
    return run, json.loads((out / "study_results.json").read_text()), out


@pytest.mark.slow
def test_study_writes_json_table_and_plot(study):
    run, data, out = study
    assert data["complete"] is True and data["settings"]["seeds"] == [1, 2]
    assert data["settings"]["temperatures"] == [1.0, 1.25, 1.5]
    assert (
        data["machine"]["threads_per_rank"] == 1 and data["machine"]["torch"] == torch.__version__
    )
    names = ["pre-SFT", *CE_ROWS, *TOFU_ROWS]
    assert [r["name"] for r in data["rows"]] == names
    assert list(data["runs"]) == ["1", "2"] and all(list(r) == names for r in data["runs"].values())
    for row in data["rows"]:
        for key in (
            "valid",
            "misspelled",
            "answer_entropy",
            "rare_share",
            "entropy",
            "sft_ce",
            "broad_ce",
        ):
            s, values = row[key], [data["runs"][seed][row["name"]][key] for seed in ("1", "2")]
            assert s["n"] == 2 and math.isclose(s["mean"], sum(values) / 2), (row["name"], key)
            assert math.isclose(s["sd"], abs(values[0] - values[1]) / math.sqrt(2), abs_tol=1e-12)
    assert [(p["a"], p["b"]) for p in data["pairs"]] == [
        ("TOFU g=3 b=0.8", "CE T=1"),
        ("TOFU g=3 b=0.8", "CE T=1.25"),
        ("TOFU g=3 b=0.8", "CE T=1.5"),
        ("TOFU g=0 b=0.8", "CE T=1.25"),
        ("TOFU g=3 b=1", "CE T=1"),
        ("TOFU g=3 b=0.8", "TOFU g=0 b=0.8"),
    ]
    pair = data["pairs"][0]
    assert pair["sft_ce"]["per_seed"] == [
        data["runs"][s]["TOFU g=3 b=0.8"]["sft_ce"] - data["runs"][s]["CE T=1"]["sft_ce"]
        for s in ("1", "2")
    ]
    assert [f["name"] for f in data["frontier"]] == TOFU_ROWS
    assert all(
        len(f[k]["per_seed"]) == 2
        for f in data["frontier"]
        for k in ("valid", "sft_ce", "broad_ce")
    )
    table = (out / "study_results.md").read_text()
    assert [
        line.split("|")[1].strip()
        for line in table.splitlines()
        if line.startswith("| ") and "---" not in line
    ][: len(names) + 1] == ["model", *names]
    assert (out / "study_frontier.png").stat().st_size > 10_000
    assert (
        "ETA" in run.stdout
        and "progress 100 %" in run.stdout
        and f"results written to {out}" in run.stdout
    )


@pytest.mark.slow
def test_cross_entropy_baseline_is_sampled_at_its_temperature(study):
    """One cross-entropy model per seed: its argmax accuracy is the same at every temperature,
    and the entropy of the distribution it samples at the first response token rises with T."""
    _, data, _ = study
    for seed, rows in data["runs"].items():
        entropy = [rows[name]["entropy"] for name in CE_ROWS]
        assert entropy == sorted(entropy) and len(set(entropy)) == len(entropy), (seed, entropy)
        assert len({rows[name]["sft_acc"] for name in CE_ROWS}) == 1, seed
        assert (
            rows["TOFU g=3 b=0.8"]["sft_ce"] != rows["CE T=1"]["sft_ce"]
        )  # the TOFU runs trained with TOFU


@pytest.mark.slow
def test_a_seed_reruns_to_the_same_numbers(study, tmp_path):
    """Seed 2 alone, on a smaller grid: every pre-SFT and cross-entropy number is the one the
    two-seed run gave (a seed reseeds data, weights, batches and samples)."""
    _, data, _ = study
    _study(tmp_path, "--seeds", "2", "--gammas", "0", "--betas", "1", "--temperatures", "1")
    again = json.loads((tmp_path / "study_results.json").read_text())["runs"]["2"]
    assert list(again) == ["pre-SFT", "CE T=1"]
    for name in again:
        assert again[name] == data["runs"]["2"][name], name


def test_sampling_follows_the_temperature(monkeypatch):
    """sample_responses draws from softmax(logits / T) and reports that distribution's entropy:
    a stand-in model puts fixed logits on 'a'..'d' after the prompt and EOS after that."""
    z = torch.tensor([2.0, 1.0, 0.0, -1.0])
    letters = [ord(c) for c in "abcd"]

    def full_logits(model, tokens, device):
        logits = torch.full((*tokens[:, :-1].shape, 256 + 4), -1e4)
        logits[..., demo.sft.EOS] = 0.0
        after_sep = tokens[:, :-1] == demo.sft.SEP
        logits[after_sep] = -1e4
        logits[after_sep.nonzero(as_tuple=True) + (torch.tensor(letters)[:, None],)] = z[:, None]
        return logits

    monkeypatch.setattr(demo.sft, "full_logits", full_logits)
    n = 4000
    for t in (1.0, 1.5, 3.0):
        samples, entropy = demo.sample_responses(
            None, ["name a fruit:"], n, 3, "cpu", seed=0, temperature=t
        )
        p = torch.softmax(z / t, 0)
        assert math.isclose(entropy, float(-(p * p.log()).sum()), rel_tol=1e-5), t
        counts = [samples[0].count(c) for c in "abcd"]
        assert sum(counts) == n  # one letter, then EOS
        freq = torch.tensor(counts) / n
        assert (freq - p).abs().max() < 0.03, (t, freq, p)  # 4000 draws: sd of a share <= 0.008


def test_cuda_scale_up_is_the_same_script_with_a_larger_model():
    """--device cuda changes only the defaults (GPU_SCALE); flags given explicitly still win,
    and a grid without the cross-entropy cell is refused."""
    study = load_script("examples/diversity_study.py")
    cpu, gpu = study.parse_args([]), study.parse_args(["--device", "cuda"])
    assert (cpu.num_layers, cpu.hidden_size, cpu.sft_iters) == (2, 128, 600)
    assert {k: getattr(gpu, k) for k in study.GPU_SCALE} == study.GPU_SCALE
    assert study.parse_args(["--device", "cuda", "--num-layers", "4"]).num_layers == 4
    assert vars(cpu).keys() == vars(gpu).keys()
    with pytest.raises(SystemExit):
        study.parse_args(["--gammas", "1", "3"])


def _readme_rows(heading: str) -> dict[str, list[str]]:
    """The first cell -> the other cells of every table row in docs/study.md's section ``heading``."""
    text = (ROOT / "docs" / "study.md").read_text()
    section = text[text.index(f"\n## {heading}\n") :]
    end = section.find("\n## ", 4)
    section = section if end < 0 else section[:end]
    return {
        cells[0]: cells[1:]
        for cells in (
            [c.strip() for c in line.split("|")[1:-1]]
            for line in section.splitlines()
            if line.startswith("| ") and "---" not in line
        )
    }


def test_readme_quotes_the_committed_study():
    """docs/study.md 'The study': its tables are the committed study's numbers."""
    data = json.loads((ROOT / "examples" / "results" / "study_results.json").read_text())
    readme = _readme_rows("The study: `make study`")
    keys = ["valid", "misspelled", "answer_entropy", "rare_share", "sft_ce", "broad_ce"]
    for row in data["rows"][1:]:  # pre-SFT is left out of the page
        assert readme[row["name"]] == [
            f"{row[k]['mean']:.3f} ± {row[k]['sd']:.3f}" for k in keys
        ], row["name"]
    quoted = [name for name in readme if " - " in name and name != "a - b"]
    assert len(quoted) == 5
    for name in quoted:
        a, b = name.split(" (")[0].split(" - ")
        pair = next(p for p in data["pairs"] if (p["a"], p["b"]) == (a, b))
        cells = []
        for k in ("valid", "misspelled", "answer_entropy", "sft_ce", "broad_ce"):
            pos = sum(v > 0 for v in pair[k]["per_seed"])
            cells.append(
                f"{pair[k]['mean']:+.3f} ± {pair[k]['sd']:.3f} ({pos}/{len(pair[k]['per_seed'])})"
            )
        assert readme[name] == cells, name
