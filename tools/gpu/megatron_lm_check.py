"""Megatron-LM's own pretrain_gpt.py through the launcher: cross entropy vs TOFU, as a user runs it.

    python tools/gpu/megatron_lm_check.py --out results/          # GPU: two short training runs
    python tools/gpu/megatron_lm_check.py --smoke                  # CPU: runs to Megatron's CUDA stop

Each run is `torchrun --standalone --nproc-per-node 1 -m megatron_patch.launch
<fixture>/pretrain_gpt.py --loss-type {cross_entropy,tofu} ...` on mock data: a model
where the loss matters (4 layers, hidden 2048, vocabulary 128256, sequence 4096, bf16,
`--transformer-impl local`), the same seed and data for both. From Megatron's own log it
reads the time per iteration (median after warm-up), the peak memory Megatron reports,
and the logged values: `lm loss` and, with TOFU, `lm cross entropy` (training lines and
the validation report). Both runs start from the same weights on the same batch, so the
first iteration's `lm cross entropy` of the TOFU run must equal the `lm loss` of the
cross-entropy run: the table checks it.

The Megatron-LM scripts are a fixture of the project (never copied into the repository):
`--fixture`, else `TOFU_MEGATRON_LM_DIR`, else `.whl/megatron-lm-core_v0.19.0` (where
`tools/gpu/fetch_wheels.sh` puts a copy to take to a GPU node without network), else
`shared/fixtures/` in the checkout or a folder above it (or above the repository it was
cloned from).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAME = "megatron-lm-core_v0.19.0"

GPU_MODEL = [
    "--num-layers",
    "4",
    "--hidden-size",
    "2048",
    "--num-attention-heads",
    "16",
    "--seq-length",
    "4096",
    "--max-position-embeddings",
    "4096",
    "--micro-batch-size",
    "1",
    "--global-batch-size",
    "1",
    "--vocab-size",
    "128256",
    "--bf16",
    "--lr",
    "1e-4",
    "--min-lr",
    "1e-5",
    "--lr-decay-style",
    "cosine",
    "--weight-decay",
    "0.1",
    "--clip-grad",
    "1.0",
]
CPU_MODEL = [
    "--num-layers",
    "2",
    "--hidden-size",
    "32",
    "--num-attention-heads",
    "4",
    "--seq-length",
    "8",
    "--max-position-embeddings",
    "8",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "2",
    "--vocab-size",
    "96",
    "--lr",
    "1e-4",
]
COMMON = [
    "--mock-data",
    "--tokenizer-type",
    "NullTokenizer",
    "--transformer-impl",
    "local",
    "--seed",
    "1234",
    "--no-gradient-accumulation-fusion",
    "--no-persist-layer-norm",
    "--no-masked-softmax-fusion",
    "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion",
    "--no-rope-fusion",
    "--log-interval",
    "1",
    "--split",
    "98,2,0",
]
# SFT (docs/megatron.md's --sft flags): packed conversations, which only Transformer Engine's
# attention takes; a small model, the test tokenizer's vocabulary (tests/support/sft_data.py).
SFT_MODEL = [
    "--num-layers",
    "4",
    "--hidden-size",
    "1024",
    "--num-attention-heads",
    "16",
    "--seq-length",
    "1024",
    "--max-position-embeddings",
    "1024",
    "--micro-batch-size",
    "2",
    "--global-batch-size",
    "4",
    "--bf16",
    "--lr",
    "1e-4",
    "--transformer-impl",
    "transformer_engine",
    "--seed",
    "1234",
    "--log-interval",
    "1",
    "--split",
    "90,10,0",
    "--num-workers",
    "0",
]
RUNS = {
    "cross_entropy": ["--loss-type", "cross_entropy"],
    "tofu": ["--loss-type", "tofu", "--tofu-gamma", "3.0", "--tofu-beta", "0.8"],
}


FILES = ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py")


def _candidates(explicit: str | None):
    for c in (explicit, os.environ.get("TOFU_MEGATRON_LM_DIR")):
        if c:
            yield Path(c)
    yield ROOT / ".whl" / NAME  # tools/gpu/fetch_wheels.sh's copy, brought to an offline node
    roots = [ROOT]
    try:
        url = subprocess.run(
            ["git", "-C", str(ROOT), "config", "--get", "remote.origin.url"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        url = ""
    if url and Path(url).is_dir():  # a local clone: look beside the repository it came from
        roots.append(Path(url).resolve())
    for root in roots:
        for parent in [root, *root.parents]:
            yield parent / "shared" / "fixtures" / NAME


def find_fixture(explicit: str | None = None) -> Path | None:
    """The Megatron-LM scripts: `explicit`, `TOFU_MEGATRON_LM_DIR`, the copy in `.whl/`, or
    the project's shared fixtures beside this checkout or beside the repository it was
    cloned from. (The tests use this too.)"""
    return next((c for c in _candidates(explicit) if all((c / f).is_file() for f in FILES)), None)


_FLOAT = r"([-+0-9.eE]+|nan|inf)"


def parse_log(text: str) -> dict:
    """What Megatron's training log says: per-iteration times and losses, peak memory,
    the validation report, and whether it stopped at its CUDA check."""
    iters = []
    for line in text.splitlines():
        m = re.search(r" iteration\s+(\d+)/\s*\d+ \|", line)
        if not m:
            continue
        rec = {"iter": int(m.group(1))}
        t = re.search(r"elapsed time per iteration \(ms\): " + _FLOAT, line)
        rec["ms"] = float(t.group(1)) if t else None
        for key in ("lm loss", "lm cross entropy"):
            v = re.search(re.escape(key) + r": " + _FLOAT + r" \|", line)
            if v:
                rec[key] = float(v.group(1))
        iters.append(rec)
    mem = re.findall(
        r"memory \(MB\) \| allocated: " + _FLOAT + r" \| max allocated: " + _FLOAT, text
    )
    val = {}
    vline = next((line for line in text.splitlines() if "validation loss at" in line), "")
    for key, value in re.findall(r"(lm [a-z ]+?) value: " + _FLOAT, vline):
        val[key] = float(value)
    return {
        "iters": iters,
        "peak_mb": max((float(m[1]) for m in mem), default=None),
        "validation": val,
        "cuda_stop": "Megatron requires CUDA" in text,
        "applied": next(
            (line for line in text.splitlines() if line.startswith("megatron_patch:")), ""
        ),
    }


def ensure_dataset_helpers() -> str:
    """Megatron-LM's initialize runs `make` in megatron/core/datasets (rank 0) and exits if
    it fails. The megatron-core wheel ships the helper prebuilt (helpers_cpp*.so) but not
    the Makefile, so a pip-installed megatron-core stops there. Where the prebuilt helper is
    present and the Makefile is not, write a Makefile whose default target does nothing
    (into that installed package, on the machine running this check). Returns what it did."""
    import importlib.util

    spec = importlib.util.find_spec("megatron.core.datasets")
    if spec is None or not spec.submodule_search_locations:
        return "megatron.core.datasets not importable"
    folder = Path(list(spec.submodule_search_locations)[0])
    if (folder / "Makefile").exists():
        return f"{folder}/Makefile present"
    if not list(folder.glob("helpers_cpp*.so")):
        return f"no Makefile and no prebuilt helpers_cpp in {folder}: Megatron will fail to compile them"
    try:
        (folder / "Makefile").write_text(
            "# megatron_lm_check.py: helpers_cpp ships prebuilt in the wheel\nall:\n\t@true\n"
        )
    except OSError as e:
        return f"could not write {folder}/Makefile ({e})"
    return f"wrote a no-op {folder}/Makefile (the wheel ships helpers_cpp prebuilt, without its Makefile)"


def run(fixture: Path, name: str, flags: list[str], log_path: Path, timeout: float) -> dict:
    """One `torchrun ... -m megatron_patch.launch <fixture>/pretrain_gpt.py flags`, its log parsed."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "1",
        "-m",
        "megatron_patch.launch",
        str(fixture / "pretrain_gpt.py"),
        *flags,
    ]
    env = {
        **os.environ,
        "CUDA_DEVICE_MAX_CONNECTIONS": "1",
        "OMP_NUM_THREADS": "4",
        "PYTHONUNBUFFERED": "1",
    }
    t0 = time.time()
    print(f"[megatron_lm_check] {name}: {' '.join(cmd[5:])}", flush=True)
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
        text, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        text = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(
            errors="replace"
        )
        rc = "timeout"
    log_path.write_text(text)
    res = parse_log(text)
    res.update(rc=rc, wall_s=time.time() - t0)
    print(
        f"[megatron_lm_check] {name}: exit {rc} in {res['wall_s']:.0f} s, {len(res['iters'])} iterations logged",
        flush=True,
    )
    return res


