"""``tofu_kernels.automodel`` through NeMo Automodel 0.7.0's own code, on CPU.

What runs Automodel's code: ``components.loss.utils.calculate_loss`` (the call its recipe
makes, with its label normalisation and its dispatch on ``LinearCrossEntropy``),
``prepare_lm_weight`` / ``LinearCrossEntropy.materialize_lm_weight`` (the FSDP2 head gather),
``MaskedCrossEntropy`` (the contract, compared at gamma 0, beta 1) and its config code
(``ConfigNode`` and the recipe's typed ``RecipeConfig.loss_fn.build()``) on the example YAMLs.
Automodel's recipe module itself (``recipes/llm/train_ft.py``) does not import here (it needs
torchao and the rest of the full install), so its step is followed, not run: one backward of
``loss * world`` after ``calculate_loss`` with the global ``num_label_tokens``, as it does.

Tensor parallelism is torch's own: logits from an ``lm_head`` parallelised with
``ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)`` (Automodel's TP plan
for the head) and DTensors made with ``distribute_tensor``; FSDP2 is
``torch.distributed.fsdp.fully_shard``. The reference is fp64 autograd of
``tk.tofu_loss_reference``; tolerances from tests/support/helpers.py (fp32 inputs).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import tofu_kernels as tk
from tests.support.checkout import ROOT
from tests.support.dist_utils import run_distributed
from tests.support.helpers import assert_grad_close, assert_loss_close
from tests.support.side_folders import side_folder

AUTOMODEL = "nemo-automodel-0.7.0"
EXAMPLES = ROOT / "examples" / "automodel"
GAMMA, BETA = 2.0, 0.7  # not the defaults: the values must travel
VOCAB = 37  # odd: uneven vocabulary shards at TP 2 (19 + 18) and TP 4 (10 + 10 + 10 + 7)


@pytest.fixture
def automodel(monkeypatch):
    """Automodel's side folder on this test's path (and its spawned workers', which inherit it)."""
    monkeypatch.syspath_prepend(str(side_folder(AUTOMODEL)))
    import nemo_automodel.components.loss.utils as utils

    return utils


def batch(seed: int, shape=(2, 5), vocab: int = VOCAB):
    """Logits, labels with two ignored tokens, a mask dropping one more, per-token weights."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, shape, generator=g)
    labels.view(-1)[[1, 6]] = -100
    mask = torch.ones(shape, dtype=torch.long)
    mask.view(-1)[3] = 0
    weights = torch.rand(shape, generator=g) + 0.5
    return logits, labels, mask, weights


def reference(logits, labels, n, weights=None, mask=None, gamma=GAMMA, beta=BETA):
    """fp64 (loss, d loss / d logits, ce) of Automodel's contract: sum(w * loss) / n."""
    if mask is not None:
        labels = labels.masked_fill(mask == 0, -100)
    x = logits.detach().double().requires_grad_()
    per_token, ce = tk.tofu_loss_reference(x, labels, gamma=gamma, beta=beta)
    w = torch.ones_like(per_token) if weights is None else weights.double()
    loss = (per_token * w).sum() / n
    loss.backward()
    return loss.detach(), x.grad, (ce * w).sum() / n


# ----------------------------------------------------------------- one process


CASES = {  # name -> (mask, loss_weights, our ignore_index: calculate_loss maps Automodel's -100 to it)
    "plain": (False, False, -100),
    "mask": (True, False, -100),
    "loss_weights": (False, True, -100),
    "mask_weights_ignore_index": (True, True, -1),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_path_through_calculate_loss(automodel, case, backend):
    from tofu_kernels.automodel import TOFULoss

    use_mask, use_weights, ignore_index = CASES[case]
    logits, labels, mask, weights = batch(0)
    loss_fn = TOFULoss(gamma=GAMMA, beta=BETA, ignore_index=ignore_index, backend=backend)
    labels_in = labels.clone()
    x = logits.clone().requires_grad_()
    kwargs = dict(mask=mask) if use_mask else {}
    n = 7  # a global count: other ranks' tokens too
    if use_mask:  # calculate_loss has no mask argument: the module's own call
        loss = loss_fn(
            x,
            automodel._normalize_loss_labels(labels, ignore_index),
            num_label_tokens=n,
            loss_weights=weights if use_weights else None,
            **kwargs,
        )
    else:
        loss = automodel.calculate_loss(
            loss_fn,
            logits=x,
            labels=labels,
            model=None,
            num_label_tokens=n,
            loss_weights=weights if use_weights else None,
        )
    loss.backward()
    ref, grad, ce = reference(
        logits, labels, n, weights if use_weights else None, mask if use_mask else None
    )
    assert_loss_close(loss, ref)
    assert_loss_close(loss_fn.last_ce, ce)
    assert_grad_close(x.grad, grad, torch.float32)
    assert torch.equal(labels, labels_in), "the caller's labels were modified"


def test_cross_entropy_settings_equal_automodels_masked_cross_entropy(automodel):
    """gamma 0, beta 1 is cross entropy: Automodel's own MaskedCrossEntropy, same call."""
    from nemo_automodel.components.loss.masked_ce import MaskedCrossEntropy

    from tofu_kernels.automodel import TOFULoss

    logits, labels, _, weights = batch(1)
    out = []
    for fn in (TOFULoss(gamma=0.0, beta=1.0), MaskedCrossEntropy()):
        x = logits.clone().requires_grad_()
        loss = automodel.calculate_loss(
            fn, logits=x, labels=labels, num_label_tokens=6, loss_weights=weights
        )
        loss.backward()
        out.append((loss.detach(), x.grad))
    assert_loss_close(out[0][0], out[1][0].double())
    assert_grad_close(out[0][1], out[1][1].double(), torch.float32)


def test_zero_label_tokens_give_zero_loss_and_gradient(automodel):
    from tofu_kernels.automodel import LinearTOFULoss, TOFULoss

    logits, labels, _, _ = batch(2)
    x = logits.clone().requires_grad_()
    loss = automodel.calculate_loss(
        TOFULoss(), logits=x, labels=torch.full_like(labels, -100), num_label_tokens=0
    )
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x.grad) == 0
    h, w = torch.randn(2, 5, 8, requires_grad=True), torch.randn(VOCAB, 8, requires_grad=True)
    loss = automodel.calculate_loss(
        LinearTOFULoss(),
        labels=labels,
        model=None,
        hidden_states=h,
        lm_weight=w,
        num_label_tokens=0,
    )
    loss.backward()
    assert (
        loss.item() == 0.0 and torch.count_nonzero(h.grad) == 0 and torch.count_nonzero(w.grad) == 0
    )


class TinyLM(torch.nn.Module):
    """An embedding and an untied ``lm_head``: what ``prepare_lm_weight`` finds by name."""

    def __init__(self, vocab=VOCAB, dim=8):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.lm_head = torch.nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):  # the final hidden states, as with output_hidden_states=True
        return torch.tanh(self.embed(ids))


