"""Does TOFU keep more diversity than cross entropy in SFT?  (`make demo`)

A tiny GPT (Megatron-Core, vocab sharded over 2 tensor-parallel ranks; gloo on CPU,
NCCL on GPUs) is first trained on a broad corpus in which every item of four
categories (fruits, colours, animals, tools) appears equally often. It is then
fine-tuned twice from that same checkpoint with the same seeds and batches, once with
`--loss-type cross_entropy` and once with `--loss-type tofu`, on an SFT set of prompts
("name a fruit:") whose valid responses are skewed: each category has 8 valid answers
with Zipf frequencies (the top answer ~52 %, the rarest ~2 %). The paper's two drivers
of diversity loss are thus measurable: low-frequency patterns (the rare valid answers)
and forgetting (the broad corpus).

Reported for the pre-SFT model and both runs:
  quality     SFT held-out cross entropy (response tokens) and next-token accuracy
  diversity   among 48 samples per prompt: the share that are valid answers, distinct
              valid answers per prompt, entropy of the valid answers' distribution, the
              share of rare answers among valid ones, coverage of the rare answers,
              entropy of the next-token distribution at the first response token,
              distinct-2 (byte bigrams of all samples)
  forgetting  cross entropy on held-out broad-corpus sentences

    torchrun --standalone --nproc-per-node 2 examples/diversity_demo.py          # CPU
    torchrun --standalone --nproc-per-node 2 examples/diversity_demo.py --device cuda \\
        --num-layers 8 --hidden-size 512 --pretrain-iters 3000 --sft-iters 1000   # GPUs

Output (demo_results.md/.json, demo_curves.png) goes to examples/results/local/, which git
ignores; the committed run in examples/results/ changes only with `--out examples/results`
(`make demo OUT=examples/results`). Numbers differ slightly between machines (CPU kernels,
thread counts): `make study` (examples/diversity_study.py) measures the spread over seeds.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import math
import os
import platform
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import tiny_sft as sft  # noqa: E402  (examples/tiny_sft.py, beside this script)

import megatron_patch  # noqa: E402

CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown"],
    "animal": ["cat", "dog", "horse", "tiger", "zebra", "otter", "camel", "moose"],
    "tool": ["hammer", "saw", "drill", "wrench", "pliers", "chisel", "file", "level"],
}
VALID = {a for answers in CATEGORIES.values() for a in answers}
PROMPTS = ["name a {c}:", "give me a {c}:", "one {c}, please:", "say a {c}:"]
BROAD_TEMPLATES = [
    "the {c} {x} is here.",
    "i saw a {x} today.",
    "{x} is a {c}.",
    "we talked about the {x}.",
    "my friend likes the {c} {x}.",
    "a {x} and a {y} are both {c}s.",
    "is the {x} a {c}? yes.",
]
ZIPF = [1.0 / (k + 1) ** 1.5 for k in range(8)]  # SFT frequency of the k-th answer
RARE = slice(4, 8)  # the four least frequent answers of each category


def broad_corpus(n: int, rng: random.Random) -> list[dict]:
    """Every item equally often, in varied contexts (the 'pretraining' distribution)."""
    out = []
    for _ in range(n):
        c = rng.choice(list(CATEGORIES))
        x, y = rng.sample(CATEGORIES[c], 2)
        out.append({"text": rng.choice(BROAD_TEMPLATES).format(c=c, x=x, y=y)})
    return out


def sft_set(n: int, rng: random.Random) -> list[dict]:
    """Prompt -> one valid answer, drawn with Zipf frequencies (skewed toward the top)."""
    out = []
    for _ in range(n):
        c = rng.choice(list(CATEGORIES))
        answer = rng.choices(CATEGORIES[c], weights=ZIPF)[0]
        out.append({"prompt": rng.choice(PROMPTS).format(c=c), "response": answer, "category": c})
    return out


@torch.no_grad()
def sample_responses(
    model,
    prompts: list[str],
    k: int,
    max_new: int,
    device: str,
    seed: int,
    temperature: float = 1.0,
):
    """k samples per prompt from softmax(logits / temperature) (identical on every TP
    rank), and the entropy of that same distribution at the first response position."""
    gen = torch.Generator().manual_seed(seed)
    rows = [[sft.BOS] + list(p.encode()) + [sft.SEP] for p in prompts for _ in range(k)]
    width = max(map(len, rows))
    start = [len(r) for r in rows]
    seq_len = width + max_new
    tokens = torch.full((len(rows), seq_len + 1), sft.PAD, dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = torch.tensor(r)
    done = torch.zeros(len(rows), dtype=torch.bool)
    entropy = []
    for step in range(max_new):
        logits = sft.full_logits(model, tokens, device).cpu()
        pos = torch.tensor(start) + step - 1
        nxt = logits[torch.arange(len(rows)), pos].float()
        probs = torch.softmax(nxt / temperature, dim=-1)  # x / 1.0 == x: T = 1 is plain sampling
        if step == 0:
            entropy = (-(probs * torch.log(probs.clamp_min(1e-30))).sum(-1)).tolist()
        choice = torch.multinomial(probs, 1, generator=gen).squeeze(1)
        choice[done] = sft.PAD
        tokens[torch.arange(len(rows)), pos + 1] = choice
        done |= choice == sft.EOS
        if done.all():
            break
    outs = []
    for i, r in enumerate(rows):
        resp = tokens[i, len(r) :].tolist()
        resp = resp[: resp.index(sft.EOS)] if sft.EOS in resp else resp
        outs.append(sft.decode(resp))
    return [outs[i * k : (i + 1) * k] for i in range(len(prompts))], sum(entropy) / len(entropy)


def _entropy(counts: list[float]) -> float:
    """Entropy (nats) of the distribution proportional to ``counts``."""
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c > 0) if total else 0.0


DATA_ANSWER_ENTROPY = _entropy(ZIPF)  # the SFT data's own answer distribution
DATA_RARE_SHARE = sum(ZIPF[RARE]) / sum(ZIPF)


def distinct_n(texts: list[str], n: int) -> float:
    grams = [t[i : i + n] for t in texts for i in range(len(t) - n + 1)]
    return len(set(grams)) / max(len(grams), 1)


def diversity(model, args, temperature: float = 1.0) -> dict:
    prompts, cats = [], []
    for c in CATEGORIES:
        for p in PROMPTS[: args.prompts_per_category]:
            prompts.append(p.format(c=c))
            cats.append(c)
    samples, entropy = sample_responses(
        model, prompts, args.samples, 10, args.device, args.seed, temperature
    )
    valid = sum(s in CATEGORIES[c] for ss, c in zip(samples, cats) for s in ss)
    total = sum(map(len, samples))
    rare_seen = rare_total = rare_valid = 0
    answer_entropy = []
    for c in CATEGORIES:
        counts = Counter(
            s for ss, cc in zip(samples, cats) if cc == c for s in ss if s in CATEGORIES[c]
        )
        rare = CATEGORIES[c][RARE]
        rare_seen += sum(r in counts for r in rare)
        rare_total += len(rare)
        rare_valid += sum(counts[r] for r in rare)
        answer_entropy.append(_entropy(list(counts.values())))
    return {
        "distinct": sum(len({s for s in ss if s in CATEGORIES[c]}) for ss, c in zip(samples, cats))
        / len(samples),
        "distinct2": sum(distinct_n(ss, 2) for ss in samples) / len(samples),
        "entropy": entropy,
        "rare_coverage": rare_seen / rare_total,
        "rare_share": rare_valid / max(valid, 1),
        "answer_entropy": sum(answer_entropy) / len(answer_entropy),
        "valid": valid / total,
        "misspelled": sum(s not in VALID for ss in samples for s in ss)
        / total,  # not a word of any category
        "answers": Counter(s for ss in samples for s in ss),
    }


class Data(NamedTuple):
    broad_train: sft.Batches
    broad_eval: sft.Batches
    sft_train: sft.Batches
    sft_eval: sft.Batches


def make_data(args) -> Data:
    """The four data sets, all drawn from ``args.seed``."""
    rng = random.Random(args.seed)
    batches = functools.partial(sft.Batches.from_records, seq_len=args.seq_length)
    return Data(
        batches(broad_corpus(4000, rng)),
        batches(broad_corpus(256, rng)),
        batches(sft_set(2000, rng)),
        batches(sft_set(256, rng)),
    )


def evaluate(model, data: Data, args, temperature: float = 1.0) -> dict:
    """Quality, diversity and forgetting of the distribution softmax(logits / temperature):
    the held-out cross entropies are those of the distribution that is sampled."""
    ce, acc = sft.evaluate_ce(model, data.sft_eval, args.device, temperature=temperature)
    broad_ce, _ = sft.evaluate_ce(model, data.broad_eval, args.device, temperature=temperature)
    return {
        "sft_ce": ce,
        "sft_acc": acc,
        "broad_ce": broad_ce,
        **diversity(model, args, temperature),
    }


def pretrain(args, data: Data, log) -> tuple[torch.nn.Module, dict]:
    """The model, pretrained on the broad corpus with cross entropy, and a copy of its weights
    (the checkpoint every SFT run starts from)."""
    model = sft.build_model(args)
    log(
        f"pretraining on the broad corpus: {args.pretrain_iters} iterations, TP={args.tp} on {args.device}"
    )
    pre = copy.copy(args)
    pre.train_iters, pre.lr, pre.loss_type = args.pretrain_iters, args.pretrain_lr, "cross_entropy"
    sft.train(pre, model, data.broad_train, log=lambda m: log(f"[pretrain] {m}"))
    return model, copy.deepcopy(model.state_dict())


def finetune(name, loss: tuple, model, state, data: Data, args, log):
    """SFT from the pre-SFT weights ``state``; curves every eval_interval.

    ``loss``: ``("cross_entropy",)`` (Megatron's own loss) or ``("tofu", gamma, beta)``,
    as ``megatron_patch.apply`` takes them. Every run draws the same batches.
    """
    model.load_state_dict(state)
    megatron_patch.apply(*loss, backend=args.tofu_backend)
    run = copy.copy(args)
    run.lr, run.loss_type = args.sft_lr, loss[0]
    optimizer = sft.make_optimizer(run, model)
    gen = torch.Generator().manual_seed(args.seed + 1)  # identical batches for every run
    curve, done = [], 0
    while done < args.sft_iters:
        run.train_iters = min(args.eval_interval, args.sft_iters - done)
        sft.train(
            run,
            model,
            data.sft_train,
            log=lambda m: log(f"[sft {name}] {m}"),
            optimizer=optimizer,
            gen=gen,
            start=done,
            total=args.sft_iters,
        )
        done += run.train_iters
        ev = evaluate(model, data, args)
        curve.append({"iter": done, **{k: v for k, v in ev.items() if k != "answers"}})
        log(
            f"[sft {name}] eval @ {done}: sft CE {ev['sft_ce']:.3f}, broad CE {ev['broad_ce']:.3f}, "
            f"valid {ev['valid']:.2f}, answer entropy {ev['answer_entropy']:.3f}, rare share {ev['rare_share']:.3f}"
        )
    megatron_patch.revert()
    return ev, curve


def report(results: dict, curves: dict, args, out: Path, elapsed: float) -> str:
    cols = [
        ("sft_ce", "SFT CE", "{:.3f}"),
        ("sft_acc", "SFT acc", "{:.3f}"),
        ("valid", "valid samples", "{:.2f}"),
        ("distinct", "distinct valid answers/prompt", "{:.2f}"),
        ("answer_entropy", "answer entropy (nats)", "{:.3f}"),
        ("rare_share", "rare share of valid", "{:.3f}"),
        ("rare_coverage", "rare answers covered", "{:.2f}"),
        ("entropy", "first-token entropy", "{:.3f}"),
        ("distinct2", "distinct-2", "{:.3f}"),
        ("broad_ce", "broad CE (forgetting)", "{:.3f}"),
    ]
    lines = [
        f"TOFU vs cross entropy in SFT: tiny Megatron-Core GPT, TP={args.tp}, {args.device}, "
        f"gamma={args.tofu_gamma}, beta={args.tofu_beta}, {args.pretrain_iters} pretrain + "
        f"{args.sft_iters} SFT iterations, "
        f"{args.samples} samples x {len(CATEGORIES) * args.prompts_per_category} prompts, "
        f"{elapsed:.0f} s",
        "",
        "| model | " + " | ".join(c[1] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f.format(r[k]) for k, _, f in cols) + " |")
    ce, tofu = results["SFT cross_entropy"], results["SFT tofu"]
    more_div = (
        tofu["answer_entropy"] > ce["answer_entropy"] and tofu["rare_share"] > ce["rare_share"]
    )
    less_forget = tofu["broad_ce"] < ce["broad_ce"]
    verdict = [
        "",
        f"Reference: the SFT data's own answers have entropy {DATA_ANSWER_ENTROPY:.3f} nats and a rare share of "
        f"{DATA_RARE_SHARE:.3f}; the broad corpus is uniform ({math.log(8):.3f} nats, rare share 0.500).",
        f"Diversity: TOFU {'kept MORE' if more_div else 'did NOT keep more'} diversity among valid answers than CE "
        f"at this scale (answer entropy {tofu['answer_entropy']:.3f} vs {ce['answer_entropy']:.3f}, rare share "
        f"{tofu['rare_share']:.3f} vs {ce['rare_share']:.3f}, rare coverage {tofu['rare_coverage']:.2f} vs "
        f"{ce['rare_coverage']:.2f}); valid samples {tofu['valid']:.2f} vs {ce['valid']:.2f}, first-token entropy "
        f"{tofu['entropy']:.3f} vs {ce['entropy']:.3f}.",
        f"Forgetting: broad-corpus CE {tofu['broad_ce']:.3f} (TOFU) vs {ce['broad_ce']:.3f} (CE): "
        f"TOFU forgot {'less' if less_forget else 'more or as much'}.",
        f"Quality: SFT held-out CE {tofu['sft_ce']:.3f} (TOFU) vs {ce['sft_ce']:.3f} (CE), accuracy "
        f"{tofu['sft_acc']:.3f} vs {ce['sft_acc']:.3f}.",
        "Most common invalid samples: "
        + "; ".join(
            f"{name.split()[-1]}: "
            + ", ".join(
                f"{a!r}:{n}"
                for a, n in Counter(
                    {a: n for a, n in r["answers"].items() if a not in VALID}
                ).most_common(6)
            )
            for name, r in results.items()
            if name.startswith("SFT")
        ),
        "Most sampled answers: "
        + "; ".join(
            f"{name.split()[-1]}: " + ", ".join(f"{a}:{n}" for a, n in r["answers"].most_common(8))
            for name, r in results.items()
            if name.startswith("SFT")
        ),
    ]
    text = "\n".join(lines + verdict) + "\n"
    (out / "demo_results.md").write_text(text)
    # the same numbers for programs (tests/docs/test_demo.py reads the committed result's direction)
    settings = {
        k: getattr(args, k)
        for k in (
            "tp",
            "device",
            "tofu_gamma",
            "tofu_beta",
            "pretrain_iters",
            "sft_iters",
            "samples",
            "prompts_per_category",
            "seed",
        )
    }
    data = {
        "settings": {**settings, "elapsed_s": round(elapsed)},
        "machine": machine(args),
        "results": results,
        "curves": curves,
        "more_diversity": more_div,
        "less_forgetting": less_forget,
        "sft_data": {"answer_entropy": DATA_ANSWER_ENTROPY, "rare_share": DATA_RARE_SHARE},
    }
    (out / "demo_results.json").write_text(json.dumps(data, indent=1) + "\n")
    plt = pyplot()
    if plt is None:
        return text + "matplotlib not installed: no plot\n"
    keys = [
        ("sft_ce", "SFT held-out CE (quality)"),
        ("broad_ce", "broad-corpus CE (forgetting)"),
        ("answer_entropy", "answer entropy (valid samples)"),
        ("rare_share", "rare share of valid samples"),
        ("valid", "valid samples"),
    ]
    fig, axes = plt.subplots(1, 5, figsize=(22, 4))
    for ax, (k, title) in zip(axes, keys):
        for name, curve in curves.items():
            ax.plot([c["iter"] for c in curve], [c[k] for c in curve], marker="o", label=name)
        ax.axhline(results["pre-SFT"][k], color="gray", linestyle=":", label="pre-SFT")
        data_ref = {"answer_entropy": DATA_ANSWER_ENTROPY, "rare_share": DATA_RARE_SHARE}.get(k)
        if data_ref is not None:
            ax.axhline(data_ref, color="green", linestyle="--", label="SFT data")
            ax.legend(fontsize=8)
        ax.set(title=title, xlabel="SFT iteration")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(lines[0], fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "demo_curves.png", dpi=100)
    plt.close(fig)
    return text + f"plot: {out / 'demo_curves.png'}\n"


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


LOCAL_OUT = ROOT / "examples" / "results" / "local"  # git-ignored: a run never dirties the checkout
COMMITTED_OUT = ROOT / "examples" / "results"


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The model, training, sampling and output flags the demo and the study share."""
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--tp", type=int, default=None)
    p.add_argument("--num-layers", type=int, default=2)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--seq-length", type=int, default=48)
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--pretrain-iters", type=int, default=1500)
    p.add_argument("--pretrain-lr", type=float, default=2e-3)
    p.add_argument("--sft-iters", type=int, default=600)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--log-interval", type=int, default=100)
    p.add_argument("--samples", type=int, default=48, help="samples per prompt")
    p.add_argument("--prompts-per-category", type=int, default=4)
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per rank, pinned whatever OMP_NUM_THREADS says: the thread count "
        "changes the floating-point sums, hence the numbers (benchmarks/NOTES.md)",
    )
    p.add_argument("--bf16", action="store_true")
    p.add_argument(
        "--out",
        type=Path,
        default=LOCAL_OUT,
        help=f"output folder (default: {LOCAL_OUT.relative_to(ROOT)}, git-ignored; "
        f"{COMMITTED_OUT.relative_to(ROOT)} replaces the committed results)",
    )
    return megatron_patch.add_arguments(p)


