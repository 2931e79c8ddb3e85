"""megatron_patch on a real tiny Megatron-Core GPTModel (TP=2, gloo, CPU), and the flags."""

from __future__ import annotations

import sys

import pytest
import torch

from tests.support.megatron_utils import require_megatron_core

require_megatron_core()

import megatron_patch  # noqa: E402
import tofu_kernels as tk  # noqa: E402
from megatron_patch import settings  # noqa: E402
from tests.support.dist_utils import run_distributed  # noqa: E402
from tests.support.helpers import assert_loss_close  # noqa: E402
from tests.support.megatron_utils import (  # noqa: E402
    assert_ce_mode_matches_megatron,
    causal_mask,
    gather_vocab,
    init_megatron_cpu,
    tiny_gpt,
)
from tofu_kernels import patching  # noqa: E402
from tofu_kernels.params import TOFUParams  # noqa: E402

TP = 2


def _batch(vocab, b=2, s=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    labels = torch.randint(0, vocab, (b, s), generator=g)
    return ids, torch.arange(s).expand(b, s), causal_mask(s), labels


def loss_cases(rank: int, world: int) -> None:
    """Patched per-token loss == float64 TOFU on the gathered logits; SP on/off; fp32/bf16."""
    init_megatron_cpu(world)
    from megatron.core.models.common.language_module.language_module import LanguageModule

    original = LanguageModule.__dict__["compute_language_model_loss"]
    for sp in (False, True):
        for dtype in (torch.float32, torch.bfloat16):
            model = tiny_gpt(world, sequence_parallel=sp, dtype=dtype)
            ids, pos, mask, labels = _batch(96)
            logits_shard = model(ids, pos, mask)  # labels=None: [b, s, V/tp] logits
            full = gather_vocab(logits_shard.detach())  # Float16Module returns them as fp32
            assert torch.equal(full, full.to(dtype).float()), "logits are not model-dtype values"
            megatron_patch.apply("tofu", gamma=3.0, beta=0.8, backend="torch")
            seen = []
            real = megatron_patch.patch.loss_of_logits

            def spy(logits, labels, params, tp):
                seen.append((logits.dtype, logits.data_ptr(), params.inplace_backward))  # noqa: B023
                return real(logits, labels, params, tp)  # noqa: B023

            with pytest.MonkeyPatch.context() as mp:  # where the patch looks up tofu_kernels' loss
                mp.setattr(megatron_patch.patch, "loss_of_logits", spy)
                loss = model(ids, pos, mask, labels=labels)
            # model-dtype logits consumed as they are (no .float() copy), grad in place
            assert seen and seen[0][0] == dtype and seen[0][2] is True
            assert loss.shape == labels.shape and loss.dtype == torch.float32
            ref, ref_ce = tk.tofu_loss_reference(full, labels, gamma=3.0, beta=0.8)
            assert_loss_close(loss.detach(), ref)
            assert_loss_close(megatron_patch.cross_entropy_of(loss), ref_ce)
            loss.mean().backward()  # gradient flows through the in-place backward
            assert all(
                torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None
            )
            megatron_patch.revert()
            assert LanguageModule.__dict__["compute_language_model_loss"] is original


def gradient_cases(rank: int, world: int) -> None:
    """gamma=0, beta=1: parameter gradients equal unpatched Megatron's (fp32)."""
    init_megatron_cpu(world)
    for sp in (False, True):
        for backend in ("torch", "triton"):
            model = tiny_gpt(world, sequence_parallel=sp, dtype=torch.float32)
            ids, pos, mask, labels = _batch(96, seed=2)
            loss_mask = torch.ones_like(labels, dtype=torch.float32)
            loss_mask[:, :3] = 0  # SFT-style prompt tokens
            assert_ce_mode_matches_megatron(model, ids, pos, mask, labels, loss_mask, backend)


def bert_t5_cases(rank: int, world: int) -> None:
    """BERT's masked-LM loss and T5's decoder LM loss go through the same method: TOFU too."""
    init_megatron_cpu(world)
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel
    from megatron.core.models.T5.t5_model import T5Model
    from megatron.core.models.T5.t5_spec import (
        get_t5_decoder_with_local_block_spec,
        get_t5_encoder_with_local_block_spec,
    )
    from megatron.core.transformer.transformer_config import TransformerConfig

    torch.manual_seed(0)
    cfg = TransformerConfig(
        num_layers=2,
        hidden_size=32,
        num_attention_heads=4,
        use_cpu_initialization=True,
        tensor_model_parallel_size=world,
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    b, s, v = 2, 8, 96
    ids, labels = torch.randint(0, v, (b, s)), torch.randint(0, v, (b, s))
    bert = BertModel(
        cfg,
        num_tokentypes=0,
        transformer_layer_spec=bert_layer_local_spec,
        vocab_size=v,
        max_sequence_length=s,
        add_binary_head=False,
    )
    t5 = T5Model(
        cfg,
        cfg,
        get_t5_encoder_with_local_block_spec(2),
        get_t5_decoder_with_local_block_spec(2),
        vocab_size=v,
        max_sequence_length=s,
    )
    dec_ids = torch.randint(0, v, (b, s))
    no_mask = torch.zeros(b, 1, s, s, dtype=torch.bool)
    causal = ~torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None].expand(b, 1, s, s)
    runs = {
        "bert": lambda **k: bert(
            ids, torch.ones(b, s), **({"lm_labels": k["labels"]} if k else {})
        ),
        "t5": lambda **k: t5(
            ids, dec_ids, no_mask, causal, no_mask, **({"lm_labels": k["labels"]} if k else {})
        ),
    }
    for name, run in runs.items():
        with torch.no_grad():
            out = run()
            full = gather_vocab((out[0] if isinstance(out, tuple) else out).detach())  # [b, s, V]
        megatron_patch.apply("tofu", gamma=2.0, beta=0.7, backend="torch")
        out = run(labels=labels)
        loss = out[0] if isinstance(out, tuple) else out
        megatron_patch.revert()
        ref, ref_ce = tk.tofu_loss_reference(full, labels, gamma=2.0, beta=0.7)
        assert_loss_close(loss.detach(), ref), name
        assert_loss_close(megatron_patch.cross_entropy_of(loss), ref_ce), name
        loss.sum().backward()


@pytest.mark.slow
@pytest.mark.parametrize(
    "cases", [loss_cases, gradient_cases, bert_t5_cases], ids=["loss", "grads", "bert_t5"]
)
def test_tiny_gpt_tp2(cases):
    run_distributed(TP, cases)


# ------------------------------------------------------------ apply / revert


def _original():
    from megatron.core.models.common.language_module.language_module import LanguageModule

    return LanguageModule, LanguageModule.__dict__["compute_language_model_loss"]


def test_apply_twice_and_revert_restore_the_original_object():
    cls, original = _original()
    try:
        megatron_patch.apply("tofu", 3.0, 0.8)
        patched = cls.__dict__["compute_language_model_loss"]
        assert patched is not original and megatron_patch.is_applied()
        megatron_patch.apply("tofu", 1.0, 0.5)  # harmless: same function, new settings
        assert cls.__dict__["compute_language_model_loss"] is patched
        assert megatron_patch.tofu_params().gamma == 1.0
        megatron_patch.revert()
        assert cls.__dict__["compute_language_model_loss"] is original
        megatron_patch.revert()  # reverting twice is harmless too
        assert cls.__dict__["compute_language_model_loss"] is original
    finally:
        megatron_patch.revert()


def test_stale_reference_after_revert_calls_megatrons_loss(monkeypatch):
    """A function object captured while patched falls back to Megatron's loss after revert."""
    cls, original = _original()
    calls = []
    monkeypatch.setattr(
        cls, "compute_language_model_loss", lambda self, lab, log: calls.append(1) or "ce"
    )
    try:
        megatron_patch.apply("tofu")
        stale = cls.__dict__["compute_language_model_loss"]
    finally:
        megatron_patch.revert()
    assert stale(object(), None, None) == "ce" and calls == [1]


def test_cross_entropy_leaves_megatron_untouched():
    cls, original = _original()
    megatron_patch.apply("cross_entropy")
    assert cls.__dict__["compute_language_model_loss"] is original
    assert not megatron_patch.is_applied()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(loss_type="focal"), "loss_type"),
        (dict(gamma=-1.0), "gamma"),
        (dict(beta=0.0), "beta"),
        (dict(backend="xla"), "backend"),
    ],
)
def test_apply_rejects_bad_settings(kwargs, match):
    cls, original = _original()
    with pytest.raises(ValueError, match=match):
        megatron_patch.apply(**{"loss_type": "tofu", **kwargs})
    assert cls.__dict__["compute_language_model_loss"] is original