def linear_reference(model, ids, labels, n, weights=None):
    """fp64 loss and gradients (hidden, lm_head.weight, embed.weight) of the hidden-state path."""
    e = model.embed.weight.detach().double().requires_grad_()
    w = model.lm_head.weight.detach().double().requires_grad_()
    h = torch.tanh(e[ids])
    h.retain_grad()
    per_token, _ = tk.tofu_loss_reference(h @ w.T, labels, gamma=GAMMA, beta=BETA)
    loss = (per_token * (1 if weights is None else weights.double())).sum() / n
    loss.backward()
    return loss.detach(), h.grad, w.grad, e.grad


@pytest.mark.parametrize("use_weights", [False, True])
def test_hidden_state_path_through_calculate_loss(automodel, use_weights):
    """calculate_loss finds lm_head.weight itself (prepare_lm_weight) and hands our
    LinearCrossEntropy the hidden states; the logits are never built."""
    from nemo_automodel.components.loss.linear_ce_base import LinearCrossEntropy

    from tofu_kernels.automodel import LinearTOFULoss

    torch.manual_seed(0)
    model = TinyLM()
    _, labels, _, weights = batch(3)
    ids = torch.randint(0, VOCAB, labels.shape)
    loss_fn = LinearTOFULoss(
        gamma=GAMMA, beta=BETA, chunk_size=3
    )  # chunks that split the 10 tokens
    assert isinstance(loss_fn, LinearCrossEntropy)
    h = model(ids)
    h.retain_grad()
    loss = automodel.calculate_loss(
        loss_fn,
        logits=None,
        labels=labels,
        model=model,
        hidden_states=h,
        num_label_tokens=9,
        loss_weights=weights if use_weights else None,
    )
    loss.backward()
    ref, dh, dw, de = linear_reference(model, ids, labels, 9, weights if use_weights else None)
    assert_loss_close(loss, ref)
    assert_grad_close(h.grad, dh, torch.float32)
    assert_grad_close(model.lm_head.weight.grad, dw, torch.float32)
    assert_grad_close(model.embed.weight.grad, de, torch.float32)


