"""``tofu_kernels.torchtitan`` through torchtitan 0.3.0's own code, on CPU.

What runs torchtitan's code: ``Config.build()`` of our losses (its ``Configurable``), its
``ChunkedLossWrapper`` with our loss as the inner ``loss_fn`` (its chunking, per-chunk
backward, ``GradAccumulator`` and metric reduction), its ``CrossEntropyLoss`` (compared at
gamma 0, beta 1, also loss parallel on vocab-sharded DTensors), its SPMD backend switch
(``set_spmd_backend``, ``set_current_spmd_mesh``) and its Llama 3 model (``debugmodel``
flavor: the forward with ``_skip_lm_head`` and its ``lm_head``), as the trainer's step uses
them, and its ``ConfigManager`` on examples/torchtitan/tofu_llama3.py (``--module`` /
``--config``, a command-line override of our field). torchtitan's ``Trainer`` does not run on CPU:
``torchtitan.tools.utils`` takes "cuda"
as the device type when no accelerator is found, and its language models take only
FlexAttention or varlen attention, whose backward is refused on CPU; so the decoder runs
forward only and the gradient is checked from the final hidden states on (the loss's part
of the step). The reference is fp64 autograd of ``tk.tofu_loss_reference``.
"""

from __future__ import annotations

import pytest
import torch

import tofu_kernels as tk
from tests.support.dist_utils import run_distributed
from tests.support.side_folders import TORCHTITAN, side_folder

GAMMA, BETA = 2.0, 0.7  # not the defaults: the values must travel
VOCAB = 37  # odd: uneven vocabulary shards at TP 2 (19 + 18)


def _add_side_folder():
    import sys

    path = str(side_folder(TORCHTITAN))
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture
def titan(monkeypatch):
    """torchtitan's side folder on this test's path (and its spawned workers', which inherit it)."""
    monkeypatch.syspath_prepend(str(side_folder(TORCHTITAN)))
    import torchtitan.components.loss as loss

    return loss


def batch(seed: int, shape=(2, 8), vocab: int = VOCAB, dim: int | None = None):
    """Logits (or hidden states with ``dim``) and labels with three ignored tokens."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, dim or vocab, generator=g) * (1.0 if dim else 3.0)
    labels = torch.randint(0, vocab, shape, generator=g)
    labels.view(-1)[[1, 6, 9]] = -100
    return x, labels


def reference(logits, labels, n=None, gamma=GAMMA, beta=BETA):
    """fp64 (loss, d loss / d logits, metrics) of torchtitan's contract: sums / n."""
    x = logits.detach().double().requires_grad_()
    per_token, ce = tk.tofu_loss_reference(x, labels, gamma=gamma, beta=beta)
    n = 1.0 if n is None else float(n)
    loss = per_token.sum() / n
    loss.backward()
    valid = labels != -100
    p = torch.softmax(x.detach(), -1)
    entropy = (-(p * torch.log(p)).sum(-1) * valid).sum() / n
    top1 = ((x.detach().argmax(-1) == labels) & valid).sum() / n
    return (
        loss.detach(),
        x.grad,
        {
            "cross_entropy/mean": ce.sum() / n,
            "entropy/mean": entropy,
            "token_accuracy/mean": top1.double(),
        },
    )


def assert_metrics(got: dict, want: dict):
    from tofu_kernels.torchtitan import METRICS

    assert set(got) == set(METRICS)
    for k in METRICS:
        assert not got[k].requires_grad, k
        torch.testing.assert_close(got[k].double(), want[k].double(), rtol=1e-5, atol=1e-6, msg=k)


# ----------------------------------------------------------------- one process


def test_config_build_gives_our_losses(titan):
    from tofu_kernels.torchtitan import LinearTOFULoss, TOFULoss

    loss = TOFULoss.Config(gamma=GAMMA, beta=BETA, global_vocab_size=VOCAB).build()
    assert type(loss) is TOFULoss and isinstance(loss, titan.BaseLoss)
    assert (loss.params.gamma, loss.params.beta, loss.global_vocab_size) == (GAMMA, BETA, VOCAB)
    wrapped = titan.ChunkedLossWrapper.Config(
        num_chunks=4, loss_fn=TOFULoss.Config(gamma=GAMMA)
    ).build()
    assert type(wrapped.loss_fn) is TOFULoss and wrapped.loss_fn.params.gamma == GAMMA
    fused = LinearTOFULoss.Config(beta=BETA, chunk_size=64).build()
    assert isinstance(fused, titan.ChunkedLossWrapper) and (
        fused.params.beta,
        fused.chunk_size,
    ) == (BETA, 64)
    defaults = TOFULoss.Config().build().params
    assert (defaults.gamma, defaults.beta) == (tk.DEFAULT_GAMMA, tk.DEFAULT_BETA)
    assert TOFULoss.Config(gamma=1.0).to_dict()["gamma"] == 1.0  # torchtitan's config serialisation
    with pytest.raises(ValueError, match="beta"):
        TOFULoss.Config(beta=0.0).build()
    with pytest.raises(ValueError, match="backend"):
        LinearTOFULoss.Config(backend="nope").build()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("n", [None, 23])
