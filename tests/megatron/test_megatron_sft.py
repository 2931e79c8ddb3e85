"""Supervised fine-tuning with Megatron-LM's own scripts and data pipeline, --loss-type tofu.

The flags are docs/megatron.md's: its multi-node SFT command is read from that page, the flags
that only make sense on a GPU cluster (parallel sizes, Transformer Engine, bf16, the
distributed optimizer, checkpoints) are swapped for this machine's, and everything else
(the loss flags, --sft, the SFTTokenizer and its prompt format, the data flags) is run
as written. A drift between the page and what runs here fails these tests.

Data: a chat jsonl and a Hugging Face tokenizer written by the test (tests/support/sft_data.py),
read by Megatron's SFTTokenizer / SFTDataset through the training script's own dataset
provider and Megatron's data loader, fed through the script's forward_step / loss_func
inside Megatron's pipeline schedule (get_batch with its TP broadcast and packed-sequence
flattening included), TP = 2 on gloo, for pretrain_gpt.py (GPTModel) and
pretrain_hybrid.py (HybridModel). Megatron's local attention refuses packed sequences
(only Transformer Engine's takes them); here the packed micro-batch reaches the model as
a block-diagonal causal mask (sft_data.PackedAsMask), the attention TE computes; the
loss path is untouched.
"""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.support.megatron_utils import require_megatron_core

require_megatron_core()

import megatron_patch  # noqa: E402
import tofu_kernels as tk  # noqa: E402
from megatron_patch.reporting import CE_KEY, LOSS_KEY  # noqa: E402
from tests.support import readme  # noqa: E402
from tests.support.checkout import load_script  # noqa: E402
from tests.support.dist_utils import run_distributed  # noqa: E402
from tests.support.helpers import assert_grad_close, assert_loss_close  # noqa: E402
from tests.support.megatron_lm import (  # noqa: E402
    FIXTURE,
    HYBRID,
    SKIP_REASON,
    TINY_MODEL,
    cpu_harness,
    launch,
    reduce_like_megatron,
    setup,
)
from tests.support.megatron_utils import gather_vocab  # noqa: E402
from tests.support.sft_data import (  # noqa: E402
    CONVERSATIONS,
    PackedAsMask,
    assistant_text,
    megatron_iterators,
    write_chat_jsonl,
    write_tokenizer,
)

pytestmark = pytest.mark.skipif(FIXTURE is None, reason=SKIP_REASON)

# This machine's: the tiny model, TP = 2, sequences of 48 tokens, two micro-batches of two,
# and Megatron's data loader in the process (its workers would be spawned processes here).
CPU_FLAGS = [
    *TINY_MODEL,
    "--tensor-model-parallel-size",
    "2",
    "--seq-length",
    "48",
    "--max-position-embeddings",
    "48",
    "--num-workers",
    "0",
    "--split",
    "75,25,0",
    "--eval-iters",
    "1",
    "--eval-interval",
    "2",
]


def _value(flags: list[str], name: str) -> str:
    return flags[flags.index(name) + 1]


def _sft_files(tmp: str, rank: int) -> tuple[Path, Path]:
    tmp = Path(tmp)
    if rank == 0:
        write_tokenizer(tmp / "tokenizer")
        write_chat_jsonl(tmp / "chat.jsonl")
    dist.barrier()
    return tmp / "chat.jsonl", tmp / "tokenizer"


# ------------------------------------------------------------ docs/megatron.md's command


def test_readme_sft_command_uses_megatrons_sft_tokenizer():
    """Wherever the README or a docs page passes --sft it passes the tokenizer Megatron's SFT dataset needs."""
    sft = [(p, c) for p, b in readme.blocks("bash") for c in readme.commands(b) if "--sft" in c]
    assert any(p == readme.MEGATRON for p, _ in sft), "docs/megatron.md shows no --sft command"
    for _, argv in sft:
        assert _value(argv, "--tokenizer-type") == "SFTTokenizer", argv
        assert (
            "--sft-tokenizer-prompt-format" in argv
            and "--no-create-attention-mask-in-dataloader" in argv
        ), argv
        assert "--save" not in argv or "--save-interval" in argv, argv  # Megatron asserts otherwise


