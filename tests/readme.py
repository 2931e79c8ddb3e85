"""The README's code blocks, read by the tests that run what the README tells users to run."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def code_block(heading: str, lang: str = "bash", text: str | None = None) -> str:
    """The first ```lang block after the markdown heading that starts with ``heading``."""
    text = README.read_text() if text is None else text
    m = re.search(r"^#+ " + re.escape(heading) + r".*?$", text, re.M)
    if m is None:
        raise LookupError(f"README has no heading starting with {heading!r}")
    block = re.search(r"^```" + lang + r"\n(.*?)^```", text[m.end():], re.M | re.S)
    if block is None:
        raise LookupError(f"README: no ```{lang} block under {heading!r}")
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
    return argv[argv.index(script) + 1:]


# Flags of the README's SFT command that belong to a GPU cluster, with their number of
# values; runs elsewhere replace them (parallel sizes, Transformer Engine, bf16, the
# distributed optimizer, checkpoints).
CLUSTER_FLAGS = {
    "--tensor-model-parallel-size": 1, "--pipeline-model-parallel-size": 1, "--sequence-parallel": 0,
    "--transformer-impl": 1, "--bf16": 0, "--use-distributed-optimizer": 0,
    "--pretrained-checkpoint": 1, "--load": 1, "--save": 1, "--save-interval": 1,
}


def sft_command() -> list[str]:
    """The README's multi-node Megatron SFT command, as argv."""
    return next(c for c in commands(code_block("Multi-node")) if "pretrain_gpt.py" in c)


def sft_flags(data, tokenizer) -> list[str]:
    """The README's SFT flags without the cluster's, with $DATA and $TOKENIZER filled in:
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
        raise ValueError(f"README SFT flags with an unknown variable: {unknown}")
    return out