def test_missing_megatron_symbol_is_named(monkeypatch):
    import megatron.core.models.common.language_module.language_module as lm

    monkeypatch.delattr(lm.LanguageModule, "compute_language_model_loss")
    with pytest.raises(ImportError, match="LanguageModule.compute_language_model_loss not found"):
        megatron_patch.apply("tofu")
    megatron_patch.revert()  # nothing was patched: nothing to look up, no error


# ------------------------------------------------------------ flags, Megatron's parser


@pytest.fixture
def hooked(monkeypatch):
    megatron_patch.install_hooks()
    yield
    megatron_patch.remove_hooks()
    megatron_patch.revert()


def _parse(monkeypatch, *argv):
    from megatron.training import arguments

    monkeypatch.setattr(sys, "argv", ["pretrain_gpt.py", *argv])
    return arguments.parse_args()


def test_megatron_parser_accepts_flags_and_applies(monkeypatch, hooked):
    cls, original = _original()
    args = _parse(
        monkeypatch,
        "--loss-type",
        "tofu",
        "--tofu-gamma",
        "2.5",
        "--tofu-beta",
        "0.7",
        "--tofu-backend",
        "torch",
        "--num-layers",
        "2",
    )
    assert (args.loss_type, args.tofu_gamma, args.tofu_beta, args.tofu_backend) == (
        "tofu",
        2.5,
        0.7,
        "torch",
    )
    assert args.num_layers == 2  # Megatron's own flags still parse
    assert megatron_patch.tofu_params() == TOFUParams(
        gamma=2.5,
        beta=0.7,
        backend="torch",
        reduction="none",
        inplace_backward=True,
        return_ce=True,
    )
    assert cls.__dict__["compute_language_model_loss"] is not original