@pytest.mark.parametrize("script", ["pretrain_gpt.py", "pretrain_hybrid.py"])
def test_launcher_takes_the_readme_sft_command(tmp_path, script):
    """docs/megatron.md's flags, all of them (cluster sizes aside), through the launcher and
    Megatron's parser, up to Megatron's own CUDA stop on this machine."""
    data, tok = write_chat_jsonl(tmp_path / "chat.jsonl"), write_tokenizer(tmp_path / "tokenizer")
    args = readme.script_arguments(readme.sft_command(), "pretrain_gpt.py")
    subst = {
        "$DATA": str(data),
        "$TOKENIZER": str(tok),
        "$BASE": str(tmp_path / "base"),
        "$OUT": str(tmp_path / "out"),
    }
    args = [subst.get(a, a) for a in args]
    for name in (
        "--tensor-model-parallel-size",
        "--pipeline-model-parallel-size",
    ):  # one process here
        args[args.index(name) + 1] = "1"
    args.remove("--sequence-parallel")
    extra = HYBRID if script == "pretrain_hybrid.py" else []
    out = launch(*TINY_MODEL, *args, *extra, script=script)
    assert "Megatron requires CUDA" in out.stderr, out.stderr[-3000:]
    assert "megatron_patch: --loss-type tofu (gamma=3.0, beta=0.8, backend=auto)" in out.stdout
    dump = dict(re.findall(r"^  (\w+) \.+ (.*)$", out.stdout, re.M))
    assert (dump["sft"], dump["tokenizer_type"], dump["create_attention_mask_in_dataloader"]) == (
        "True",
        "SFTTokenizer",
        "False",
    )
    assert dump["sft_tokenizer_prompt_format"] == _value(args, "--sft-tokenizer-prompt-format")


def _readme_prompt_formats() -> dict[str, bool]:
    """docs/megatron.md's prompt-format table: format -> whether it masks the prompt."""
    text = readme.MEGATRON.read_text()
    rows = re.findall(r"^\| `([a-z0-9-]+)`[^|]*\| ([^|]+) \|", text, re.M)
    formats = {
        name: "not masked" not in what
        for name, what in rows
        if name.startswith(("nemotron", "default", "identity"))
    }
    assert set(formats) == {"nemotron-h-aligned", "nemotron-nano-v2", "default", "identity"}, (
        formats
    )
    return formats


def test_prompt_formats_train_what_the_readme_says(tmp_path):
    """Megatron's SFTTokenizer on a conversation, per prompt format: docs/megatron.md's table says
    which formats mask the system and user turns; with a tokenizer like Llama 3's (no
    Nemotron tokens, no pad token) the masking formats have no pad id and `default` pads
    with EOS."""
    from megatron.core.tokenizers.text.libraries.sft_tokenizer import IGNORE_INDEX, SFTTokenizer

    tok_dir, llama_like = (
        write_tokenizer(tmp_path / "tok"),
        write_tokenizer(tmp_path / "llama_like", nemotron=False),
    )
    conv = CONVERSATIONS[2]
    for fmt, masks in _readme_prompt_formats().items():
        tok = SFTTokenizer(str(tok_dir), fmt)
        tokens, target = tok.tokenize_conversation(
            conv, return_target=True, add_generation_prompt=False
        )
        kept = tok.ids_to_text([int(t) for t in target if t != IGNORE_INDEX])
        if masks:
            assert (target == IGNORE_INDEX).any() and "list two colours" not in kept, (fmt, kept)
            assert kept.replace("<SPECIAL_12>\n", "") == assistant_text(conv), (fmt, kept)
        else:
            assert (target == tokens).all() and "list two colours" in kept, (fmt, kept)
        other = SFTTokenizer(str(llama_like), fmt)
        if fmt.startswith("nemotron"):
            assert other.pad_id is None, fmt  # SFTDataset cannot pad: fails at the first batch
        elif fmt == "default":
            assert other.pad_id == other.eod  # EOS masked as padding


# ------------------------------------------------------------ SFT batches through Megatron's schedule


def _logits_recorder(net) -> list[dict]:
    """Record each output-layer call's logits (fp64 copy, before the loss's in-place
    backward overwrites them) and the gradient that reaches them."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear

    records = []
    layer = next(
        m
        for name, m in net.named_modules()
        if name.endswith("output_layer") and isinstance(m, ColumnParallelLinear)
    )

    from megatron_patch.fused_linear import DeferredLogits

    def hook(_module, _inputs, output):
        logits = output[0]
        if isinstance(logits, DeferredLogits):  # --tofu-fused-linear: no logits exist
            return
        rec = {"logits": logits.detach().double().clone(), "grad": None}
        if logits.requires_grad:
            logits.register_hook(lambda g: rec.__setitem__("grad", g.detach().double().clone()))
        records.append(rec)

    layer.register_forward_hook(hook)
    return records


def _step(script, net, data, forward_only=False):
    """One step of Megatron's schedule over two micro-batches from ``data`` (an iterable;
    only tensor-parallel rank 0 reads it)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    net.zero_grad(set_to_none=True)
    return get_forward_backward_func()(
        forward_step_func=script.forward_step,
        data_iterator=iter(data),
        model=[net],
        num_microbatches=2,
        seq_length=48,
        micro_batch_size=2,
        forward_only=forward_only,
    )


