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
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import megatron_patch  # noqa: E402
import tiny_sft as sft  # noqa: E402  (examples/tiny_sft.py, beside this script)

CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "plum"],
    "colour": ["red", "blue", "green", "yellow", "purple", "orange", "pink", "brown"],
    "animal": ["cat", "dog", "horse", "tiger", "zebra", "otter", "camel", "moose"],
    "tool": ["hammer", "saw", "drill", "wrench", "pliers", "chisel", "file", "level"],
}
VALID = {a for answers in CATEGORIES.values() for a in answers}
PROMPTS = ["name a {c}:", "give me a {c}:", "one {c}, please:", "say a {c}:"]
BROAD_TEMPLATES = [
    "the {c} {x} is here.", "i saw a {x} today.", "{x} is a {c}.", "we talked about the {x}.",
    "my friend likes the {c} {x}.", "a {x} and a {y} are both {c}s.", "is the {x} a {c}? yes.",
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
def sample_responses(model, prompts: list[str], k: int, max_new: int, device: str, seed: int):
    """k samples per prompt at temperature 1 (identical on every TP rank), and the
    next-token entropy at the first response position."""
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
        probs = torch.softmax(nxt, dim=-1)
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
        resp = tokens[i, len(r):].tolist()
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


def diversity(model, args, device: str) -> dict:
    prompts, cats = [], []
    for c in CATEGORIES:
        for p in PROMPTS[: args.prompts_per_category]:
            prompts.append(p.format(c=c))
            cats.append(c)
    samples, entropy = sample_responses(model, prompts, args.samples, 10, device, args.seed)
    valid = sum(s in CATEGORIES[c] for ss, c in zip(samples, cats) for s in ss)
    total = sum(map(len, samples))
    rare_seen = rare_total = rare_valid = 0
    answer_entropy = []
    for c in CATEGORIES:
        counts = Counter(s for ss, cc in zip(samples, cats) if cc == c for s in ss if s in CATEGORIES[c])
        rare = CATEGORIES[c][RARE]
        rare_seen += sum(r in counts for r in rare)
        rare_total += len(rare)
        rare_valid += sum(counts[r] for r in rare)
        answer_entropy.append(_entropy(list(counts.values())))
    return {
        "distinct": sum(len({s for s in ss if s in CATEGORIES[c]}) for ss, c in zip(samples, cats)) / len(samples),
        "distinct2": sum(distinct_n(ss, 2) for ss in samples) / len(samples),
        "entropy": entropy,
        "rare_coverage": rare_seen / rare_total,
        "rare_share": rare_valid / max(valid, 1),
        "answer_entropy": sum(answer_entropy) / len(answer_entropy),
        "valid": valid / total,
        "answers": Counter(s for ss in samples for s in ss),
    }


def evaluate(model, sft_eval, broad_eval, args, device) -> dict:
    ce, acc = sft.evaluate_ce(model, sft_eval, device)
    broad_ce, _ = sft.evaluate_ce(model, broad_eval, device)
    return {"sft_ce": ce, "sft_acc": acc, "broad_ce": broad_ce, **diversity(model, args, device)}


def finetune(name, model, state, sft_train, sft_eval, broad_eval, args, device, log):
    """SFT from the pre-SFT weights with ``name``'s loss; curves every eval_interval."""
    model.load_state_dict(state)
    if name == "tofu":
        megatron_patch.apply("tofu", args.tofu_gamma, args.tofu_beta, args.tofu_backend)
    else:
        megatron_patch.apply("cross_entropy")
    run = copy.copy(args)
    run.lr, run.loss_type = args.sft_lr, name
    optimizer = sft.make_optimizer(run, model)
    gen = torch.Generator().manual_seed(args.seed + 1)  # identical batches for both runs
    curve, done = [], 0
    while done < args.sft_iters:
        run.train_iters = min(args.eval_interval, args.sft_iters - done)
        sft.train(run, model, sft_train, log=lambda m: log(f"[sft {name}] {m}"),
                  optimizer=optimizer, gen=gen, start=done)
        done += run.train_iters
        ev = evaluate(model, sft_eval, broad_eval, args, device)
        curve.append({"iter": done, **{k: v for k, v in ev.items() if k != "answers"}})
        log(f"[sft {name}] eval @ {done}: sft CE {ev['sft_ce']:.3f}, broad CE {ev['broad_ce']:.3f}, "
            f"valid {ev['valid']:.2f}, answer entropy {ev['answer_entropy']:.3f}, rare share {ev['rare_share']:.3f}")
    megatron_patch.revert()
    return ev, curve


def report(results: dict, curves: dict, args, out: Path, elapsed: float) -> str:
    cols = [("sft_ce", "SFT CE", "{:.3f}"), ("sft_acc", "SFT acc", "{:.3f}"),
            ("valid", "valid samples", "{:.2f}"), ("distinct", "distinct valid answers/prompt", "{:.2f}"),
            ("answer_entropy", "answer entropy (nats)", "{:.3f}"), ("rare_share", "rare share of valid", "{:.3f}"),
            ("rare_coverage", "rare answers covered", "{:.2f}"), ("entropy", "first-token entropy", "{:.3f}"),
            ("distinct2", "distinct-2", "{:.3f}"), ("broad_ce", "broad CE (forgetting)", "{:.3f}")]
    lines = [
        f"TOFU vs cross entropy in SFT: tiny Megatron-Core GPT, TP={args.tp}, {args.device}, "
        f"gamma={args.tofu_gamma}, beta={args.tofu_beta}, {args.pretrain_iters} pretrain + "
        f"{args.sft_iters} SFT iterations, {args.samples} samples x {len(CATEGORIES) * args.prompts_per_category} prompts, "
        f"{elapsed:.0f} s",
        "",
        "| model | " + " | ".join(c[1] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f.format(r[k]) for k, _, f in cols) + " |")
    ce, tofu = results["SFT cross_entropy"], results["SFT tofu"]
    more_div = tofu["answer_entropy"] > ce["answer_entropy"] and tofu["rare_share"] > ce["rare_share"]
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
        + "; ".join(f"{name.split()[-1]}: " + ", ".join(
            f"{a!r}:{n}" for a, n in Counter({a: n for a, n in r["answers"].items() if a not in VALID}).most_common(6))
            for name, r in results.items() if name.startswith("SFT")),
        "Most sampled answers: "
        + "; ".join(f"{name.split()[-1]}: " + ", ".join(f"{a}:{n}" for a, n in r["answers"].most_common(8))
                    for name, r in results.items() if name.startswith("SFT")),
    ]
    text = "\n".join(lines + verdict) + "\n"
    (out / "demo_results.md").write_text(text)
    # the same numbers for programs (tests/test_demo.py reads the committed result's direction)
    settings = {k: getattr(args, k) for k in ("tp", "device", "tofu_gamma", "tofu_beta", "pretrain_iters", "sft_iters",
                                              "samples", "prompts_per_category", "seed")}
    data = {"settings": {**settings, "elapsed_s": round(elapsed)}, "results": results, "curves": curves,
            "more_diversity": more_div, "less_forgetting": less_forget,
            "sft_data": {"answer_entropy": DATA_ANSWER_ENTROPY, "rare_share": DATA_RARE_SHARE}}
    (out / "demo_results.json").write_text(json.dumps(data, indent=1) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        keys = [("sft_ce", "SFT held-out CE (quality)"), ("broad_ce", "broad-corpus CE (forgetting)"),
                ("answer_entropy", "answer entropy (valid samples)"), ("rare_share", "rare share of valid samples"),
                ("valid", "valid samples")]
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
        text += f"plot: {out / 'demo_curves.png'}\n"
    except ImportError:
        text += "matplotlib not installed: no plot\n"
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    p.add_argument("--eval-interval", type=int, default=150)
    p.add_argument("--log-interval", type=int, default=100)
    p.add_argument("--samples", type=int, default=48, help="samples per prompt")
    p.add_argument("--prompts-per-category", type=int, default=4)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "examples" / "results")
    megatron_patch.add_arguments(p)
    args = p.parse_args(argv)
    args.tp = args.tp or int(os.environ.get("WORLD_SIZE", "1"))
    t0 = time.time()
    sft.init_parallel(args.tp, args.device)
    rank0 = dist.get_rank() == 0

    def log(msg):
        if rank0:
            print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    rng = random.Random(args.seed)
    broad_train = sft.Batches.from_records(broad_corpus(4000, rng), args.seq_length)
    broad_eval = sft.Batches.from_records(broad_corpus(256, rng), args.seq_length)
    sft_train = sft.Batches.from_records(sft_set(2000, rng), args.seq_length)
    sft_eval = sft.Batches.from_records(sft_set(256, rng), args.seq_length)

    model = sft.build_model(args)
    log(f"pretraining on the broad corpus: {args.pretrain_iters} iterations, TP={args.tp} on {args.device}")
    pre = copy.copy(args)
    pre.train_iters, pre.lr, pre.loss_type = args.pretrain_iters, args.pretrain_lr, "cross_entropy"
    sft.train(pre, model, broad_train, log=lambda m: log(f"[pretrain] {m}"))
    state = copy.deepcopy(model.state_dict())  # the one checkpoint both SFT runs start from
    results = {"pre-SFT": evaluate(model, sft_eval, broad_eval, args, args.device)}
    curves = {}
    for name in ("cross_entropy", "tofu"):
        log(f"fine-tuning with --loss-type {name}: {args.sft_iters} iterations")
        results[f"SFT {name}"], curves[name] = finetune(
            name, model, state, sft_train, sft_eval, broad_eval, args, args.device, log)
    if rank0:
        args.out.mkdir(parents=True, exist_ok=True)
        print()
        print(report(results, curves, args, args.out, time.time() - t0), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