def test_bad_inputs_are_refused(automodel):
    from tofu_kernels.automodel import LinearTOFULoss, TOFULoss

    logits, labels, _, weights = batch(4)
    with pytest.raises(ValueError, match="loss_weights.shape"):
        TOFULoss()(logits, labels, loss_weights=weights[:, :2])
    with pytest.raises(ValueError, match="loss_weights goes with reduction='sum'"):
        TOFULoss(reduction="mean")(logits, labels, loss_weights=weights)
    with pytest.raises(ValueError, match="num_label_tokens goes with reduction='sum'"):
        TOFULoss(reduction="mean")(logits, labels, num_label_tokens=3)
    with pytest.raises(ValueError, match="beta"):
        LinearTOFULoss(beta=0.0)
    # the mean reduction is ours over non-ignored tokens
    x = logits.clone()
    assert_loss_close(
        TOFULoss(reduction="mean", gamma=GAMMA, beta=BETA)(x, labels),
        reference(logits, labels, (labels != -100).sum())[0],
    )


def test_the_kernels_get_the_modules_params_made_once(automodel, monkeypatch):
    """Each module hands the kernels a ready TOFUParams, made at construction from its own (the
    cross entropy returned for ``last_ce``; per token under ``loss_weights``): the same object at
    every call, not one rebuilt from keywords per call."""
    import dataclasses

    import tofu_kernels.automodel as am
    from tests.support.spies import spy_kernel_entries

    seen = spy_kernel_entries(monkeypatch, am)
    logits, labels, _, weights = batch(5)
    loss_fn = am.TOFULoss(gamma=GAMMA, beta=BETA)
    for w in (None, None, weights, weights):
        loss_fn(logits, labels, num_label_tokens=7, loss_weights=w)
    with_ce = dataclasses.replace(loss_fn.params, return_ce=True)
    per_token = dataclasses.replace(with_ce, reduction="none")
    (a, _), (b, _), (c, _), (d, _) = seen
    assert a is b and c is d and (a, c) == (with_ce, per_token)
    assert (a.gamma, a.beta, a.reduction) == (GAMMA, BETA, "sum")

    seen.clear()
    h, w = torch.randn(2, 5, 8), torch.randn(VOCAB, 8)
    linear = am.LinearTOFULoss(gamma=GAMMA, beta=BETA, chunk_size=3)
    for _ in range(2):
        linear(h, labels, w, num_label_tokens=7)
    (a, chunk_a), (b, chunk_b) = seen
    assert a is b and a == dataclasses.replace(linear.params, return_ce=True)
    assert chunk_a == chunk_b == 3


# sections whose targets need Automodel's full install (the model class imports torchao, the
# data sections torchdata and datasets); Automodel's loader resolves every _target_ at load
FULL_INSTALL = ("model", "dataset", "dataloader", "validation_dataset", "validation_dataloader")