def _run(flags, model):
    """Build the model from ``flags``, wrap it, and run one step on Megatron's SFT batches."""
    args, net, script = setup(*flags, base=[], model=model)
    wrapped = PackedAsMask(net)
    records = _logits_recorder(net)
    train, _ = megatron_iterators(script)
    data = [next(train), next(train)] if train is not None else []
    reports = _step(script, wrapped, data)
    return args, wrapped, records, reports, data


def _check_step(args, wrapped, records, reports, gamma, beta):
    """Every micro-batch against fp64 on the gathered logits: the per-token loss, the two
    reported entries, and the logits gradient Megatron's schedule asks for."""
    from megatron.core import parallel_state as ps
    from megatron.training.global_vars import get_tokenizer

    group = ps.get_tensor_model_parallel_group()
    pad = get_tokenizer().pad
    total = sum(float(c["loss_mask"].sum()) for c in wrapped.calls)
    assert len(wrapped.calls) == len(records) == len(reports) == 2
    for call, rec, rep in zip(wrapped.calls, records, reports):
        assert call["packed"], "--sft hands the model packed sequences (cu_seqlens)"
        labels, mask = call["labels"], call["loss_mask"].double()
        assert labels.shape == (
            1,
            96,
        )  # two packed samples of 48, flattened by Megatron's get_batch
        # the loss mask is exactly the assistant tokens: not the masked prompt (-100), not padding
        assert torch.equal(mask.bool(), (labels != -100) & (labels != pad))
        assert 0 < mask.sum() < mask.numel()
        full = gather_vocab(rec["logits"], group).transpose(0, 1)  # [b, s, V], fp64
        leaf = full.clone().requires_grad_(True)
        tofu, ce = tk.tofu_loss_reference(leaf, labels, gamma=gamma, beta=beta)
        per_token = call["output"].detach()
        assert torch.equal(per_token[labels == -100], torch.zeros_like(per_token[labels == -100]))
        assert_loss_close(per_token.double(), tofu.detach())
        n = mask.sum()
        assert rep[LOSS_KEY][1] == rep[CE_KEY][1] == n  # the assistant tokens, counted once
        torch.testing.assert_close(
            rep[LOSS_KEY][0].double(), (tofu * mask).sum().detach(), rtol=1e-5, atol=1e-6
        )
        torch.testing.assert_close(rep[CE_KEY][0].double(), (ce * mask).sum(), rtol=1e-5, atol=1e-6)
        # Megatron's schedule: loss_func's masked sum, divided by its tokens and the number
        # of micro-batches, unless --calculate-per-token-loss (then the sum itself).
        scale = 1.0 if args.calculate_per_token_loss else 1.0 / (float(n) * 2)
        ((tofu * mask).sum() * scale).backward()
        grad = gather_vocab(rec["grad"], group).transpose(0, 1)
        assert torch.equal(
            grad[mask == 0], torch.zeros_like(grad[mask == 0])
        )  # prompt and padding: exactly 0
        assert_grad_close(grad.float(), leaf.grad, torch.float32)
    return total


