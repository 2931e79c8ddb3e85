"""Does TOFU beat a hotter sampler?  A seeded gamma/beta study (`make study`).

The demo (examples/diversity_demo.py) shows on one seed that TOFU keeps more answer
diversity than cross entropy. Part of that is temperature: training on
log softmax(z / beta) makes the optimum z = beta * log p_data, so the TOFU model sampled at
temperature 1 samples about p_data ** beta, which is what the cross-entropy model
(z = log p_data) gives sampled at temperature 1 / beta (1.25 for beta 0.8). The fair baseline
for "more diverse" is therefore cross entropy sampled hotter, and the fair comparison is a
quality/diversity frontier, not one point. The focal exponent gamma is the part no sampler
gives; the grid separates the two.

For each seed (the seed draws the data, the initial weights, the batches and the samples):
one pretraining on the broad corpus (the demo's model, corpus and prompts), shared by
every SFT run of that seed; then SFT from that checkpoint, with the same batches, for every
(gamma, beta) in {0, 1, 3} x {1.0, 0.8}. gamma 0, beta 1 is cross entropy itself (TOFU's
identity point, docs/design.md): that cell is the cross-entropy model, trained with
`--loss-type cross_entropy` (Megatron's own loss). Every SFT model is sampled at
temperature 1; the cross-entropy model also at 1.1, 1.25, 1.5 and 1.75 (its curve). All metrics
of a row are those of the distribution it samples, softmax(logits / T): held-out SFT CE
(quality), broad-corpus CE (forgetting), and the demo's diversity metrics.

Output (--out, default examples/results/local/, git-ignored): study_results.json (every
seed's numbers, means and spreads, paired differences, frontier gaps), study_results.md
(the tables) and study_frontier.png (answer entropy against valid-sample share and against
held-out SFT CE). `make study OUT=examples/results` replaces the committed results.

    torchrun --standalone --nproc-per-node 2 examples/diversity_study.py   # CPU: ~15 CPU-min per rank
    torchrun --standalone --nproc-per-node 2 examples/diversity_study.py --device cuda   # 2 GPUs

`--device cuda` runs this same code (the demo's functions, NCCL instead of gloo, and the
TOFU loss on the GPU backend that `auto` picks) with a larger model and longer training
(GPU_SCALE below; each flag given explicitly wins).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import diversity_demo as demo  # examples/, beside this script
import numpy as np
import torch.distributed as dist

SEEDS = (1234, 1235, 1236)
GAMMAS = (0.0, 1.0, 3.0)
BETAS = (1.0, 0.8)
# 1.75 beyond the grid: TOFU at gamma 3, beta 0.8 reaches the answer entropy of cross
# entropy at T = 1.5 (measured), and the curve must reach past it to be compared without extrapolating
TEMPERATURES = (1.0, 1.1, 1.25, 1.5, 1.75)
GPU_SCALE = {
    "num_layers": 8,
    "hidden_size": 512,
    "num_heads": 8,
    "pretrain_iters": 3000,
    "sft_iters": 1000,
}
# An evaluation (two held-out sets and 768 samples of up to 10 tokens) costs about as much
# as this many training iterations (measured on 2 CPU cores): the ETA's unit.
EVAL_COST = 60
# (key, header, format, better): the table's columns; better: +1 higher is better, -1 lower
METRICS = [
    ("valid", "valid samples", "{:.3f}", +1),
    ("misspelled", "misspelled", "{:.3f}", -1),
    ("answer_entropy", "answer entropy", "{:.3f}", +1),
    ("rare_share", "rare share", "{:.3f}", +1),
    ("entropy", "first-token entropy", "{:.3f}", 0),
    ("sft_ce", "SFT CE", "{:.3f}", -1),
    ("broad_ce", "broad CE (forgetting)", "{:.3f}", -1),
]
FRONTIER_METRICS = ("valid", "sft_ce", "broad_ce")


def ce_name(t: float) -> str:
    return f"CE T={t:g}"


def tofu_name(gamma: float, beta: float) -> str:
    return f"TOFU g={gamma:g} b={beta:g}"


def is_ce(gamma: float, beta: float) -> bool:
    return gamma == 0 and beta == 1


def rows(args) -> list[dict]:
    """The table's rows: the cross-entropy model at each temperature, then each TOFU config."""
    out = [{"name": "pre-SFT", "loss": None, "gamma": None, "beta": None, "temperature": 1.0}]
    out += [
        {"name": ce_name(t), "loss": "cross_entropy", "gamma": 0.0, "beta": 1.0, "temperature": t}
        for t in args.temperatures
    ]
    out += [
        {"name": tofu_name(g, b), "loss": "tofu", "gamma": g, "beta": b, "temperature": 1.0}
        for b in args.betas
        for g in args.gammas
        if not is_ce(g, b)
    ]
    return out


