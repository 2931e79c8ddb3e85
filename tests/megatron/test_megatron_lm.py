"""Megatron-LM's own pretrain_gpt.py (core_v0.19.0, unmodified) with --loss-type tofu.

Two ways, both as a user runs it:
- the launcher on the real script, in a subprocess, up to Megatron's own "requires CUDA"
  stop on this CPU machine: flags through Megatron's parser and argument dump, the patch
  live before the model is built, usage errors, the cross-entropy-fusion warning;
- the script's own forward_step / loss_func inside Megatron's real pipeline schedules on
  CPU (gloo), on the model its own builder makes: the reports carry the TOFU loss as
  'lm loss' and the plain cross entropy beside it, checked against an independent
  computation on the gathered logits, with TP, DP, sequence parallelism,
  --calculate-per-token-loss, MTP heads and pipeline parallelism.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tests.support.megatron_utils import require_megatron_core

require_megatron_core()

import megatron_patch  # noqa: E402
import tofu_kernels as tk  # noqa: E402
from megatron_patch.reporting import CE_KEY, LOSS_KEY  # noqa: E402
from tests.support.dist_utils import run_distributed  # noqa: E402
from tests.support.megatron_lm import (  # noqa: E402
    FIXTURE,
    HYBRID,
    SKIP_REASON,
    batches,
    cpu_harness,
    launch,
    reduce_like_megatron,
    setup,
    train_reports,
)
from tests.support.megatron_utils import gather_vocab  # noqa: E402

pytestmark = pytest.mark.skipif(FIXTURE is None, reason=SKIP_REASON)

TOFU = [
    "--loss-type",
    "tofu",
    "--tofu-gamma",
    "2.0",
    "--tofu-beta",
    "0.7",
    "--tofu-backend",
    "torch",
]
CE_MODE = [
    "--loss-type",
    "tofu",
    "--tofu-gamma",
    "0",
    "--tofu-beta",
    "1",
    "--tofu-backend",
    "torch",
]
MEGATRON_CE = ["--loss-type", "cross_entropy"]

# ------------------------------------------------------------ the real script, launched


def _dump(stdout: str) -> dict[str, str]:
    """Megatron's argument dump ('  name ........ value') as a dict."""
    return dict(re.findall(r"^  (\w+) \.+ (.*)$", stdout, re.M))


@pytest.mark.parametrize("sft", [False, True], ids=["pretrain", "sft"])
def test_launcher_runs_the_real_script_with_tofu(sft):
    from tests.support.megatron_lm import TINY

    out = launch(
        "--loss-type",
        "tofu",
        "--tofu-gamma",
        "2.5",
        "--tofu-beta",
        "0.7",
        *TINY,
        *(["--sft"] if sft else []),
    )
    # on a CPU machine the run ends at Megatron's own CUDA assertion, after parsing and our patch
    assert "Megatron requires CUDA" in out.stderr, out.stderr[-3000:]
    line = (
        "megatron_patch: --loss-type tofu (gamma=2.5, beta=0.7, backend=auto): "
        "LanguageModule.compute_language_model_loss is TOFU; 'lm cross entropy' is reported beside 'lm loss'"
    )
    assert (
        out.stdout.count("megatron_patch: --loss-type") == 1
    )  # once, however often Megatron parses
    assert line in out.stdout
    dump = _dump(out.stdout)
    assert (dump["loss_type"], dump["tofu_gamma"], dump["tofu_beta"], dump["tofu_backend"]) == (
        "tofu",
        "2.5",
        "0.7",
        "auto",
    )
    assert dump["sft"] == str(sft)
    # applied while parsing, i.e. before Megatron's argument dump and long before pretrain()
    assert out.stdout.index(line) < out.stdout.index("------------------------ arguments")


def test_launcher_cross_entropy_leaves_megatron_untouched():
    from tests.support.megatron_lm import TINY

    out = launch("--loss-type", "cross_entropy", *TINY)
    assert "Megatron requires CUDA" in out.stderr, out.stderr[-3000:]
    assert "megatron_patch: --loss-type cross_entropy: Megatron's loss is untouched" in out.stdout
    assert _dump(out.stdout)["loss_type"] == "cross_entropy"
    assert "given without --loss-type tofu" not in out.stderr