def sft_step_cases(rank: int, world: int, tmp: str, model: str) -> None:
    """TP = 2: a Megatron cross-entropy step, a TOFU step (docs/megatron.md's flags) and a TOFU step
    with --calculate-per-token-loss, on the same weights and Megatron-built SFT batches."""
    cpu_harness()
    data, tok = _sft_files(tmp, rank)
    flags = [*readme.sft_flags(data, tok), *CPU_FLAGS, *(HYBRID if model == "hybrid" else [])]
    gamma, beta = float(_value(flags, "--tofu-gamma")), float(_value(flags, "--tofu-beta"))

    args, wrapped, _, reports, batches = _run([*flags, "--loss-type", "cross_entropy"], model)
    assert all(set(r) == {LOSS_KEY} for r in reports)  # Megatron untouched
    megatron_ce = reduce_like_megatron(reports)[LOSS_KEY]
    if rank == 0:  # what the prompt format trains on: the assistant turns of the first two lines
        from megatron.training.global_vars import get_tokenizer

        first = batches[0]  # get_batch flattened it in place: [1, 2 x 48]
        kept = first["labels"][first["loss_mask"].bool()].tolist()
        assert get_tokenizer().detokenize(kept) == assistant_text(
            CONVERSATIONS[0]
        ) + assistant_text(CONVERSATIONS[1])

    results = {}
    for extra in ([], ["--calculate-per-token-loss"]):
        args, wrapped, records, reports, _ = _run([*flags, *extra], model)
        assert args.loss_type == "tofu" and args.calculate_per_token_loss == bool(extra)
        _check_step(args, wrapped, records, reports, gamma, beta)
        results[bool(extra)] = reduce_like_megatron(reports)
        # 'lm cross entropy' of the TOFU run is Megatron's own 'lm loss' of the CE run
        torch.testing.assert_close(results[bool(extra)][CE_KEY], megatron_ce, rtol=2e-5, atol=1e-6)
    # the report is normalised over the assistant tokens of the whole batch either way
    torch.testing.assert_close(results[True][LOSS_KEY], results[False][LOSS_KEY])
    # the output layer and the loss as one step (--tofu-fused-linear): the same reports
    args, wrapped, records, reports, _ = _run(
        [*flags, "--tofu-fused-linear", "--tofu-chunk-size", "16"], model
    )
    assert records == []  # the output layer never made logits
    fused = reduce_like_megatron(reports)
    torch.testing.assert_close(fused[LOSS_KEY], results[False][LOSS_KEY], rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(fused[CE_KEY], megatron_ce, rtol=2e-5, atol=1e-6)
    megatron_patch.revert()
    megatron_patch.remove_hooks()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt", "hybrid"])
def test_sft_batches_through_megatrons_schedule(tmp_path, model):
    run_distributed(2, sft_step_cases, tmp=str(tmp_path), model=model)


# ------------------------------------------------------------ a few SFT steps learn

STEPS = 20


def sft_learning_cases(rank: int, world: int, tmp: str, model: str) -> None:
    """STEPS steps of TOFU SFT (docs/megatron.md's flags, Megatron's data loader and schedule, Adam)
    lower the cross entropy of the assistant tokens; Megatron's validation report then
    carries 'lm cross entropy' and its perplexity beside 'lm loss'."""
    cpu_harness()
    from megatron.core.utils import get_model_config
    from megatron.training.training import evaluate_and_print_results

    data, tok = _sft_files(tmp, rank)
    flags = [
        *readme.sft_flags(data, tok),
        *CPU_FLAGS,
        "--train-iters",
        str(STEPS),
        "--eval-interval",
        str(STEPS),
        *(HYBRID if model == "hybrid" else []),
    ]
    args, net, script = setup(*flags, base=[], model=model)
    wrapped = PackedAsMask(net)
    train, valid = megatron_iterators(script)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    ce = []
    for _ in range(STEPS):
        reduced = reduce_like_megatron(_step(script, wrapped, train if train is not None else []))
        opt.step()
        ce.append(float(reduced[CE_KEY]))
    first, last = sum(ce[:5]) / 5, sum(ce[-5:]) / 5
    assert last < 0.6 * first, f"lm cross entropy of the assistant tokens did not fall: {ce}"

    out = io.StringIO()
    with redirect_stdout(out):
        evaluate_and_print_results(
            f"iteration {STEPS}",
            script.forward_step,
            valid,
            [wrapped],
            STEPS,
            None,
            get_model_config(net),
            verbose=False,
            write_to_tensorboard=False,
        )
    if rank == world - 1:  # Megatron prints the report on the last rank
        report = out.getvalue()
        values = dict(re.findall(r"(lm [a-z ]+?) (?:value|PPL): ([-+0-9.eE]+)", report))
        ce_value = float(re.search(r"lm cross entropy value: ([-+0-9.eE]+)", report).group(1))
        ppl = float(re.search(r"lm cross entropy PPL: ([-+0-9.eE]+)", report).group(1))
        assert "lm loss value" in report and values, report
        assert abs(ppl - torch.tensor(ce_value).exp().item()) <= 1e-3 * ppl, report
        assert ce_value < first, report  # the validation split learned too
    megatron_patch.revert()
    megatron_patch.remove_hooks()


@pytest.mark.slow
@pytest.mark.parametrize("model", ["gpt", "hybrid"])
def test_sft_steps_lower_the_cross_entropy(tmp_path, model):
    run_distributed(2, sft_learning_cases, tmp=str(tmp_path), model=model)


# ------------------------------------------------------------ a model built outside Megatron-LM


def _masked_token_loss(loss_mask, output_tensor, check_for_nan_in_loss=True):
    """A loss_func of the shape Megatron-Bridge's SFT step binds (``partial(loss, loss_mask,
    check_for_nan_in_loss=...)``): masked sum, token count, {'lm loss': [sum, count]}."""
    losses, mask = output_tensor.view(-1).float(), loss_mask.view(-1).float()
    loss = (losses * mask).sum()
    if check_for_nan_in_loss:
        assert torch.isfinite(loss)
    n = mask.sum().to(torch.int)
    return loss, n, {LOSS_KEY: torch.cat([loss.detach().view(1), n.view(1)])}


def provider_built_cases(rank: int, world: int) -> None:
    """Megatron-Bridge and NeMo build the GPTModel themselves from a TransformerConfig (no
    Megatron-LM arguments) and train it through megatron.core's schedule with their own
    forward step: apply() before the model is built is all it takes; the loss is TOFU, the
    report gains 'lm cross entropy', and training lowers it."""
    from functools import partial

    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from tests.support.megatron_lm import BATCH, SEQ, batches
    from tests.support.megatron_utils import init_megatron_cpu, tiny_gpt

    cpu_harness()  # the schedule's cuda counters on the CPU
    init_megatron_cpu(world)
    megatron_patch.apply("tofu", gamma=3.0, beta=0.8, backend="torch")
    model = tiny_gpt(world)
    data = batches(2, seed=5)

    def forward_step(data_iterator, net):
        b = next(data_iterator)
        out = net(b["tokens"], b["position_ids"], b["attention_mask"], labels=b["labels"])
        return out, partial(_masked_token_loss, b["loss_mask"], check_for_nan_in_loss=True)

    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ce = []
    for step in range(20):
        model.zero_grad(set_to_none=True)
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iter(data),
            model=[model],
            num_microbatches=2,
            seq_length=SEQ,
            micro_batch_size=BATCH,
        )
        assert all(set(r) == {LOSS_KEY, CE_KEY} for r in reports)
        if step == 0:  # TOFU of the gathered logits, fp64, over the masked tokens
            with torch.no_grad():
                for rep, d in zip(reports, data):
                    shard = model(d["tokens"], d["position_ids"], d["attention_mask"])
                    full = gather_vocab(shard, ps.get_tensor_model_parallel_group()).double()
                    tofu, _ = tk.tofu_loss_reference(full, d["labels"], gamma=3.0, beta=0.8)
                    torch.testing.assert_close(
                        rep[LOSS_KEY][0].double(),
                        (tofu * d["loss_mask"]).sum(),
                        rtol=1e-5,
                        atol=1e-6,
                    )
        opt.step()
        ce.append(float(reduce_like_megatron(reports)[CE_KEY]))
    assert sum(ce[-3:]) < 0.8 * sum(ce[:3]), ce
    megatron_patch.revert()