def pairs(names: list[str]) -> list[tuple[str, str, str]]:
    """Paired differences (same seed: same pretraining, batches and sampling seed) that isolate
    one thing each; those whose rows the grid lacks are left out."""
    wanted = [
        (
            tofu_name(3, 0.8),
            ce_name(1),
            "the demo's comparison: TOFU at the paper's defaults vs cross entropy",
        ),
        (
            tofu_name(3, 0.8),
            ce_name(1.25),
            "TOFU vs the fair baseline, cross entropy sampled at T = 1/beta",
        ),
        (tofu_name(3, 0.8), ce_name(1.5), "TOFU vs cross entropy sampled at T = 1.5"),
        (tofu_name(0, 0.8), ce_name(1.25), "beta alone vs its matching temperature"),
        (tofu_name(3, 1), ce_name(1), "gamma alone (beta 1)"),
        (tofu_name(3, 0.8), tofu_name(0, 0.8), "gamma at beta 0.8"),
    ]
    return [w for w in wanted if w[0] in names and w[1] in names]


class Progress:
    """Progress lines with an ETA: work counted in training iterations, an evaluation as EVAL_COST."""

    def __init__(self, args, log):
        n_tofu = len(rows(args)) - 1 - len(args.temperatures)
        self.per_seed = (
            args.pretrain_iters
            + EVAL_COST
            + (n_tofu + 1) * (args.sft_iters + EVAL_COST)
            + (len(args.temperatures) - 1) * EVAL_COST
        )
        self.total, self.done, self.log = self.per_seed * len(args.seeds), 0, log

    def step(self, units: int, what: str) -> None:
        self.done += units
        elapsed = self.log.elapsed()
        eta = elapsed / self.done * (self.total - self.done)
        self.log(
            f"progress {100 * self.done / self.total:3.0f} %: {what}; ETA {eta / 60:.1f} min "
            f"(finishes about {time.strftime('%H:%M', time.localtime(time.time() + eta))})"
        )


def run_seed(args, seed: int, progress: Progress, log) -> dict:
    """Pretrain once, fine-tune every config from that checkpoint, evaluate; {row name: metrics}."""
    run = copy.copy(args)
    run.seed, run.eval_interval = seed, args.sft_iters  # evaluate once, at the end of SFT
    where = f"seed {seed} ({args.seeds.index(seed) + 1}/{len(args.seeds)})"
    data = demo.make_data(run)
    model, state = demo.pretrain(run, data, log)
    out = {"pre-SFT": demo.evaluate(model, data, run)}
    progress.step(args.pretrain_iters + EVAL_COST, f"{where}: pretrained")
    # cross entropy first: gamma 0, beta 1 is that model
    configs = [(0.0, 1.0)] + [(g, b) for b in args.betas for g in args.gammas if not is_ce(g, b)]
    for gamma, beta in configs:
        if is_ce(gamma, beta):
            name, loss = ce_name(1), ("cross_entropy",)
        else:
            name, loss = tofu_name(gamma, beta), ("tofu", gamma, beta)
        log(f"{where}: SFT {name}, {args.sft_iters} iterations")
        out[name], _ = demo.finetune(name, loss, model, state, data, run, log)
        units = args.sft_iters + EVAL_COST
        if is_ce(gamma, beta):
            for t in args.temperatures[1:]:
                out[ce_name(t)] = demo.evaluate(model, data, run, temperature=t)
            units += (len(args.temperatures) - 1) * EVAL_COST
        progress.step(units, f"{where}: {name} done")
    for r in out.values():  # the 8 most common invalid samples instead of every answer
        answers = r.pop("answers")
        r["invalid_top"] = Counter(
            {a: n for a, n in answers.items() if a not in demo.VALID}
        ).most_common(8)
    return out


