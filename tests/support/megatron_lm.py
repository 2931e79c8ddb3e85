"""Megatron-LM's own training script (the fixture) on CPU: where it is, and a harness.

The fixture (`pretrain_gpt.py`, `gpt_builders.py`, `model_provider.py` of Megatron-LM
core_v0.19.0, unmodified) is read from a `shared/fixtures/` folder, never copied here.
`TOFU_MEGATRON_LM_DIR` names it explicitly; otherwise it is looked for beside this
checkout, or beside the repository this checkout was cloned from
(`tools/gpu/megatron_lm_check.find_fixture`).

The harness runs the fixture's `forward_step` / `loss_func` inside Megatron's real
pipeline schedules on CPU (gloo). Megatron hard-codes CUDA in a few places that have
nothing to do with the loss; the harness stands in for exactly those, in the test
process only: `torch.cuda.current_device`, `Tensor.cuda`, `torch.cuda.synchronize`, the
GPU-architecture probe of argument validation, and the `device="cuda"` counters of the
schedules and of the evaluation loop.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from .checkout import ROOT, load_script

FIXTURE_NAME = "megatron-lm-core_v0.19.0"
FILES = ("pretrain_gpt.py", "gpt_builders.py", "model_provider.py")


def find_fixture() -> Path | None:
    return load_script(
        "tools/gpu/megatron_lm_check.py"
    ).find_fixture()  # the one locator, shared with the GPU check


FIXTURE = find_fixture()
SKIP_REASON = (
    f"Megatron-LM fixture {FIXTURE_NAME} not found (set TOFU_MEGATRON_LM_DIR to the folder "
    f"holding {', '.join(FILES)})"
)

# A tiny GPT, as a user would ask for one on the command line (no TE, no fused CUDA ops),
# and the mock data of the pretraining tests (the SFT tests bring their own data flags).
TINY_MODEL = [
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
    "4",
    "--train-iters",
    "2",
    "--lr",
    "1e-4",
    "--transformer-impl",
    "local",
    "--use-cpu-initialization",
    "--hidden-dropout",
    "0",
    "--attention-dropout",
    "0",
    "--no-gradient-accumulation-fusion",
    "--no-persist-layer-norm",
    "--no-masked-softmax-fusion",
    "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion",
    "--no-rope-fusion",
]
MOCK_DATA = ["--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "96"]
TINY = TINY_MODEL + MOCK_DATA
VOCAB, BATCH, SEQ = 96, 2, 8


def launch(
    *argv: str, script: str = "pretrain_gpt.py", timeout: int = 300
) -> subprocess.CompletedProcess:
    """`python -m megatron_patch.launch <fixture>/<script> argv...`, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default"}
    return subprocess.run(
        [sys.executable, "-m", "megatron_patch.launch", str(FIXTURE / script), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


class _TorchWithCudaTensorsOnCPU:
    """`torch` as Megatron's schedules and its evaluation loop see it: the small counters
    they create with `device="cuda"` are made on the CPU."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device="cpu" if device == "cuda" else device, **kwargs)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        return torch.tensor(*args, device="cpu" if device == "cuda" else device, **kwargs)


def cpu_harness() -> None:
    """Call once in a gloo worker, before Megatron parses arguments."""
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import schedules
    from megatron.training import arguments, training

    from .megatron_utils import allow_torch_norm_with_sequence_parallel

    # what torchrun would export; Megatron's parser reads them
    os.environ.update(
        WORLD_SIZE=str(dist.get_world_size()),
        RANK=str(dist.get_rank()),
        LOCAL_RANK=str(dist.get_rank()),
    )
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")  # Megatron asserts it for TP > 1
    torch.cuda.current_device = lambda: "cpu"
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.cuda.synchronize = lambda *a, **k: None
    arguments.get_device_arch_version = lambda: 9  # Hopper, as on an H100 or H200
    schedules.torch = training.torch = _TorchWithCudaTensorsOnCPU()
    allow_torch_norm_with_sequence_parallel()
    # HybridStack builds its final norm with TENorm whatever the spec; without Transformer
    # Engine that is Megatron's torch norm (the spec's layers are local already).
    from megatron.core.models.hybrid import hybrid_block
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    hybrid_block.TENorm = WrappedTorchNorm
    sys.path.insert(0, str(FIXTURE))


# The two entry points of Megatron-LM: the script, its builder module and function.
SCRIPTS = {
    "gpt": ("pretrain_gpt.py", "gpt_builders", "gpt_builder"),
    "hybrid": ("pretrain_hybrid.py", "hybrid_builders", "hybrid_builder"),
}
# HybridModel with the local-layer stack spec of tests/support/hybrid_local_spec.py.
HYBRID = [
    "--spec",
    "tests.support.hybrid_local_spec",
    "hybrid_stack_spec",
    "--hybrid-layer-pattern",
    "*-*-",
]


def setup(*argv: str, base: list[str] = TINY, model: str = "gpt"):
    """Parse `argv` with Megatron's own parser (through the launcher's hooks), set up the
    parallel state and build the model with the fixture's own builder (`model`: "gpt" for
    pretrain_gpt.py's GPTModel, "hybrid" for pretrain_hybrid.py's HybridModel; pass
    `HYBRID` or your own `--spec`/`--hybrid-layer-pattern` for the latter). Returns
    (args, model, the training script's module)."""
    import importlib

    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.training.arguments import parse_and_validate_args
    from megatron.training.global_vars import unset_global_variables

    import megatron_patch

    script, builders, builder = SCRIPTS[model]
    unset_global_variables()
    ps.destroy_model_parallel()
    megatron_patch.install_hooks()
    sys.argv = [script, *base, *argv]
    args = parse_and_validate_args(args_defaults={"tokenizer_type": "GPT2BPETokenizer"})
    ps.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
    )
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    module = importlib.import_module(script[:-3])
    # pretrain_hybrid.py's forward_step reads a module global `args` on the packed-sequence
    # (--sft) path without get_args(); run as a script it finds the one its __main__ block
    # assigns, imported here it would not: give it the same object.
    module.args = args
    build = getattr(importlib.import_module(builders), builder)
    from model_provider import model_provider

    torch.manual_seed(0)
    net = model_provider(
        build, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage()
    )
    return args, net, module


