"""Run an unmodified Megatron-LM training script with the TOFU flags available.

    python -m megatron_patch.launch pretrain_gpt.py --loss-type tofu --tofu-gamma 3.0 \\
        --tofu-beta 0.8 [the script's Megatron arguments...]
    torchrun --nproc-per-node 8 -m megatron_patch.launch pretrain_gpt.py --loss-type tofu ...
    tofu-megatron-launch pretrain_gpt.py --loss-type tofu ...        (console script)

Installs the argument hooks (megatron_patch.arguments.install_hooks): Megatron's parser
then accepts the TOFU flags (megatron_patch.arguments.add_arguments; --help lists them), and
the patch is applied from the parsed arguments before the model is built. Then the script
runs as __main__ with the remaining arguments, exactly as `python script.py args` would.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys

from .arguments import add_arguments, install_hooks


def flags_help() -> str:
    """The TOFU flags' help, formatted by a parser of their own: the flags are defined once
    (``add_arguments``), and Megatron's parser is neither needed nor asked to format it."""
    parser = argparse.ArgumentParser(
        prog="megatron_patch.launch", usage=argparse.SUPPRESS, add_help=False
    )
    return add_arguments(parser).format_help().strip()


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        print()
        print(flags_help())
        print()
        print("Every other argument goes to the script (Megatron's own arguments).")
        return 0 if argv else 2
    script, rest = argv[0], argv[1:]
    if not os.path.isfile(script):
        print(f"megatron_patch.launch: no such training script: {script}", file=sys.stderr)
        return 2
    install_hooks()
    sys.argv = [script, *rest]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