def test_megatron_parser_defaults_leave_megatron_unchanged(monkeypatch, hooked):
    cls, original = _original()
    args = _parse(monkeypatch)
    assert args.loss_type == "cross_entropy" and args.tofu_gamma == 3.0 and args.tofu_beta == 0.8
    assert cls.__dict__["compute_language_model_loss"] is original


def test_chunk_size_default_is_the_documented_rule(monkeypatch):
    """--tofu-chunk-size's default (None) makes the fused output step use
    fused_linear.fused_chunk_rows, the rule docs/megatron.md's flag table states: N/16 tokens
    rounded up to 64-token tiles, fewer where a 128 MiB [chunk, V/tp] logits block holds
    fewer (rounded down, at least 64), at most N."""
    import argparse
    import inspect
    import types

    from megatron_patch import fused_linear

    args = megatron_patch.add_arguments(argparse.ArgumentParser()).parse_args(
        ["--loss-type", "tofu", "--tofu-fused-linear"]
    )
    assert args.tofu_chunk_size is None
    assert inspect.signature(megatron_patch.apply).parameters["chunk_size"].default is None
    rows = fused_linear.fused_chunk_rows  # (tokens N, V/tp, bytes per logit)
    assert rows(16384, 1000, 2) == 1024  # N/16
    assert rows(16385, 1000, 2) == 1088  # N/16 rounded up to whole 64-token tiles
    assert rows(100, 1000, 2) == 64 and rows(40, 1000, 2) == 40  # at least 64, at most N
    assert rows(16384, 128256, 2) == 512  # 128 MiB holds 523 rows of 128256 bf16 logits: 8 tiles
    assert rows(16384, 4 << 20, 4) == 64  # one tile even where it is over 128 MiB
    used = []

    def loss_of_hidden(hidden, weight, labels, params, *, chunk_size, **kw):
        used.append(chunk_size)
        return torch.zeros(labels.shape), torch.zeros(labels.shape)

    monkeypatch.setattr(
        fused_linear, "loss_of_hidden", loss_of_hidden
    )  # where fused_loss looks it up
    s, b, h, v = 1040, 2, 4, 96
    layer = types.SimpleNamespace(
        weight=torch.zeros(v, h, dtype=torch.bfloat16),
        bias=None,
        tp_group=object(),
        sequence_parallel=False,
    )
    try:
        megatron_patch.apply_from_args(args)
        fused_linear.fused_loss(
            torch.zeros(s, b, h, dtype=torch.bfloat16),
            layer,
            None,
            torch.zeros(b, s, dtype=torch.long),
            types.SimpleNamespace(),
        )
    finally:
        megatron_patch.revert()
    assert used == [rows(s * b, v, 2)] == [192]  # 2080 tokens: 130, rounded up to 3 tiles