def test_plain_logits_equal_fp64(titan, backend, n):
    from tofu_kernels.torchtitan import TOFULoss

    logits, labels = batch(1)
    x = logits.clone().requires_grad_()
    gvt = None if n is None else torch.tensor(n)  # the global count, here more than this batch's 13
    loss, metrics = TOFULoss.Config(gamma=GAMMA, beta=BETA, backend=backend).build()(x, labels, gvt)
    loss.backward()
    ref_loss, ref_grad, ref_metrics = reference(logits, labels, n)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    assert_metrics(metrics, ref_metrics)


def test_ce_mode_equals_torchtitans_cross_entropy(titan):
    from tofu_kernels.torchtitan import TOFULoss

    logits, labels = batch(2)
    gvt = torch.tensor(13)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours, metrics = TOFULoss.Config(gamma=0.0, beta=1.0).build()(a, labels, gvt)
    theirs, their_metrics = titan.CrossEntropyLoss.Config().build()(b, labels, gvt)
    ours.backward()
    theirs.backward()
    assert their_metrics == {}
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(metrics["cross_entropy/mean"], theirs.detach(), rtol=1e-6, atol=1e-6)


def _decoder(dim=16, seed=3):
    """A stand-in for the decoder below the output layer: one linear map (its gradient is what
    the chunked backward hands back through the hidden states)."""
    g = torch.Generator().manual_seed(seed)
    decoder = torch.nn.Linear(dim, dim, bias=False)
    with torch.no_grad():
        decoder.weight.copy_(torch.randn(dim, dim, generator=g) * 0.3)
    return decoder, torch.randn(VOCAB, dim, generator=g) * 0.3