def test_launcher_warns_once_about_tofu_flags_without_tofu():
    from tests.support.megatron_lm import TINY

    out = launch(*TINY, "--tofu-gamma", "2.0", "--tofu-backend", "torch")
    assert "Megatron requires CUDA" in out.stderr, out.stderr[-3000:]
    warning = (
        "megatron_patch: --tofu-gamma --tofu-backend given without --loss-type tofu: no effect, "
        "Megatron's cross entropy is used"
    )
    assert out.stderr.count(warning) == 1, out.stderr[-3000:]
    assert _dump(out.stdout)["loss_type"] == "cross_entropy"


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--tofu-beta", "0"], "argument --tofu-beta: beta must be a finite number > 0, got 0"),
        (
            ["--tofu-gamma", "nan"],
            "argument --tofu-gamma: gamma must be a finite number >= 0, got nan",
        ),
        (
            ["--loss-type", "focal"],
            "argument --loss-type: invalid choice: 'focal' (choose from cross_entropy, tofu)",
        ),
    ],
)
def test_launcher_bad_values_end_with_one_line(flags, message):
    """Exit status 2 and one line naming the flag, as the last line, without Megatron's usage
    text (hundreds of lines) above it."""
    from tests.support.megatron_lm import TINY

    out = launch(*TINY, "--loss-type", "tofu", *flags)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == f"pretrain_gpt.py: error: {message}", out.stderr[
        -3000:
    ]
    assert "usage:" not in out.stderr


@pytest.mark.parametrize("impl", ["native", "te"])
def test_launcher_warns_that_tofu_replaces_cross_entropy_fusion(impl):
    from tests.support.megatron_lm import TINY

    out = launch(
        "--loss-type",
        "tofu",
        *TINY,
        "--cross-entropy-loss-fusion",
        "--cross-entropy-fusion-impl",
        impl,
    )
    warning = (
        "--loss-type tofu replaces Megatron's cross entropy, so --cross-entropy-loss-fusion "
        f"(--cross-entropy-fusion-impl {impl}) has no effect"
    )
    assert out.stderr.count(warning) == 1, out.stderr[-3000:]
    if impl == "native":
        assert "Megatron requires CUDA" in out.stderr
    else:  # megatron-core 0.19 itself refuses the TE fusion, with or without TOFU
        assert "Transformer Engine cross entropy loss fusion is disabled" in out.stderr


def test_launcher_cross_entropy_fusion_impl_alone_selects_nothing():
    """README: `--cross-entropy-fusion-impl te` without `--cross-entropy-loss-fusion`: no
    warning, no refusal; the run goes on to Megatron's CUDA check like any other."""
    from tests.support.megatron_lm import TINY

    out = launch("--loss-type", "tofu", *TINY, "--cross-entropy-fusion-impl", "te")
    assert "Megatron requires CUDA" in out.stderr, out.stderr[-3000:]
    assert "has no effect" not in out.stderr and "loss fusion is disabled" not in out.stderr
    assert _dump(out.stdout)["cross_entropy_fusion_impl"] == "te"


# ------------------------------------------------------------ the script's loss_func in Megatron's schedules


def _independent(model, data, gamma, beta):
    """Per micro-batch masked sums (TOFU, CE, tokens) from the gathered logits, float64."""
    from megatron.core import parallel_state as ps

    out = []
    with torch.no_grad():
        for d in data:
            shard = model(
                d["tokens"], d["position_ids"], d["attention_mask"]
            )  # labels=None: [b, s, V/tp]
            full = gather_vocab(shard, ps.get_tensor_model_parallel_group()).double()
            ce = F.cross_entropy(full.transpose(1, 2), d["labels"], reduction="none")
            tofu, _ = tk.tofu_loss_reference(full, d["labels"], gamma=gamma, beta=beta)
            m = d["loss_mask"].double()
            out.append(((tofu * m).sum(), (ce * m).sum(), m.sum()))
    return out


def _check_reports(reports, independent):
    assert len(reports) == len(independent)
    for rep, (tofu, ce, n) in zip(reports, independent):
        assert set(rep) == {LOSS_KEY, CE_KEY}
        assert rep[LOSS_KEY].shape == rep[CE_KEY].shape == (2,)
        assert rep[CE_KEY][1] == rep[LOSS_KEY][1] == n  # the same tokens, the same count
        torch.testing.assert_close(rep[LOSS_KEY][0].double(), tofu, rtol=2e-5, atol=1e-5)
        torch.testing.assert_close(rep[CE_KEY][0].double(), ce, rtol=2e-5, atol=1e-5)


def _model_flags(model: str, mtp: bool = False) -> list[str]:
    """pretrain_gpt.py's GPTModel needs nothing more; pretrain_hybrid.py's HybridModel its
    spec and pattern (with an MTP depth after the pattern's '/')."""
    if model == "gpt":
        return ["--mtp-num-layers", "1", "--position-embedding-type", "rope"] if mtp else []
    return HYBRID[:-1] + (["*-*-/*-", "--position-embedding-type", "rope"] if mtp else [HYBRID[-1]])