@pytest.mark.parametrize(
    "name,cls,tp",
    [
        ("llama_sft_fsdp2.yaml", "TOFULoss", False),
        ("llama_sft_tp2.yaml", "TOFULoss", True),
        ("llama_sft_fsdp2_linear.yaml", "LinearTOFULoss", False),
    ],
)
def test_example_yaml_builds_our_loss_through_automodels_config(automodel, name, cls, tp):
    """The recipe's own path: Automodel's ConfigNode (its loader's), then
    RecipeConfig(cfg).loss_fn.build(), on the example file less the sections that need the full
    install (those are checked to name their targets)."""
    import yaml
    from nemo_automodel.components.config.loader import ConfigNode
    from nemo_automodel.recipes._typed_config import RecipeConfig

    import tofu_kernels.automodel as am

    raw = yaml.safe_load((EXAMPLES / name).read_text())
    assert all(raw[k]["_target_"] for k in FULL_INSTALL)
    cfg = ConfigNode({k: v for k, v in raw.items() if k not in FULL_INSTALL})
    loss_fn = RecipeConfig(cfg).loss_fn.build()
    assert type(loss_fn) is getattr(am, cls)
    assert (loss_fn.params.gamma, loss_fn.params.beta, loss_fn.reduction) == (
        tk.DEFAULT_GAMMA,
        tk.DEFAULT_BETA,
        "sum",
    )
    assert cfg.recipe == "TrainFinetuneRecipeForNextTokenPrediction"
    assert (cfg.distributed.tp_size > 1) == tp


# ----------------------------------------------------------------- tensor parallel (gloo)


def _tp_worker(rank, world):
    from nemo_automodel.components.loss.utils import calculate_loss
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from tofu_kernels.automodel import LinearTOFULoss, TOFULoss

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    start, end = _range(VOCAB, world, rank)
    loss_fn = TOFULoss(gamma=GAMMA, beta=BETA)

    # logits as a vocab-sharded DTensor, each case's loss and this rank's shard of the gradient
    for use_mask, use_weights, n in ((False, False, 8), (True, True, 5), (False, False, 0)):
        logits, labels, mask, weights = batch(10)  # same seed: identical on every rank
        x = distribute_tensor(logits.clone(), mesh, [Shard(2)]).requires_grad_()
        lab = labels.masked_fill(mask == 0, -100) if use_mask else labels
        loss = calculate_loss(
            loss_fn,
            logits=x,
            labels=lab,
            num_label_tokens=n,
            loss_weights=weights if use_weights else None,
        )
        loss.backward()
        assert isinstance(x.grad, DTensor) and x.grad.placements == (Shard(2),)
        if n == 0:
            assert loss.item() == 0.0 and torch.count_nonzero(x.grad.to_local()) == 0
            continue
        ref, grad, ce = reference(logits, lab, n, weights if use_weights else None)
        assert_loss_close(loss, ref)
        assert_loss_close(loss_fn.last_ce, ce)
        assert_grad_close(x.grad.to_local(), grad[..., start:end], torch.float32)

    # the logits of a head parallelised as Automodel's TP plan does (torch's ColwiseParallel)
    torch.manual_seed(0)
    model = TinyLM()
    ref_model = TinyLM()
    ref_model.load_state_dict(model.state_dict())
    parallelize_module(
        model.lm_head, mesh, ColwiseParallel(output_layouts=Shard(-1), use_local_output=False)
    )
    _, labels, _, _ = batch(11)
    ids = torch.randint(0, VOCAB, labels.shape)
    logits = model.lm_head(model(ids))
    assert isinstance(logits, DTensor) and logits.placements == (Shard(2),)
    loss = calculate_loss(loss_fn, logits=logits, labels=labels, model=model, num_label_tokens=8)
    loss.backward()
    ref, _, dw, de = linear_reference(ref_model, ids, labels, 8)
    assert_loss_close(loss, ref)
    assert_grad_close(model.lm_head.weight.grad.to_local(), dw[start:end], torch.float32)
    assert_grad_close(model.embed.weight.grad, de, torch.float32)

    # the hidden-state path with a vocab-sharded head weight: vocab_parallel_linear_tofu_loss
    torch.manual_seed(1)
    model = TinyLM()
    w = distribute_tensor(model.lm_head.weight.detach().clone(), mesh, [Shard(0)]).requires_grad_()
    h = model(ids)
    h.retain_grad()
    lin = LinearTOFULoss(gamma=GAMMA, beta=BETA)
    loss = calculate_loss(
        lin, labels=labels, model=model, hidden_states=h, lm_weight=w, num_label_tokens=8
    )
    loss.backward()
    ref, dh, dw, de = linear_reference(model, ids, labels, 8)
    assert_loss_close(loss, ref)
    assert_grad_close(h.grad, dh, torch.float32)  # all-reduced over the TP group
    assert w.grad.placements == (Shard(0),)
    assert_grad_close(w.grad.to_local(), dw[start:end], torch.float32)
    assert_grad_close(model.embed.weight.grad, de, torch.float32)

    # refused: logits sharded over the tokens, a head sharded over the hidden dimension
    logits, labels, _, _ = batch(12, shape=(2, 4))
    with pytest.raises(ValueError, match=r"expected Shard\(2\)"):
        loss_fn(distribute_tensor(logits, mesh, [Shard(1)]), labels)
    with pytest.raises(ValueError, match=r"Shard\(0\)"):
        lin(
            torch.randn(2, 4, 8),
            labels,
            distribute_tensor(torch.randn(VOCAB, 8), mesh, [Shard(1)]).requires_grad_(),
        )
    # replicated logits: the single-device kernels on the local copy
    x = distribute_tensor(logits.clone(), mesh, [Replicate()]).requires_grad_()
    loss = loss_fn(x, labels, num_label_tokens=4)
    assert_loss_close(loss, reference(logits, labels, 4)[0])