def batches(n: int, seed: int, masked: float = 0.0) -> list[dict]:
    """Micro-batches as Megatron's GPT dataset yields them, with a prompt-style loss mask (1-3
    tokens at the start of each sequence; ``masked``: that share of each sequence instead)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(BATCH, SEQ)
        mask[:, : int(masked * SEQ) or int(torch.randint(1, 4, (1,), generator=g))] = 0
        out.append(
            {
                "tokens": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
                "labels": torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
                "loss_mask": mask,
                "position_ids": torch.arange(SEQ).expand(BATCH, SEQ).contiguous(),
                "attention_mask": torch.triu(torch.ones(SEQ, SEQ), 1)
                .bool()[None, None]
                .expand(BATCH, 1, SEQ, SEQ)
                .contiguous(),
            }
        )
    return out


def train_reports(model, pretrain_gpt, data: list[dict], forward_only: bool = False) -> list[dict]:
    """One step of Megatron's own schedule over `data`: the per-micro-batch report dicts."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=pretrain_gpt.forward_step,
        data_iterator=iter(data),
        model=[model],
        num_microbatches=len(data),
        seq_length=SEQ,
        micro_batch_size=BATCH,
        forward_only=forward_only,
    )


def reduce_like_megatron(reports: list[dict]) -> dict[str, torch.Tensor]:
    """Megatron's train_step reduction of [sum, count] report entries: summed over
    micro-batches, all-reduced over data-parallel x context-parallel ranks, sum / count."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    out = {}
    for key in reports[0]:
        val = torch.vstack([r[key].view(-1) for r in reports]).sum(dim=0)
        dist.all_reduce(val, group=ps.get_data_parallel_group(with_context_parallel=True))
        out[key] = val[0] / val[1]
    return out
