"""The launcher's --help lists every flag megatron_patch adds: a user finds
them there, without Megatron's parser (whose own --help has crashed upstream on a "%" in a help
string)."""

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

import megatron_patch
from tests.support.checkout import ROOT


def _help(*cmd: str) -> str:
    out = subprocess.run(
        [*cmd, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stdout + out.stderr[-3000:]
    return out.stdout


@pytest.mark.parametrize("how", ["python -m megatron_patch.launch", "tofu-megatron-launch"])
def test_launcher_help_lists_every_flag(how):
    """Every option add_arguments adds (read from a parser it fills, not from a list kept here)
    is in the help, with its help text, and the help does not import Megatron."""
    if how == "tofu-megatron-launch":
        script = Path(sys.executable).parent / "tofu-megatron-launch"
        if not script.exists():
            pytest.skip(
                "the console script is not installed in this environment (pip install -e . makes it)"
            )
        text = _help(str(script))
    else:
        text = _help(sys.executable, "-m", "megatron_patch.launch")
    actions = [
        a for a in megatron_patch.add_arguments(argparse.ArgumentParser(add_help=False))._actions
    ]
    flags = [f for a in actions for f in a.option_strings]
    assert len([f for f in flags if f.startswith("--tofu-")]) >= 5 and "--loss-type" in flags, flags
    assert [f for f in flags if f not in text] == [], text
    words = " ".join(text.split())  # argparse wraps the help texts: compare their words
    for action in actions:
        assert " ".join(action.help.split()) in words, (action.option_strings, text)


def test_launcher_help_does_not_import_megatron():
    code = (
        "import sys, contextlib, io; from megatron_patch import launch; "
        "contextlib.redirect_stdout(io.StringIO()).__enter__(); rc = launch.main(['--help']); "
        "sys.__stdout__.write(repr((rc, sorted(m for m in sys.modules if m.split('.')[0] == 'megatron'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout == "(0, [])", out.stdout