class Log:
    """Rank 0's progress lines, stamped with the seconds since the start."""

    def __init__(self, rank0: bool):
        self.rank0, self.t0 = rank0, time.time()

    def __call__(self, msg: str) -> None:
        if self.rank0:
            print(f"[{self.elapsed():6.1f}s] {msg}", flush=True)

    def elapsed(self) -> float:
        return time.time() - self.t0


def start(args) -> Log:
    """Process group and Megatron state, with what makes a rerun give the same numbers pinned
    (threads per rank, deterministic kernels)."""
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    torch.use_deterministic_algorithms(True, warn_only=True)
    args.tp = args.tp or int(os.environ.get("WORLD_SIZE", "1"))
    log = Log(rank0=True)
    sft.init_parallel(args.tp, args.device)
    log.rank0 = dist.get_rank() == 0
    return log


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                line.split(":", 1)[1].strip() for line in f if line.startswith("model name")
            )
    except (OSError, StopIteration):
        return platform.processor()


def machine(args) -> dict:
    """What the numbers depend on besides the seed and the flags (they differ between machines)."""
    return {
        "cpu": _cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads_per_rank": args.threads,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
    }


def where(out: Path, target: str) -> str:
    """The closing line: where the results went, and how the committed ones are replaced."""
    committed = COMMITTED_OUT.relative_to(ROOT)
    if out.resolve() == COMMITTED_OUT.resolve():
        return f"results written to {out}: these are the COMMITTED results (see git diff before committing)"
    return (
        f"results written to {out} (the committed results in {committed}/ are unchanged; "
        f"`make {target} OUT={committed}` or --out {committed} replaces them)"
    )


def main(argv=None) -> int:
    p = add_arguments(
        argparse.ArgumentParser(
            description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    )
    p.add_argument("--eval-interval", type=int, default=150)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    log = start(args)
    data = make_data(args)
    model, state = pretrain(args, data, log)
    results = {"pre-SFT": evaluate(model, data, args)}
    curves = {}
    for name, loss in (
        ("cross_entropy", ("cross_entropy",)),
        ("tofu", ("tofu", args.tofu_gamma, args.tofu_beta)),
    ):
        log(f"fine-tuning with --loss-type {name}: {args.sft_iters} iterations")
        results[f"SFT {name}"], curves[name] = finetune(name, loss, model, state, data, args, log)
    if dist.get_rank() == 0:
        args.out.mkdir(parents=True, exist_ok=True)
        print()
        print(report(results, curves, args, args.out, log.elapsed()), flush=True)
        print(where(args.out, "demo"), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
