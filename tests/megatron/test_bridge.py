"""Megatron-Bridge 0.6.2's own loss code with our Megatron patch, on CPU (gloo, TP = 2).

What runs Bridge's code: ``megatron/bridge/training/losses.py`` as shipped
(``create_masked_next_token_loss_function`` and the ``masked_next_token_loss`` it binds,
with its NaN/Inf checks through Megatron's rerun state machine), as the loss function of
each micro-batch inside megatron.core's own schedule (``get_forward_backward_func``) on a
real tiny GPTModel at TP 2, with ``megatron_patch.apply(loss_type="tofu")``.

``losses.py`` is loaded from the side folder under its own module name with a bare
``megatron.bridge`` package in front of it: the wheel's ``megatron/bridge/__init__.py``
imports every model bridge, and those import Transformer Engine (``peft/lora_layers.py``),
which is not installable here. For the same reason Bridge's ``forward_step``
(``training/gpt_step.py``: ``training.config`` -> ``bridge.data`` -> ... -> ``peft``) does
not import on this machine, so the step function below does what it does for a GPT batch
(the model called with the labels; Bridge's partial over the loss mask returned), and
``test_bridge_forward_step_imports`` records why it is skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from tests.support.megatron_utils import require_megatron_core

require_megatron_core()

import tofu_kernels as tk  # noqa: E402
from tests.support.dist_utils import run_distributed  # noqa: E402
from tests.support.side_folders import side_folder  # noqa: E402

BRIDGE = "megatron-bridge-0.6.2"
GAMMA, BETA = 2.0, 0.7


def bridge_losses(folder: str):
    """Bridge's ``megatron.bridge.training.losses`` module, without the package's ``__init__``."""
    import importlib

    import megatron

    pkg = types.ModuleType("megatron.bridge")
    pkg.__path__ = [os.path.join(folder, "megatron", "bridge")]
    sys.modules["megatron.bridge"] = pkg
    megatron.bridge = pkg
    return importlib.import_module("megatron.bridge.training.losses")


def _bridge_worker(rank, world, folder):
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    import megatron_patch
    from megatron_patch.reporting import CE_KEY, LOSS_KEY
    from tests.support.megatron_lm import (
        BATCH,
        SEQ,
        VOCAB,
        batches,
        cpu_harness,
        reduce_like_megatron,
    )
    from tests.support.megatron_utils import gather_vocab, init_megatron_cpu, tiny_gpt

    cpu_harness()
    init_megatron_cpu(world)
    losses = bridge_losses(folder)
    assert Path(losses.__file__).is_relative_to(folder)
    megatron_patch.apply(loss_type="tofu", gamma=GAMMA, beta=BETA, backend="torch")
    try:
        model = tiny_gpt(world, vocab=VOCAB, seq=SEQ)
        data = batches(3, seed=5)

        def forward_step(data_iterator, model):
            d = next(data_iterator)
            out = model(d["tokens"], d["position_ids"], d["attention_mask"], labels=d["labels"])
            return out, losses.create_masked_next_token_loss_function(
                d["loss_mask"], check_for_nan_in_loss=True, check_for_spiky_loss=False
            )

        # fp64 per micro-batch: masked sums of TOFU and of the plain cross entropy, token count
        expect = []
        with torch.no_grad():
            for d in data:
                shard = model(d["tokens"], d["position_ids"], d["attention_mask"])  # [b, s, V/tp]
                full = gather_vocab(shard, ps.get_tensor_model_parallel_group()).double()
                tofu, ce = tk.tofu_loss_reference(full, d["labels"], gamma=GAMMA, beta=BETA)
                m = d["loss_mask"].double()
                expect.append(((tofu * m).sum(), (ce * m).sum(), m.sum()))

        for forward_only in (False, True):  # a training step, then an evaluation pass
            model.zero_grad_buffer() if hasattr(model, "zero_grad_buffer") else model.zero_grad()
            reports = get_forward_backward_func()(
                forward_step_func=forward_step,
                data_iterator=iter(data),
                model=[model],
                num_microbatches=len(data),
                seq_length=SEQ,
                micro_batch_size=BATCH,
                forward_only=forward_only,
            )
            assert len(reports) == len(data)
            for rep, (tofu, ce, n) in zip(reports, expect):
                assert set(rep) == {LOSS_KEY, CE_KEY}
                assert rep[CE_KEY][1] == rep[LOSS_KEY][1] == n  # Bridge's token count, for both
                torch.testing.assert_close(rep[LOSS_KEY][0].double(), tofu, rtol=2e-5, atol=1e-5)
                torch.testing.assert_close(rep[CE_KEY][0].double(), ce, rtol=2e-5, atol=1e-5)
            reduced = reduce_like_megatron(reports)
            assert not torch.allclose(reduced[LOSS_KEY], reduced[CE_KEY])
            if not forward_only:
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                assert grads and all(torch.isfinite(g).all() for g in grads)
                assert any(g.abs().sum() > 0 for g in grads)
    finally:
        megatron_patch.revert()


@pytest.mark.slow
def test_bridge_loss_in_megatron_schedule_tp2():
    """Bridge's loss partial reports TOFU as 'lm loss' (equal to fp64) and our patch adds
    'lm cross entropy' (equal to fp64) with Bridge's token count, training and evaluation."""
    run_distributed(2, _bridge_worker, folder=str(side_folder(BRIDGE)))


def test_bridge_forward_step_imports():
    """Bridge's forward_step (training/gpt_step.py) where its imports resolve; skipped with
    the missing module named otherwise (here: Transformer Engine, through Bridge's data and
    PEFT modules, and nvidia-modelopt)."""
    folder = side_folder(BRIDGE)
    code = (
        "import sys, types, megatron; m = types.ModuleType('megatron.bridge'); "
        f"m.__path__ = [{str(folder / 'megatron' / 'bridge')!r}]; sys.modules['megatron.bridge'] = m; "
        "from megatron.bridge.training.gpt_step import forward_step"
    )
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300
    )
    if out.returncode != 0:
        last = out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "no output"
        pytest.skip(f"Bridge's gpt_step does not import on this machine: {last}")
    pytest.fail(
        "gpt_step imports here: run Bridge's forward_step in _bridge_worker instead of its stand-in"
    )