def spread(values: list[float]) -> dict:
    """Mean, sample standard deviation (n - 1; 0 for one seed), min and max over seeds."""
    return {
        "mean": statistics.fmean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def curve_at(points: list[tuple[float, float]], x: float) -> float | None:
    """Cross entropy's temperature curve (answer entropy, y), linear between its points, at
    answer entropy x; None outside the sweep (no extrapolation)."""
    xs, ys = zip(*sorted(points))
    return float(np.interp(x, xs, ys)) if xs[0] <= x <= xs[-1] else None


def summarize(args, runs: dict) -> dict:
    """Means and spreads per row; paired differences; each TOFU config's distance from cross
    entropy's temperature curve at equal answer entropy (positive: better than the curve)."""
    seeds = list(runs)
    table = []
    for row in rows(args):
        per_seed = [runs[s][row["name"]] for s in seeds]
        table.append({**row, **{k: spread([r[k] for r in per_seed]) for k, *_ in METRICS}})
    names = [r["name"] for r in table]
    diffs = []
    for a, b, what in pairs(names):
        d = {k: [runs[s][a][k] - runs[s][b][k] for s in seeds] for k, *_ in METRICS}
        diffs.append(
            {
                "a": a,
                "b": b,
                "what": what,
                **{k: {**spread(v), "per_seed": v} for k, v in d.items()},
            }
        )
    frontier = []
    for row in table:
        if row["loss"] != "tofu":
            continue
        gaps = {k: [] for k in FRONTIER_METRICS}
        for s in seeds:
            x = runs[s][row["name"]]["answer_entropy"]
            for k, sign in ((k, better) for k, _, _, better in METRICS if k in FRONTIER_METRICS):
                y = curve_at(
                    [
                        (runs[s][ce_name(t)]["answer_entropy"], runs[s][ce_name(t)][k])
                        for t in args.temperatures
                    ],
                    x,
                )
                gaps[k].append(None if y is None else sign * (runs[s][row["name"]][k] - y))
        frontier.append(
            {
                "name": row["name"],
                "gamma": row["gamma"],
                "beta": row["beta"],
                **{
                    k: {
                        "per_seed": v,
                        "outside_sweep": v.count(None),
                        **(
                            spread([g for g in v if g is not None])
                            if any(g is not None for g in v)
                            else {}
                        ),
                    }
                    for k, v in gaps.items()
                },
            }
        )
    return {"rows": table, "pairs": diffs, "frontier": frontier}


def _pm(s: dict, fmt: str = "{:.3f}") -> str:
    return (fmt + " ± " + fmt).format(s["mean"], s["sd"])


def _signed(s: dict) -> str:
    """mean ± sd (k/n): k seeds of n with a positive value."""
    pos = sum(v > 0 for v in s["per_seed"] if v is not None)
    return f"{s['mean']:+.3f} ± {s['sd']:.3f} ({pos}/{len([v for v in s['per_seed'] if v is not None])})"


def report(args, runs: dict, summary: dict, elapsed: float, cpu_s: list[float], out: Path) -> str:
    n = len(runs)
    head = (
        f"TOFU vs cross entropy sampled hotter: tiny Megatron-Core GPT ({args.num_layers} layers, hidden "
        f"{args.hidden_size}), TP={args.tp}, {args.device}, {args.pretrain_iters} pretrain + {args.sft_iters} SFT "
        f"iterations, {args.samples} samples x {len(demo.CATEGORIES) * args.prompts_per_category} prompts, "
        f"seeds {', '.join(map(str, runs))}; {elapsed / 60:.1f} min wall, {max(cpu_s) / 60:.1f} min CPU per rank"
    )
    lines = [
        head,
        "",
        f"Mean ± standard deviation over {n} seed{'s' if n > 1 else ''}. `CE T=1` is the "
        "gamma 0, beta 1 cell (cross entropy itself); `CE T=...` is that model sampled at temperature T; "
        "every other row is sampled at T = 1. Each row's CEs are those of the distribution it samples.",
        "",
        "| model | " + " | ".join(h for _, h, _, _ in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for row in summary["rows"]:
        lines.append(
            f"| {row['name']} | " + " | ".join(_pm(row[k], f) for k, _, f, _ in METRICS) + " |"
        )
    lines += [
        "",
        f"Reference: the SFT data's answer entropy is {demo.DATA_ANSWER_ENTROPY:.3f} nats, its rare share "
        f"{demo.DATA_RARE_SHARE:.3f}.",
        "",
        "Paired differences a - b (each seed: same pretraining, batches and sampling seed): mean ± sd "
        "(seeds with a positive difference / seeds)",
        "",
        "| a | b | what it isolates | " + " | ".join(h for _, h, _, _ in METRICS) + " |",
        "|---|---|---|" + "---|" * len(METRICS),
    ]
    for d in summary["pairs"]:
        lines.append(
            f"| {d['a']} | {d['b']} | {d['what']} | "
            + " | ".join(_signed(d[k]) for k, *_ in METRICS)
            + " |"
        )
    heads = {k: h for k, h, _, _ in METRICS}
    lines += [
        "",
        "Distance from cross entropy's temperature curve at the same answer entropy (linear between "
        f"T = {', '.join(f'{t:g}' for t in args.temperatures)}; positive: better than the curve, i.e. more "
        "valid samples or lower CE): mean ± sd (seeds above the curve / seeds inside the sweep)",
        "",
        "| model | " + " | ".join(heads[k] for k in FRONTIER_METRICS) + " |",
        "|---|" + "---|" * len(FRONTIER_METRICS),
    ]
    for f in summary["frontier"]:
        cells = [
            (_signed(f[k]) if "mean" in f[k] else "outside the sweep")
            + (
                f", {f[k]['outside_sweep']} outside"
                if f[k]["outside_sweep"] and "mean" in f[k]
                else ""
            )
            for k in FRONTIER_METRICS
        ]
        lines.append(f"| {f['name']} | " + " | ".join(cells) + " |")
    first = next(iter(runs.values()))
    lines += [
        "",
        f"Most common invalid samples (seed {next(iter(runs))}): "
        + "; ".join(
            f"{name}: " + ", ".join(f"{a!r}:{c}" for a, c in first[name]["invalid_top"][:5])
            for name in (ce_name(args.temperatures[-1]), tofu_name(3, 0.8))
            if name in first
        ),
    ]
    text = "\n".join(lines) + "\n"
    (out / "study_results.md").write_text(text)
    data = {
        "settings": {
            k: getattr(args, k)
            for k in (
                "tp",
                "device",
                "num_layers",
                "hidden_size",
                "num_heads",
                "pretrain_iters",
                "sft_iters",
                "samples",
                "prompts_per_category",
                "seeds",
                "gammas",
                "betas",
                "temperatures",
                "tofu_backend",
            )
        },
        "machine": demo.machine(args),
        "elapsed_s": round(elapsed),
        "cpu_s_per_rank": [round(c) for c in cpu_s],
        "complete": n == len(args.seeds),
        "sft_data": {
            "answer_entropy": demo.DATA_ANSWER_ENTROPY,
            "rare_share": demo.DATA_RARE_SHARE,
        },
        **summary,
        "runs": runs,
    }
    (out / "study_results.json").write_text(json.dumps(data, indent=1) + "\n")
    plt = demo.pyplot()
    if plt is None:
        return text + "matplotlib not installed: no plot\n"
    plot(plt, args, summary, head, out / "study_frontier.png")
    return text + f"plot: {out / 'study_frontier.png'}\n"


def plot(plt, args, summary: dict, title: str, path: Path) -> None:
    """Answer entropy (x) against valid share and held-out SFT CE (y): one marker per config
    (mean over seeds, bars: sd), cross entropy's temperature sweep as a line."""
    by_name = {r["name"]: r for r in summary["rows"]}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    colours = dict(
        zip(args.gammas, ["tab:blue", "tab:orange", "tab:red", "tab:purple", "tab:brown"])
    )
    for ax, (k, label) in zip(
        axes,
        [
            ("valid", "valid-sample share (higher is better)"),
            ("sft_ce", "held-out SFT CE (lower is better)"),
        ],
    ):
        ce = [by_name[ce_name(t)] for t in args.temperatures]
        ax.errorbar(
            [r["answer_entropy"]["mean"] for r in ce],
            [r[k]["mean"] for r in ce],
            xerr=[r["answer_entropy"]["sd"] for r in ce],
            yerr=[r[k]["sd"] for r in ce],
            color="black",
            marker="s",
            label="cross entropy, sampled at T",
        )
        for r in ce:
            ax.annotate(
                f"T={r['temperature']:g}",
                (r["answer_entropy"]["mean"], r[k]["mean"]),
                textcoords="offset points",
                xytext=(6, 4),
                fontsize=8,
            )
        for r in summary["rows"]:
            if r["loss"] == "tofu":
                ax.errorbar(
                    r["answer_entropy"]["mean"],
                    r[k]["mean"],
                    xerr=r["answer_entropy"]["sd"],
                    yerr=r[k]["sd"],
                    color=colours[r["gamma"]],
                    marker="o" if r["beta"] == 1 else "^",
                    markersize=8,
                    linestyle="none",
                    label=f"TOFU gamma {r['gamma']:g}, beta {r['beta']:g}",
                )
        ax.axvline(
            demo.DATA_ANSWER_ENTROPY,
            color="green",
            linestyle="--",
            label="SFT data's answer entropy",
        )
        ax.set(
            xlabel="answer entropy of valid samples (nats; higher is more diverse)", ylabel=label
        )
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def parse_args(argv=None) -> argparse.Namespace:
    p = demo.add_arguments(
        argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    )
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--gammas", type=float, nargs="+", default=list(GAMMAS))
    p.add_argument("--betas", type=float, nargs="+", default=list(BETAS))
    p.add_argument(
        "--temperatures",
        type=float,
        nargs="+",
        default=list(TEMPERATURES),
        help="cross entropy's sampling temperatures; the first must be 1",
    )
    if p.parse_known_args(argv)[0].device == "cuda":
        p.set_defaults(**GPU_SCALE)  # flags given explicitly still win
    args = p.parse_args(argv)
    if args.temperatures[0] != 1 or 0 not in args.gammas or 1 not in args.betas:
        p.error("the grid needs gamma 0, beta 1 (the cross-entropy model) and temperature 1 first")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    log = demo.start(args)
    progress = Progress(args, log)
    log(
        f"study: seeds {args.seeds}, gamma {args.gammas} x beta {args.betas}, cross entropy at T "
        f"{args.temperatures}; {len(args.seeds)} pretrainings of {args.pretrain_iters} and "
        f"{len(args.seeds) * (len(rows(args)) - len(args.temperatures))} SFT runs of {args.sft_iters} iterations"
    )
    runs = {}
    for seed in args.seeds:
        runs[seed] = run_seed(args, seed, progress, log)
        cpu = [None] * dist.get_world_size()
        dist.all_gather_object(cpu, time.process_time())
        if dist.get_rank() == 0:  # after every seed, so that a cut-off study keeps what it has
            args.out.mkdir(parents=True, exist_ok=True)
            text = report(args, runs, summarize(args, runs), log.elapsed(), cpu, args.out)
    if dist.get_rank() == 0:
        print("\n" + text + demo.where(args.out, "study"), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