@pytest.mark.parametrize("fused", [False, True])
def test_inside_chunked_loss_wrapper_and_fused_equal_fp64(titan, fused):
    """ChunkedLossWrapper with TOFULoss inside (torchtitan's chunks and backward), and our
    LinearTOFULoss in its place: loss, metrics, the head's and the decoder's gradients."""
    from tofu_kernels.torchtitan import LinearTOFULoss, TOFULoss

    dim, n = 16, 19
    x, labels = batch(4, dim=dim)
    decoder, w = _decoder(dim)
    head = torch.nn.Linear(dim, VOCAB, bias=False)
    with torch.no_grad():
        head.weight.copy_(w)
    if fused:
        loss_fn = LinearTOFULoss.Config(gamma=GAMMA, beta=BETA, chunk_size=5).build()
    else:
        loss_fn = titan.ChunkedLossWrapper.Config(
            num_chunks=4, loss_fn=TOFULoss.Config(gamma=GAMMA, beta=BETA)
        ).build()
    loss_fn.set_lm_head(head)
    loss, metrics = loss_fn(decoder(x), labels, torch.tensor(n))
    loss.backward()

    hd = torch.nn.Linear(dim, dim, bias=False).double()
    with torch.no_grad():
        hd.weight.copy_(decoder.weight.double())
    wd = w.double().requires_grad_()
    ref_logits = hd(x.double()) @ wd.T
    ref_loss, ref_grad, ref_metrics = reference(ref_logits, labels, n)
    ref_logits.backward(ref_grad)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(head.weight.grad.double(), wd.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(decoder.weight.grad.double(), hd.weight.grad, rtol=1e-4, atol=1e-6)
    assert_metrics(metrics, ref_metrics)


def test_fused_ce_mode_equals_chunked_cross_entropy(titan):
    """LinearTOFULoss at gamma 0, beta 1 = torchtitan's default loss, ChunkedLossWrapper with
    CrossEntropyLoss: loss and both gradients."""
    from tofu_kernels.torchtitan import LinearTOFULoss

    dim = 16
    x, labels = batch(5, dim=dim)
    grads = []
    for cfg in (
        LinearTOFULoss.Config(gamma=0.0, beta=1.0),
        titan.ChunkedLossWrapper.Config(num_chunks=2, loss_fn=titan.CrossEntropyLoss.Config()),
    ):
        decoder, w = _decoder(dim)
        head = torch.nn.Linear(dim, VOCAB, bias=False)
        with torch.no_grad():
            head.weight.copy_(w)
        loss_fn = cfg.build()
        loss_fn.set_lm_head(head)
        loss, _ = loss_fn(decoder(x), labels, torch.tensor(13))
        loss.backward()
        grads.append((loss.detach(), head.weight.grad, decoder.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_no_head_and_bias_are_refused(titan):
    from tofu_kernels.torchtitan import LinearTOFULoss

    x, labels = batch(6, dim=8)
    loss_fn = LinearTOFULoss.Config().build()
    with pytest.raises(RuntimeError, match="set_lm_head"):
        loss_fn(x, labels)
    loss_fn.set_lm_head(torch.nn.Linear(8, VOCAB, bias=True))
    with pytest.raises(ValueError, match="bias"):
        loss_fn(x, labels)


def test_the_kernels_get_the_losss_params(titan, monkeypatch):
    """Both losses hand the kernels their own TOFUParams, made once by ``Config.build()``: the
    same object at every call, not one rebuilt from keywords per call."""
    import tofu_kernels.torchtitan as tt
    from tests.support.spies import spy_kernel_entries

    seen = spy_kernel_entries(monkeypatch, tt)
    logits, labels = batch(7)
    loss_fn = tt.TOFULoss.Config(gamma=GAMMA, beta=BETA).build()
    loss_fn(logits, labels)
    loss_fn(logits, labels)
    assert [p for p, _ in seen] == [loss_fn.params] * 2 and seen[0][0] is seen[1][
        0
    ] is loss_fn.params

    seen.clear()
    x, labels = batch(7, dim=8)
    fused = tt.LinearTOFULoss.Config(gamma=GAMMA, beta=BETA, chunk_size=5).build()
    fused.set_lm_head(torch.nn.Linear(8, VOCAB, bias=False))
    fused(x, labels)
    fused(x, labels)
    assert all(p is fused.params and chunk == 5 for p, chunk in seen) and len(seen) == 2


@pytest.mark.slow
def test_torchtitans_llama3_step_from_the_hidden_states(titan):
    """torchtitan's Llama 3 (debugmodel) as its trainer runs it with ChunkedLossWrapper: the
    model with ``_skip_lm_head=True``, the wrapper holding its ``lm_head``; the loss and the
    gradients of the head and of the final hidden states equal fp64 on the model's own
    logits. The decoder's backward cannot run on CPU (FlexAttention), so the hidden states
    are a leaf here."""
    from torchtitan.models.llama3 import llama3_configs

    from tofu_kernels.torchtitan import LinearTOFULoss, TOFULoss

    torch.manual_seed(0)
    model = llama3_configs["debugmodel"](attn_backend="flex").build()
    model.init_states(buffer_device=None)
    vocab = model.lm_head.weight.shape[0]
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab, (2, 16), generator=g)
    labels = torch.randint(0, vocab, (2, 16), generator=g)
    labels[:, :5] = -100  # a prompt
    positions = torch.arange(16).expand(2, 16)
    masks = model.get_attention_masks(positions=positions)
    gvt = (labels != -100).sum()
    with torch.no_grad():
        logits = model(tokens, positions=positions, attention_masks=masks)
        model._skip_lm_head = True
        hidden = model(tokens, positions=positions, attention_masks=masks)
    assert hidden.shape == (2, 16, model.lm_head.weight.shape[1])
    torch.testing.assert_close(model.lm_head(hidden), logits)
    wd = model.lm_head.weight.detach().double().requires_grad_()
    hd = hidden.double().requires_grad_()
    ref_logits = hd @ wd.T
    ref_loss, ref_grad, ref_metrics = reference(ref_logits, labels, gvt)
    ref_logits.backward(ref_grad)
    for cfg in (
        titan.ChunkedLossWrapper.Config(
            num_chunks=4, loss_fn=TOFULoss.Config(gamma=GAMMA, beta=BETA)
        ),
        LinearTOFULoss.Config(gamma=GAMMA, beta=BETA, chunk_size=8),
    ):
        loss_fn = cfg.build()
        loss_fn.set_lm_head(model.lm_head)  # what the trainer does for a ChunkedLossWrapper
        model.lm_head.weight.grad = None
        h = hidden.clone().requires_grad_()
        loss, metrics = loss_fn(h, labels, gvt)
        loss.backward()
        torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h.grad.double(), hd.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(
            model.lm_head.weight.grad.double(), wd.grad, rtol=1e-4, atol=1e-6
        )
        assert_metrics(metrics, ref_metrics)


# ----------------------------------------------------------------- tensor parallel (gloo)


def _tp_worker(rank, world):
    _add_side_folder()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from torchtitan.components.loss import CrossEntropyLoss
    from torchtitan.distributed.spmd_types import set_current_spmd_mesh
    from torchtitan.distributed.utils import set_spmd_backend

    from tests.support.spies import count_collectives, gathers
    from tofu_kernels.torchtitan import LinearTOFULoss, TOFULoss

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    chunk = -(-VOCAB // world)
    start, end = rank * chunk, min(VOCAB, (rank + 1) * chunk)
    logits, labels = batch(10)  # same seed: identical on every rank
    n = 17
    ref_loss, ref_grad, ref_metrics = reference(logits, labels, n)
    ours = TOFULoss.Config(gamma=GAMMA, beta=BETA, global_vocab_size=VOCAB).build()

    # partial_dtensor: logits a vocab-sharded DTensor (loss parallel), plain labels
    set_spmd_backend("partial_dtensor")
    x = distribute_tensor(logits.clone(), mesh, [Shard(2)]).requires_grad_()
    with count_collectives() as calls:
        loss, metrics = ours(x, labels, torch.tensor(n))
        assert gathers(calls) == 2 and calls.total() == 2, (
            calls
        )  # the checked call's layout exchange + statistics
        calls.clear()
        unchecked = TOFULoss.Config(gamma=GAMMA, beta=BETA, check_inputs=False).build()
        unchecked(
            distribute_tensor(logits.clone(), mesh, [Shard(2)]).requires_grad_(),
            labels,
            torch.tensor(n),
        )
        assert gathers(calls) == 1 and calls.total() == 1, calls  # one all-gather of the statistics
        calls.clear()
        loss.backward()
        assert calls.total() == 0, calls
    assert isinstance(x.grad, DTensor) and x.grad.placements == (Shard(2),)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        x.grad.to_local().double(), ref_grad[..., start:end], rtol=1e-4, atol=1e-6
    )
    assert_metrics(metrics, ref_metrics)
    # gamma 0, beta 1 = torchtitan's loss-parallel cross entropy on the same DTensor
    a = distribute_tensor(logits.clone(), mesh, [Shard(2)]).requires_grad_()
    b = distribute_tensor(logits.clone(), mesh, [Shard(2)]).requires_grad_()
    ce_ours, _ = TOFULoss.Config(gamma=0.0, beta=1.0).build()(a, labels, torch.tensor(n))
    ce_theirs, _ = CrossEntropyLoss.Config(global_vocab_size=VOCAB).build()(
        b, labels, torch.tensor(n)
    )
    ce_ours.backward()
    ce_theirs.backward()
    torch.testing.assert_close(ce_ours, ce_theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.grad.to_local(), b.grad.to_local(), rtol=1e-5, atol=1e-7)

    # full_dtensor: labels a DTensor too; tokens sharded over a mesh of their own -> Partial
    set_spmd_backend("full_dtensor")
    lab = distribute_tensor(labels, mesh, [Replicate()])
    x = distribute_tensor(logits.clone(), mesh, [Shard(2)]).requires_grad_()
    loss, _ = ours(x, lab, torch.tensor(n))
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        x.grad.to_local().double(), ref_grad[..., start:end], rtol=1e-4, atol=1e-6
    )
    dp = init_device_mesh("cpu", (world,), mesh_dim_names=("dp",))
    x = distribute_tensor(logits.clone(), dp, [Shard(0)]).requires_grad_()
    loss, _ = ours(x, distribute_tensor(labels, dp, [Shard(0)]), torch.tensor(n))
    assert isinstance(loss, DTensor) and loss.placements == (Partial(),)
    loss.full_tensor().backward()
    torch.testing.assert_close(loss.full_tensor().double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.full_tensor().double(), ref_grad, rtol=1e-4, atol=1e-6)

    # spmd_types (torchtitan's default backend): plain local shards, the tp group of the current mesh
    set_spmd_backend("spmd_types")
    local = logits[..., start:end].clone().requires_grad_()
    with set_current_spmd_mesh(mesh):
        loss, metrics = ours(local, labels, torch.tensor(n))
    loss.backward()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(local.grad.double(), ref_grad[..., start:end], rtol=1e-4, atol=1e-6)
    assert_metrics(metrics, ref_metrics)

    # the fused loss on a vocabulary-sharded head (ColwiseParallel's weight) with replicated hidden states
    set_spmd_backend("partial_dtensor")
    dim = 16
    hidden, labels = batch(11, dim=dim)
    _, w = _decoder(dim)
    head = torch.nn.Linear(dim, VOCAB, bias=False)
    head.weight = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
    fused = LinearTOFULoss.Config(gamma=GAMMA, beta=BETA, chunk_size=6).build()
    fused.set_lm_head(head)
    h = distribute_tensor(hidden.clone(), mesh, [Replicate()]).requires_grad_()
    loss, metrics = fused(h, labels, torch.tensor(n))
    loss.backward()
    hd, wd = hidden.double().requires_grad_(), w.double().requires_grad_()
    ref_logits = hd @ wd.T
    ref_loss, ref_grad, ref_metrics = reference(ref_logits, labels, n)
    ref_logits.backward(ref_grad)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    assert isinstance(head.weight.grad, DTensor) and head.weight.grad.placements == (Shard(0),)
    torch.testing.assert_close(
        head.weight.grad.to_local().double(), wd.grad[start:end], rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(h.grad.full_tensor().double(), hd.grad, rtol=1e-4, atol=1e-6)
    assert_metrics(metrics, ref_metrics)


@pytest.mark.slow
def test_tp2_vocab_sharded_logits_and_head_equal_fp64(titan):
    """TP 2 on gloo, each of torchtitan's SPMD backends: vocab-sharded DTensor logits
    (partial_dtensor: one all-gather; the gradient a DTensor with the logits' placements;
    gamma 0, beta 1 equal to torchtitan's loss-parallel cross entropy), DTensor labels and a
    token-sharded mesh (full_dtensor: a Partial loss), plain local shards (spmd_types), and
    the fused loss on a vocabulary-sharded head."""
    run_distributed(2, _tp_worker)


# ----------------------------------------------------------------- the example configs, the trainer


@pytest.mark.parametrize(
    "name,fused",
    [("llama3_8b_tofu", True), ("llama3_8b_tofu_chunked", False), ("llama3_debugmodel_tofu", True)],
)
def test_example_configs_through_torchtitans_config_manager(titan, name, fused):
    """examples/torchtitan/tofu_llama3.py as the command line names it: torchtitan's
    ConfigManager (--module/--config, a CLI override of our field through tyro) and the
    loss built from the parsed config."""
    from torchtitan.config import ConfigManager

    from tofu_kernels.torchtitan import LinearTOFULoss, TOFULoss

    cfg = ConfigManager().parse_args(
        ["--module", "examples.torchtitan.tofu_llama3", "--config", name, "--training.steps", "3"]
    )
    loss_cfg = cfg.loss if fused else cfg.loss.loss_fn
    assert (loss_cfg.gamma, loss_cfg.beta) == (3.0, 0.8) and cfg.training.steps == 3
    assert loss_cfg.global_vocab_size == cfg.model_spec.model.vocab_size
    loss = cfg.loss.build()
    assert type(loss) is (LinearTOFULoss if fused else titan.ChunkedLossWrapper)
    assert fused or type(loss.loss_fn) is TOFULoss
    if name == "llama3_debugmodel_tofu":
        over = ConfigManager().parse_args(
            ["--module", "examples.torchtitan.tofu_llama3", "--config", name, "--loss.gamma", "2.5"]
        )
        assert over.loss.gamma == 2.5 and over.loss.build().params.gamma == 2.5


def test_torchtitans_trainer_on_cpu(titan, monkeypatch, tmp_path):
    """torchtitan's Trainer built from the example config: it does not run on CPU (its
    device type is "cuda" whenever no accelerator is found), which this test states by
    skipping with the error; the step it would take is followed above."""
    from torchtitan.config import ConfigManager

    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1").items():
        monkeypatch.setenv(k, v)
    cfg = ConfigManager().parse_args(
        [
            "--module",
            "examples.torchtitan.tofu_llama3",
            "--config",
            "llama3_debugmodel_tofu",
            "--dump_folder",
            str(tmp_path),
        ]
    )
    try:
        trainer = cfg.build()
    except RuntimeError as e:
        if torch.cuda.is_available() or "NVIDIA driver" not in str(e):
            raise
        pytest.skip(
            f"torchtitan's Trainer does not run on CPU (torchtitan/trainer.py sets the CUDA device): {e}"
        )
    trainer.close()
    raise AssertionError("torchtitan's Trainer was built here: test its steps with our loss")