def _range(size, n, rank):
    chunk = -(-size // n)
    s = min(rank * chunk, size)
    return s, min(s + chunk, size)


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_dtensor_paths(automodel, world):
    run_distributed(world, _tp_worker)


# ----------------------------------------------------------------- FSDP2 (gloo)


def _fsdp_worker(rank, world):
    from nemo_automodel.components.loss.utils import calculate_loss
    from torch.distributed.fsdp import fully_shard

    from tofu_kernels.automodel import LinearTOFULoss

    torch.manual_seed(0)
    model = TinyLM()
    ref_model = TinyLM()
    ref_model.load_state_dict(model.state_dict())
    fully_shard(
        model.lm_head
    )  # on its own: its forward never runs, the weight stays a sharded DTensor
    fully_shard(model)
    per_rank = [batch(20 + r) for r in range(world)]
    ids_all = [
        torch.randint(0, VOCAB, b[1].shape, generator=torch.Generator().manual_seed(30 + r))
        for r, b in enumerate(per_rank)
    ]
    labels_all = [b[1] for b in per_rank]
    n = int(sum((lab != -100).sum() for lab in labels_all))  # the recipe's all-reduced count

    ref, _, dw, de = linear_reference(ref_model, torch.cat(ids_all), torch.cat(labels_all), n)
    loss_fn = LinearTOFULoss(gamma=GAMMA, beta=BETA)
    # through calculate_loss (its prepare_lm_weight gathers the head), then our forward handed
    # the sharded DTensor itself (it calls the inherited materialize_lm_weight)
    for direct in (False, True):
        model.zero_grad()
        hidden = model(ids_all[rank])
        if direct:
            loss = loss_fn(
                hidden,
                labels_all[rank],
                model.lm_head.weight,
                num_label_tokens=n,
                grad_reduce_group=dist.group.WORLD,
            )
        else:
            loss = calculate_loss(
                loss_fn,
                labels=labels_all[rank],
                model=model,
                hidden_states=hidden,
                num_label_tokens=n,
                grad_reduce_group=dist.group.WORLD,
            )
        (loss * world).backward()  # the recipe's scaling, undone by FSDP's average
        total = loss.detach().clone()
        dist.all_reduce(total)
        assert_loss_close(total, ref)
        assert_grad_close(model.lm_head.weight.grad.full_tensor(), dw, torch.float32)
        assert_grad_close(model.embed.weight.grad.full_tensor(), de, torch.float32)


def test_fsdp2_head_gradient_through_materialize_lm_weight(automodel):
    """Two ranks, each its own batch; the head's and embedding's full gradients equal one
    process's gradient of the global loss (sum over both batches / all their tokens)."""
    run_distributed(2, _fsdp_worker)