@pytest.mark.slow
def test_a_provider_built_model_trains_tofu():
    run_distributed(2, provider_built_cases)


# ------------------------------------------------------------ the GPU check's SFT step


def _gpu_check():
    return load_script("tools/gpu/megatron_lm_check.py")


def test_gpu_check_sft_runs_the_readme_flags_or_says_why_not(tmp_path):
    """tools/gpu/megatron_lm_check.py's SFT step: docs/megatron.md's flags with Transformer Engine
    on one GPU (parsed here by the launcher up to Megatron's CUDA stop); without Transformer
    Engine it reports 'not run' with the reason, and that is no failure."""
    import importlib.util
    from argparse import Namespace

    check = _gpu_check()
    data, tok = (
        write_chat_jsonl(tmp_path / "chat.jsonl", per_line=8),
        write_tokenizer(tmp_path / "tokenizer"),
    )
    flags = check.sft_flags("tofu", data, tok, iters=3)
    assert flags[: len(readme.sft_flags(data, tok))] == readme.sft_flags(data, tok)
    assert _value(flags, "--transformer-impl") == "transformer_engine" and "--sft" in flags
    out = launch(*flags)
    assert "Megatron requires CUDA" in out.stderr, out.stderr[-3000:]
    dump = dict(re.findall(r"^  (\w+) \.+ (.*)$", out.stdout, re.M))
    assert (dump["sft"], dump["loss_type"], dump["transformer_impl"]) == (
        "True",
        "tofu",
        "transformer_engine",
    )
    if importlib.util.find_spec("transformer_engine") is None:
        md, ok = check.sft(
            FIXTURE, Namespace(smoke=False, out=tmp_path, iters=3, warmup=1, timeout=30), []
        )
        assert ok and "not run: needs Transformer Engine" in md