def pretrain_flags(loss: str, smoke: bool, iters: int) -> list[str]:
    eval_args = ["--train-iters", str(iters), "--eval-interval", str(iters), "--eval-iters", "2"]
    return [*RUNS[loss], *(CPU_MODEL if smoke else GPU_MODEL), *COMMON, *eval_args]


def sft_flags(loss: str, data: Path, tokenizer: Path, iters: int) -> list[str]:
    """docs/megatron.md's SFT command (its loss, --sft, tokenizer and data flags, read from that
    page as the tests do) on one GPU with Transformer Engine, a small model and packed sequences."""
    sys.path.insert(0, str(ROOT))
    try:
        from tests.support import readme
    finally:
        sys.path.remove(str(ROOT))
    eval_args = ["--train-iters", str(iters), "--eval-interval", str(iters), "--eval-iters", "2"]
    return [*readme.sft_flags(data, tokenizer), *RUNS[loss][:2], *SFT_MODEL, *eval_args]


def _fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def report(results: dict, warmup: int, smoke: bool, title: str) -> tuple[str, bool]:
    lines = [title, ""]
    ok = True
    if smoke:
        lines.append(
            "CPU smoke: Megatron stops at its own CUDA check after parsing; NOT a training result."
        )
    lines += [
        "",
        "| --loss-type | exit | iterations | ms/iter (median after warm-up) | peak max allocated MB | "
        "first lm loss | first lm cross entropy | last lm loss | last lm cross entropy | "
        "validation lm loss | validation lm cross entropy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for loss, r in results.items():
        its = r["iters"]
        times = [i["ms"] for i in its if i["iter"] > warmup and i["ms"] is not None]
        med = statistics.median(times) if times else None
        first, last = (its[0], its[-1]) if its else ({}, {})
        lines.append(
            f"| {loss} | {r['rc']} | {len(its)} | {_fmt(med, '.1f')} | {_fmt(r['peak_mb'], '.0f')} | "
            f"{_fmt(first.get('lm loss'))} | {_fmt(first.get('lm cross entropy'))} | {_fmt(last.get('lm loss'))} | "
            f"{_fmt(last.get('lm cross entropy'))} | {_fmt(r['validation'].get('lm loss'))} | "
            f"{_fmt(r['validation'].get('lm cross entropy'))} |"
        )
        if smoke:
            ok &= r["cuda_stop"] and r["applied"] != ""
        else:
            ok &= r["rc"] == 0 and len(its) > warmup
            keys = ("lm loss", "lm cross entropy") if loss == "tofu" else ("lm loss",)
            ok &= bool(its) and all(k in its[-1] for k in keys)
    lines += [""] + [f"- {loss}: `{r['applied']}`" for loss, r in results.items()]
    if not smoke and all(r["iters"] for r in results.values()):
        ce0 = results["cross_entropy"]["iters"][0].get("lm loss")
        tofu_ce0 = results["tofu"]["iters"][0].get("lm cross entropy")
        if ce0 is not None and tofu_ce0 is not None:
            rel = abs(ce0 - tofu_ce0) / abs(ce0)
            same = rel < 1e-3
            ok &= same
            lines.append(
                f"- first iteration, same weights and batch: cross-entropy run `lm loss` {ce0:.6f}, "
                f"TOFU run `lm cross entropy` {tofu_ce0:.6f} (rel. diff {rel:.1e}): "
                f"{'equal' if same else 'DIFFERENT'}"
            )
        ms = {
            k: statistics.median(
                [i["ms"] for i in r["iters"] if i["iter"] > warmup] or [float("nan")]
            )
            for k, r in results.items()
        }
        lines.append(
            f"- TOFU step time / cross-entropy step time: {ms['tofu'] / ms['cross_entropy']:.3f}x; "
            f"peak memory: {_fmt(results['tofu']['peak_mb'], '.0f')} vs "
            f"{_fmt(results['cross_entropy']['peak_mb'], '.0f')} MB"
        )
    lines.append(f"\nResult: {'OK' if ok else 'FAILED'}")
    return "\n".join(lines) + "\n", ok


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--fixture", default=None)
    p.add_argument(
        "--smoke", action="store_true", help="CPU: tiny model, runs to Megatron's CUDA stop"
    )
    p.add_argument("--iters", type=int, default=25)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--timeout", type=float, default=150, help="seconds per run")
    p.add_argument("--out", type=Path, default=Path("."))
    args = p.parse_args(argv)
    fixture = find_fixture(args.fixture)
    if fixture is None:
        why = (
            f"the Megatron-LM fixture {NAME} was not found (--fixture, TOFU_MEGATRON_LM_DIR, "
            "or tools/gpu/fetch_wheels.sh)"
        )
        print(f"megatron_lm_check: {why}", file=sys.stderr)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "megatron_lm.md").write_text(
            f"# Megatron-LM pretrain_gpt.py: not run\n\n{why}.\n"
        )
        return 0 if args.smoke else 2  # with a GPU a missing fixture is a failure
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU)"
    args.out.mkdir(parents=True, exist_ok=True)
    helpers = (
        "not needed (smoke: Megatron stops before)" if args.smoke else ensure_dataset_helpers()
    )
    print(f"[megatron_lm_check] dataset helpers: {helpers}", flush=True)
    results, logs = {}, []
    for loss in RUNS:
        log = args.out / f"megatron_lm_{loss}.log"
        results[loss] = run(
            fixture, loss, pretrain_flags(loss, args.smoke, args.iters), log, args.timeout
        )
        logs.append((loss, log))
    title = f"# Megatron-LM pretrain_gpt.py (core_v0.19.0) through megatron_patch.launch on {gpu}"
    md, ok = report(results, args.warmup, args.smoke, title)
    md = md.replace("\n\n|", f"\n\nMegatron's dataset helpers: {helpers}.\n\n|", 1)
    sft_md, sft_ok = sft(fixture, args, logs)
    md, ok = md + sft_md, ok and sft_ok
    # one file to read: the tables, then the tail of each log
    for name, log in logs:
        tail = "\n".join(log.read_text().splitlines()[-40:])
        md += f"\n## {name}: last 40 lines of the log\n\n```\n{tail}\n```\n"
        log.unlink()
    (args.out / "megatron_lm.md").write_text(md)
    print(md.split("\n## ")[0])
    return 0 if ok else 1