def test_flag_table_lists_the_parsers_flags():
    """docs/megatron.md's flag table has one row per flag add_arguments defines, no other."""
    import argparse
    import re

    from tests.support.checkout import ROOT

    parser = megatron_patch.add_arguments(argparse.ArgumentParser(add_help=False))
    flags = {a.option_strings[0] for a in parser._actions}
    doc = (ROOT / "docs" / "megatron.md").read_text()
    table = doc.split("## The flags", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (.*?) \|", table, re.M)[1:]  # each row's first cell, past the header
    assert {f for row in rows for f in re.findall(r"`(--[a-z-]+)", row)} == flags
    settings = {
        a.dest for a in parser._actions
    }  # --tofu-skip-masked and --no-tofu-skip-masked: one setting
    assert len(flags) == 8 and len(settings) == len(rows) == 7 and "adds seven flags" in table


def test_skip_masked_default_is_on_with_sft_only(monkeypatch):
    """--tofu-skip-masked: on with --sft, off otherwise, either way overridable; only with
    --tofu-fused-linear does it reach the fused step (docs/megatron.md)."""
    import argparse

    from megatron_patch.arguments import skip_masked

    parser = megatron_patch.add_arguments(argparse.ArgumentParser())
    parser.add_argument("--sft", action="store_true")  # Megatron's own flag
    cases = {
        (): False,
        ("--sft",): True,
        ("--sft", "--no-tofu-skip-masked"): False,
        ("--tofu-skip-masked",): True,
    }
    for argv, expect in cases.items():
        args = parser.parse_args(["--loss-type", "tofu", "--tofu-fused-linear", *argv])
        assert skip_masked(args) is expect, argv
        try:
            megatron_patch.apply_from_args(args)
            assert settings.current().skip_masked is expect, argv
        finally:
            megatron_patch.revert()
    with pytest.warns(
        UserWarning, match="--tofu-skip-masked has no effect without --tofu-fused-linear"
    ):
        megatron_patch.apply_from_args(
            parser.parse_args(["--loss-type", "tofu", "--tofu-skip-masked"])
        )
    megatron_patch.revert()


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--loss-type", "focal"], "invalid choice"),
        (["--tofu-gamma", "-1"], "must be a finite number >= 0"),
        (["--tofu-beta", "0"], "must be a finite number > 0"),
        (["--tofu-beta", "x"], "not a number"),
        (["--tofu-backend", "xla"], "invalid choice"),
    ],
)
def test_megatron_parser_rejects_bad_values(monkeypatch, capsys, hooked, argv, match):
    with pytest.raises(SystemExit):
        _parse(monkeypatch, *argv)
    assert match in capsys.readouterr().err


def test_extra_args_provider_and_hook_together(monkeypatch, hooked):
    """add_arguments as extra_args_provider next to the hook: no duplicate-flag error."""
    from megatron.training import arguments

    monkeypatch.setattr(sys, "argv", ["x", "--loss-type", "tofu"])
    args = arguments.parse_args(extra_args_provider=megatron_patch.add_arguments)
    assert args.loss_type == "tofu"