def tp_report_cases(rank: int, world: int, model: str = "gpt") -> None:
    """TP = 2: plain, --calculate-per-token-loss, --sequence-parallel; and Megatron's own CE."""
    cpu_harness()
    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.pipeline_parallel import schedules

    original_loss = LanguageModule.__dict__["compute_language_model_loss"]
    original_calc = schedules.forward_step_calc_loss
    data = batches(3, seed=11)
    kind, flags = model, _model_flags(model)
    args, model, pg = setup(*MEGATRON_CE, "--tensor-model-parallel-size", "2", *flags, model=kind)
    assert LanguageModule.__dict__["compute_language_model_loss"] is original_loss
    assert schedules.forward_step_calc_loss is original_calc
    megatron_reports = train_reports(model, pg, data)
    assert all(set(r) == {LOSS_KEY} for r in megatron_reports)  # untouched: no extra entry
    megatron_ce = reduce_like_megatron(megatron_reports)[LOSS_KEY]
    for extra in ([], ["--calculate-per-token-loss"], ["--sequence-parallel"]):
        args, model, pg = setup(
            *TOFU, "--tensor-model-parallel-size", "2", *flags, *extra, model=kind
        )
        assert args.calculate_per_token_loss == ("--calculate-per-token-loss" in extra)
        reports = train_reports(model, pg, data)
        _check_reports(reports, _independent(model, data, 2.0, 0.7))
        reduced = reduce_like_megatron(reports)
        # the reported cross entropy of a TOFU run is Megatron's own 'lm loss' of a CE run
        torch.testing.assert_close(reduced[CE_KEY], megatron_ce, rtol=2e-5, atol=1e-6)
        assert not torch.allclose(reduced[LOSS_KEY], reduced[CE_KEY])
        # evaluation (forward only) reports both as well
        assert all(
            set(r) == {LOSS_KEY, CE_KEY} for r in train_reports(model, pg, data, forward_only=True)
        )
    megatron_patch.revert()
    assert schedules.forward_step_calc_loss is original_calc
    megatron_patch.remove_hooks()


def dp_report_cases(rank: int, world: int) -> None:
    """DP = 2, different data per rank: both entries reduced over data-parallel ranks alike."""
    cpu_harness()
    data = batches(2, seed=20 + rank)
    args, model, pg = setup(*TOFU)
    assert args.data_parallel_size == 2
    reduced = reduce_like_megatron(train_reports(model, pg, data))
    local = torch.stack([torch.stack(x) for x in _independent(model, data, 2.0, 0.7)]).sum(0)
    dist.all_reduce(local)
    torch.testing.assert_close(
        reduced[LOSS_KEY].double(), local[0] / local[2], rtol=2e-5, atol=1e-6
    )
    torch.testing.assert_close(reduced[CE_KEY].double(), local[1] / local[2], rtol=2e-5, atol=1e-6)
    megatron_patch.revert()
    megatron_patch.remove_hooks()