def sft(fixture: Path, args, logs: list) -> tuple[str, bool]:
    """docs/megatron.md's SFT command both ways, where it can run: a GPU with Transformer Engine
    (only its attention takes --sft's packed sequences). Elsewhere it says why it did not run."""
    import importlib.util

    head = "\n## SFT: docs/megatron.md's --sft command (SFTTokenizer, packed conversations)\n\n"
    if args.smoke:
        return (
            head
            + "not run: CPU smoke (tests/megatron/test_megatron_sft.py runs SFT batches on the CPU)\n",
            True,
        )
    if importlib.util.find_spec("transformer_engine") is None:
        return head + (
            "not run: needs Transformer Engine (megatron-core's local attention refuses packed "
            "sequences, and --sft always packs)\n"
        ), True
    sys.path.insert(0, str(ROOT))
    try:
        from tests.support.sft_data import write_chat_jsonl, write_tokenizer
    finally:
        sys.path.remove(str(ROOT))
    data_dir = args.out / "sft_data"
    data_dir.mkdir(exist_ok=True)
    data = write_chat_jsonl(data_dir / "chat.jsonl", repeat=64, per_line=8)
    tok = write_tokenizer(data_dir / "tokenizer")
    results = {}
    for loss in RUNS:
        log = args.out / f"megatron_lm_sft_{loss}.log"
        results[loss] = run(
            fixture, f"sft {loss}", sft_flags(loss, data, tok, args.iters), log, args.timeout
        )
        logs.append((f"sft {loss}", log))
    md, ok = report(results, args.warmup, False, head.strip())
    shutil.rmtree(data_dir, ignore_errors=True)
    return "\n" + md, ok


if __name__ == "__main__":
    sys.exit(main())
