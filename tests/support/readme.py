"""The code blocks of README.md and of every docs/*.md page, read by the tests that run what
the documentation tells users to run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from .checkout import ROOT

README = ROOT / "README.md"
DOCS = ROOT / "docs"
MEGATRON = DOCS / "megatron.md"  # the SFT command, the prompt-format table
STUDY = DOCS / "study.md"  # the demo's and the study's tables
BENCHMARKS = DOCS / "benchmarks.md"  # the benchmark's conditions, the Megatron step times


def pages() -> list[Path]:
    """Every page whose code blocks the tests run or map: the README and each docs/*.md."""
    return [README, *sorted(DOCS.glob("*.md"))]


def blocks(lang: str) -> list[tuple[Path, str]]:
    """Every ```lang block of every page, as (page, block)."""
    return [
        (page, b)
        for page in pages()
        for b in re.findall(r"^```" + lang + r"\n(.*?)^```", page.read_text(), re.M | re.S)
    ]


def section(page: Path, heading: str) -> str:
    """The text of ``page`` under the ``## heading`` (exact), up to the next ``## `` heading or the end."""
    text = page.read_text()
    m = re.search(r"^## " + re.escape(heading) + r"$", text, re.M)
    if m is None:
        raise LookupError(f"{page.name} has no heading '## {heading}'")
    rest = text[m.end() :]
    end = re.search(r"^## ", rest, re.M)
    return rest if end is None else rest[: end.start()]


def code_block(
    heading: str, lang: str = "bash", text: str | None = None, page: Path = README
) -> str:
    """The first ```lang block after the markdown heading of ``page`` that starts with ``heading``."""
    text = page.read_text() if text is None else text
    m = re.search(r"^#+ " + re.escape(heading) + r".*?$", text, re.M)
    if m is None:
        raise LookupError(f"{page.name} has no heading starting with {heading!r}")
    block = re.search(r"^```" + lang + r"\n(.*?)^```", text[m.end() :], re.M | re.S)
    if block is None:
        raise LookupError(f"{page.name}: no ```{lang} block under {heading!r}")
    return block.group(1)


def commands(block: str) -> list[list[str]]:
    """The shell commands of a block as argv lists: comments dropped, backslash continuations
    joined, and lines that stand for the user's own arguments (starting with ``...``) left out."""
    lines, out = [], []
    for raw in block.splitlines():
        line = raw.split(" #", 1)[0].rstrip() if not raw.lstrip().startswith("#") else ""
        if line.strip().startswith("..."):
            line = "\\" if lines else ""
        lines.append(line)
    for cmd in re.split(r"(?<!\\)\n", "\n".join(lines)):
        cmd = cmd.replace("\\\n", " ").strip().rstrip("\\").strip()
        if cmd:
            out.append(shlex.split(cmd))
    return out


def script_arguments(argv: list[str], script: str) -> list[str]:
    """The arguments after ``script`` in a launcher command line."""
    return argv[argv.index(script) + 1 :]


# Flags of docs/megatron.md's SFT command that belong to a GPU cluster, with their number of
# values; runs elsewhere replace them (parallel sizes, Transformer Engine, bf16, the
# distributed optimizer, checkpoints).
CLUSTER_FLAGS = {
    "--tensor-model-parallel-size": 1,
    "--pipeline-model-parallel-size": 1,
    "--sequence-parallel": 0,
    "--transformer-impl": 1,
    "--bf16": 0,
    "--use-distributed-optimizer": 0,
    "--pretrained-checkpoint": 1,
    "--load": 1,
    "--save": 1,
    "--save-interval": 1,
}


def sft_command() -> list[str]:
    """docs/megatron.md's multi-node Megatron SFT command, as argv."""
    return next(
        c for c in commands(code_block("Multi-node", page=MEGATRON)) if "pretrain_gpt.py" in c
    )


def sft_flags(data, tokenizer) -> list[str]:
    """docs/megatron.md's SFT flags without the cluster's, with $DATA and $TOKENIZER filled in:
    the loss flags, --sft, the tokenizer and its prompt format, the data flags."""
    args, out, i = script_arguments(sft_command(), "pretrain_gpt.py"), [], 0
    while i < len(args):
        if args[i] in CLUSTER_FLAGS:
            i += 1 + CLUSTER_FLAGS[args[i]]
            continue
        out.append(args[i].replace("$DATA", str(data)).replace("$TOKENIZER", str(tokenizer)))
        i += 1
    unknown = [a for a in out if "$" in a]
    if unknown:
        raise ValueError(f"docs/megatron.md SFT flags with an unknown variable: {unknown}")
    return out