def mtp_cases(rank: int, world: int, model: str = "gpt") -> None:
    """An MTP head: its loss goes through TOFU too; in CE mode its tracked value is Megatron's."""
    cpu_harness()
    from megatron.core.transformer.multi_token_prediction import MTPLossLoggingHelper

    data = batches(2, seed=31)
    tracked, calls = {}, []
    real = megatron_patch.patch.loss_of_logits  # where the patch looks up tofu_kernels' loss

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(megatron_patch.patch, "loss_of_logits", spy)
        for name, flags in (("megatron", MEGATRON_CE), ("ce_mode", CE_MODE), ("tofu", TOFU)):
            MTPLossLoggingHelper.clean_metrics_in_tracker()
            calls.clear()
            args, net, pg = setup(
                *flags,
                "--tensor-model-parallel-size",
                "2",
                *_model_flags(model, mtp=True),
                model=model,
            )
            assert args.mtp_num_layers == 1
            reports = train_reports(net, pg, data)
            tracked[name] = (
                MTPLossLoggingHelper.tracker["loss_values"].clone(),
                reduce_like_megatron(reports),
            )
            assert len(calls) == (
                0 if name == "megatron" else 2 * len(data)
            )  # main head + MTP head
            if name == "tofu":
                _check_reports(reports, _independent(net, data, 2.0, 0.7))
    mtp_megatron, rep_megatron = tracked["megatron"]
    mtp_ce, rep_ce = tracked["ce_mode"]
    mtp_tofu, rep_tofu = tracked["tofu"]
    torch.testing.assert_close(mtp_ce, mtp_megatron, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(rep_ce[LOSS_KEY], rep_megatron[LOSS_KEY], rtol=2e-5, atol=1e-6)
    assert torch.isfinite(mtp_tofu).all() and not torch.allclose(mtp_tofu, mtp_megatron)
    torch.testing.assert_close(rep_tofu[CE_KEY], rep_megatron[LOSS_KEY], rtol=2e-5, atol=1e-6)
    megatron_patch.revert()
    megatron_patch.remove_hooks()


def pp_cases(rank: int, world: int) -> None:
    """PP = 2: the loss runs on the last stage only; its reports equal Megatron's in CE mode."""
    cpu_harness()
    from megatron.core import parallel_state as ps

    data = batches(3, seed=41)
    calls = []
    real = megatron_patch.patch.loss_of_logits  # where the patch looks up tofu_kernels' loss
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(
            megatron_patch.patch, "loss_of_logits", lambda *a, **k: calls.append(1) or real(*a, **k)
        )
        results = {}
        for name, flags in (("megatron", MEGATRON_CE), ("ce_mode", CE_MODE), ("tofu", TOFU)):
            calls.clear()
            args, model, pg = setup(*flags, "--pipeline-model-parallel-size", "2")
            reports = train_reports(model, pg, data)
            last = ps.is_pipeline_last_stage()
            assert last == (rank == 1)
            if not last:
                assert reports == [] and calls == []  # no loss on the first stage
                continue
            assert len(calls) == (0 if name == "megatron" else len(data))
            assert all(
                set(r) == ({LOSS_KEY} if name == "megatron" else {LOSS_KEY, CE_KEY})
                for r in reports
            )
            results[name] = reduce_like_megatron(reports)
    if rank == 1:
        megatron = results["megatron"][LOSS_KEY]
        torch.testing.assert_close(results["ce_mode"][LOSS_KEY], megatron, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(results["ce_mode"][CE_KEY], megatron, rtol=2e-5, atol=1e-6)
        torch.testing.assert_close(results["tofu"][CE_KEY], megatron, rtol=2e-5, atol=1e-6)
    megatron_patch.revert()
    megatron_patch.remove_hooks()


@pytest.mark.slow
@pytest.mark.parametrize(
    "cases",
    [tp_report_cases, dp_report_cases, mtp_cases, pp_cases],
    ids=["tp2", "dp2", "mtp", "pp2"],
)
def test_fixture_reports_cross_entropy_beside_tofu(cases):
    run_distributed(2, cases)


@pytest.mark.slow
@pytest.mark.parametrize("cases", [tp_report_cases, mtp_cases], ids=["tp2", "mtp"])
def test_hybrid_fixture_reports_cross_entropy_beside_tofu(cases):
    """The same through pretrain_hybrid.py's HybridModel (Megatron's recommended model):
    pattern *-*- (attention, MLP: GPT blocks of local layers), MTP as the pattern's /*- part."""
    run_distributed(2, cases, model="hybrid")


class _NoStreamEvent:
    """A CUDA event's interface where there is no GPU: nothing to wait for or record."""

    def wait(self, stream=None):
        pass

    def record(self, stream=None):
        pass


def moe_overlap_cases(rank: int, world: int) -> None:
    """With --overlap-moe-expert-parallel-comm Megatron's combined 1F1B schedule passes the
    model's output through a ScheduleNode (make_viewless) and hands forward_step_calc_loss a
    ScheduleNode wrapping the script's loss_func (combined_1f1b.py): the report still gains
    'lm cross entropy', equal to the plain path's. Megatron's own pieces, emulating only the
    CUDA streams; a real MoE run with expert parallelism needs GPUs."""
    cpu_harness()
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.pipeline_parallel.utils import ScheduleNode, make_viewless
    from megatron.core.utils import get_model_config

    data = batches(1, seed=3)
    args, model, pg = setup(*TOFU, "--tensor-model-parallel-size", "2")
    plain = train_reports(model, pg, data, forward_only=True)[0]
    output_tensor, loss_func = pg.forward_step(iter(data), model)
    node = ScheduleNode(loss_func, lambda: None, _NoStreamEvent(), name="loss_func")
    store = []
    schedules.forward_step_calc_loss(
        model,
        make_viewless(output_tensor),
        node.forward,
        get_model_config(model),
        None,
        False,
        1,
        store,
        cp_group_size=1,
        is_last_stage=True,
    )
    assert set(store[0]) == {LOSS_KEY, CE_KEY}, store
    torch.testing.assert_close(store[0][CE_KEY], plain[CE_KEY])
    torch.testing.assert_close(store[0][LOSS_KEY], plain[LOSS_KEY])
    megatron_patch.revert()
    megatron_patch.remove_hooks()


@pytest.mark.slow
def test_moe_overlap_schedule_keeps_the_cross_entropy_report():
    run_distributed(2, moe_overlap_cases)