def test_hooks_are_reversible():
    from megatron.training import arguments

    before = (arguments.add_megatron_arguments, arguments.parse_args)
    megatron_patch.install_hooks()
    megatron_patch.install_hooks()  # twice: still one layer
    assert patching.original(arguments, "parse_args") is before[1]
    megatron_patch.remove_hooks()
    assert (arguments.add_megatron_arguments, arguments.parse_args) == before


# ------------------------------------------------------------ launcher

_SCRIPT = """
# stands in for an unmodified Megatron-LM script: parses with Megatron's real parser
from megatron.training import arguments
import megatron_patch
from megatron.core.models.common.language_module.language_module import LanguageModule
from tofu_kernels import patching
args = arguments.parse_args()
fn = LanguageModule.__dict__["compute_language_model_loss"]
print("RESULT", args.loss_type, args.tofu_gamma, args.tofu_beta, args.num_layers,
      megatron_patch.is_applied(), "compute_language_model_loss" in patching.replaced(LanguageModule),
      __name__)
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "flags,expect",
    [
        (
            ["--loss-type", "tofu", "--tofu-gamma", "2.0"],
            "RESULT tofu 2.0 0.8 3 True True __main__",
        ),
        ([], "RESULT cross_entropy 3.0 0.8 3 False False __main__"),
    ],
)
def test_launcher_runs_unmodified_script(tmp_path, flags, expect):
    import subprocess

    script = tmp_path / "pretrain_fake.py"
    script.write_text(_SCRIPT)
    out = subprocess.run(
        [sys.executable, "-m", "megatron_patch.launch", str(script), "--num-layers", "3", *flags],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert expect in out.stdout


def test_launcher_rejects_bad_flag_and_missing_script(tmp_path):
    import subprocess

    script = tmp_path / "pretrain_fake.py"
    script.write_text(_SCRIPT)
    out = subprocess.run(
        [sys.executable, "-m", "megatron_patch.launch", str(script), "--tofu-beta", "-2"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "must be a finite number > 0" in out.stderr
    out = subprocess.run(
        [sys.executable, "-m", "megatron_patch.launch", str(tmp_path / "nope.py")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2 and "no such training script" in out.stderr


def test_parse_and_validate_args_looks_up_the_hooked_parser(hooked):
    """Megatron 0.19's initialize path calls parse_args through its module globals."""
    from megatron.training import arguments

    assert arguments.parse_and_validate_args.__globals__["parse_args"] is arguments.parse_args
    assert "parse_args" in patching.replaced(arguments)


def test_old_names_still_work_with_a_deprecation_warning(monkeypatch):
    """Renamed for one word per concept: --tofu-fused-output -> --tofu-fused-linear,
    apply(fused_output=) -> apply(fused_linear=), config() -> tofu_params(). The old names
    keep working for one release and say what replaces them."""
    import argparse
    import warnings

    from megatron_patch import once

    parser = megatron_patch.add_arguments(argparse.ArgumentParser())
    monkeypatch.setattr(once, "_said", set())  # warned by an earlier test in this process
    with pytest.warns(
        UserWarning, match="--tofu-fused-output is deprecated, use --tofu-fused-linear"
    ):
        old = parser.parse_args(["--loss-type", "tofu", "--tofu-fused-output"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new name warns of nothing
        new = parser.parse_args(["--loss-type", "tofu", "--tofu-fused-linear"])
    assert old.tofu_fused_linear is new.tofu_fused_linear is True
    try:
        with pytest.warns(DeprecationWarning, match=r"fused_output=\.\.\.\) is deprecated"):
            megatron_patch.apply("tofu", 2.0, 0.5, fused_output=True)
        assert settings.current().fused_linear is True
        with pytest.warns(DeprecationWarning, match=r"use megatron_patch.tofu_params\(\)"):
            old_params = megatron_patch.config()
        assert old_params is megatron_patch.tofu_params() and old_params.gamma == 2.0
    finally:
        megatron_patch.revert()
