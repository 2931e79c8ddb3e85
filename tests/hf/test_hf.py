"""Hugging Face entry points on tiny randomly initialised models (no downloads).

Oracle: the float64 reference on the model's own logits after the authors' label shift;
the authors' formulation as a second oracle where it is finite. Parameter gradients are
compared with autograd through that reference.
"""

from __future__ import annotations

import pytest
import torch

import tofu_kernels as tk

transformers = pytest.importorskip("transformers")
from tests.support.helpers import assert_params_close  # noqa: E402
from tests.support.hf_models import (  # noqa: E402
    FAMILIES,
    VOCAB,
    reference_loss,
    text_dataset,
    tiny_model,
    word_tokenizer,
)
from tofu_kernels import hf, patching  # noqa: E402


def _batch(b=2, t=11, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, t), generator=g)
    labels = ids.clone()
    labels[0, :3] = -100  # a prompt
    labels[1, -2:] = -100  # padding
    return ids, labels


def _reference_grads(model, ids, labels, num_items=None):
    model.zero_grad()
    reference_loss(model(input_ids=ids).logits, labels, num_items).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return grads


def test_shift_labels():
    labels = torch.tensor([[5, 6, 7], [-100, 1, 2]])
    assert hf.shift_labels(labels).tolist() == [[6, 7, -100], [1, 2, -100]]


@pytest.mark.parametrize("num_items", [None, 13])
def test_loss_func_matches_reference_and_authors(num_items):
    model = tiny_model("llama")
    ids, labels = _batch()
    logits = model(input_ids=ids).logits.detach().requires_grad_()
    fn = hf.tofu_loss_func(3.0, 0.8)
    outputs = transformers.modeling_outputs.CausalLMOutputWithPast(logits=logits)
    ni = None if num_items is None else torch.tensor(num_items)
    loss = fn(outputs, labels, num_items_in_batch=ni)
    loss.backward()
    x = logits.detach().double().requires_grad_()
    ref = reference_loss(x, labels, num_items)
    ref.backward()
    assert abs(loss.item() - ref.item()) <= 1e-5 * abs(ref.item())
    torch.testing.assert_close(logits.grad.double(), x.grad, rtol=1e-4, atol=1e-9)
    # the authors' code (finite here): the same number
    target = hf.shift_labels(labels)
    authors = tk.authors_tofu_loss(logits.detach(), target, 3.0, 0.8).sum()
    authors = authors / ((target != -100).sum() if num_items is None else num_items)
    assert abs(loss.item() - authors.item()) <= 1e-5 * abs(authors.item())
    # a dict works too, and bf16 logits are used as they are (no fp32 copy is made)
    assert fn({"logits": logits.detach()}, labels, num_items_in_batch=ni).item() == pytest.approx(
        loss.item()
    )


def test_two_micro_batches_equal_one_batch():
    model = tiny_model("qwen2")
    ids, labels = _batch(b=4, t=9)
    fn = hf.tofu_loss_func(2.0, 0.9)
    whole = fn(model(input_ids=ids), labels)
    whole.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = (hf.shift_labels(labels) != -100).sum()
    parts = [
        fn(model(input_ids=ids[s]), labels[s], num_items_in_batch=total)
        for s in (slice(0, 1), slice(1, 4))
    ]
    for p in parts:
        p.backward()
    assert abs(sum(p.item() for p in parts) - whole.item()) <= 1e-5 * whole.item()
    assert_params_close(model, want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("fused_linear", [False, True])
def test_apply_tofu_loss_and_gradients(family, fused_linear):
    model = tiny_model(family)
    ids, labels = _batch()
    want = _reference_grads(model, ids, labels)
    with torch.no_grad():
        ref = reference_loss(model(input_ids=ids).logits, labels)
    hf.apply_tofu(model, 3.0, 0.8, fused_linear=fused_linear, chunk_size=5)
    out = model(input_ids=ids, labels=labels)
    assert (out.logits is None) == fused_linear
    assert abs(out.loss.item() - ref.item()) <= 1e-5 * ref.item()
    out.loss.backward()
    assert_params_close(model, want, rtol=2e-4, atol=1e-6)
    # gradient accumulation the transformers way: num_items_in_batch through the forward
    model.zero_grad()
    total = (hf.shift_labels(labels) != -100).sum()
    for s in (slice(0, 1), slice(1, 2)):
        model(input_ids=ids[s], labels=labels[s], num_items_in_batch=total).loss.backward()
    assert_params_close(model, want, rtol=2e-4, atol=1e-6)
    # evaluation keeps the logits (and the TOFU loss); return_dict=False gives a tuple
    model.eval()
    with torch.no_grad():
        ev = model(input_ids=ids, labels=labels)
        assert ev.logits is not None and abs(ev.loss.item() - ref.item()) <= 1e-5 * ref.item()
    model.train()
    tup = model(input_ids=ids, labels=labels, return_dict=False)
    assert isinstance(tup, tuple) and abs(tup[0].item() - ref.item()) <= 1e-5 * ref.item()
    # revert: the model's own cross entropy again
    hf.revert_tofu(model)
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
        ce = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, VOCAB), hf.shift_labels(labels).reshape(-1)
        )
    assert out.logits is not None and abs(out.loss.item() - ce.item()) <= 1e-6 * ce.item()
    assert "forward" not in model.__dict__ and "_loss_function" not in model.__dict__


class _ScaledHead(torch.nn.Linear):
    """An LM head with a forward of its own (its logits are not x @ W.T)."""

    def forward(self, x):
        return 2.0 * super().forward(x)


def test_apply_under_hooks_and_wrappers_and_revert():
    """apply_tofu(fused_linear=True) on heads and models that carry other code's forwards:
    an accelerate hook on lm_head (added before or after: it keeps running, revert leaves it
    in place), a wrapper installed over our forward (after revert it runs the class forward),
    a head subclass with its own forward (refused), pickling, and lm_head's plain forward."""
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Count(ModelHook):
        calls = 0

        def pre_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return args, kwargs

    ids, labels = _batch()
    model = tiny_model("llama")
    with torch.no_grad():
        want = model(input_ids=ids).logits
    add_hook_to_module(model.lm_head, Count())  # before apply_tofu (a device_map's dispatch)
    hf.apply_tofu(model, fused_linear=True)
    assert (
        model(input_ids=ids, labels=labels).logits is None and Count.calls == 1
    )  # the loss ran through the hook
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want) and Count.calls == 2
    hf.revert_tofu(model)
    remove_hook_from_module(model.lm_head)
    x = torch.randn(3, 32)
    assert not patching.replaced(model.lm_head)
    assert torch.equal(model.lm_head(x), torch.nn.functional.linear(x, model.lm_head.weight))
    model.train()
    hf.apply_tofu(model, fused_linear=True)
    add_hook_to_module(model.lm_head, Count())  # after apply_tofu: ours is what the hook calls
    model(input_ids=ids, labels=labels).loss.backward()
    assert Count.calls == 3
    hf.revert_tofu(model)
    assert model.lm_head._hf_hook is not None
    model.eval()
    with torch.no_grad():
        assert (
            torch.equal(model(input_ids=ids).logits, want) and Count.calls == 4
        )  # the hook still runs
    remove_hook_from_module(model.lm_head)
    # a wrapper over our forward (accelerate's autocast at prepare time), then revert: the class forward
    model = tiny_model("llama")
    hf.apply_tofu(model, fused_linear=True)
    inner = model.forward
    model.forward = lambda *a, **k: inner(*a, **k)
    hf.apply_tofu(
        model, 2.0, 0.9, fused_linear=True
    )  # again: only the settings change, the wrapper stays
    assert model._tofu_loss.params.gamma == 2.0 and patching.replaced(model.lm_head)
    model.train()
    assert model(input_ids=ids, labels=labels).logits is None
    hf.revert_tofu(model)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)
    # pickling an applied model (torch.save(model)), and a head with its own forward
    import pickle

    model = hf.apply_tofu(tiny_model("llama"), fused_linear=True)
    assert pickle.loads(pickle.dumps(model))._tofu_loss.params == model._tofu_loss.params
    head = _ScaledHead(32, VOCAB, bias=False)
    model.lm_head = head
    with pytest.raises(ValueError, match="forward of its own"):
        hf.apply_tofu(model, fused_linear=True)


def test_apply_twice_replaces_and_unsupported_models_are_refused():
    model = tiny_model("mistral")
    ids, labels = _batch()
    hf.apply_tofu(model, 3.0, 0.8, fused_linear=True)
    hf.apply_tofu(model, 0.0, 1.0)  # CE mode, not fused: replaces the first settings
    assert "forward" not in model.__dict__
    out = model(input_ids=ids, labels=labels)
    ce = torch.nn.functional.cross_entropy(
        out.logits.reshape(-1, VOCAB), hf.shift_labels(labels).reshape(-1)
    )
    assert abs(out.loss.item() - ce.item()) <= 1e-5 * ce.item()
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)
    )
    with pytest.raises(ValueError, match="GPT2LMHeadModel is not supported.*LlamaForCausalLM"):
        hf.apply_tofu(gpt2)
    with pytest.raises(
        ValueError, match="^apply_tofu: gamma must be"
    ):  # the function the user called
        hf.apply_tofu(model, gamma=-1.0)
    with pytest.raises(ValueError, match="^tofu_loss_func: beta must be"):
        hf.tofu_loss_func(beta=0.0)
    with pytest.raises(ValueError, match="logits is None"):
        hf.tofu_loss_func()({"logits": None}, labels)


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_trl_sft_trainer_trains_with_our_loss_func(tmp_path):
    trl = pytest.importorskip("trl")
    model = tiny_model("qwen3")
    calls = []
    fn = hf.tofu_loss_func(3.0, 0.8)

    def counted(outputs, labels, num_items_in_batch=None):
        calls.append(num_items_in_batch)
        return fn(outputs, labels, num_items_in_batch=num_items_in_batch)

    args = trl.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=10,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=16,
        disable_tqdm=True,
    )
    with pytest.warns(
        FutureWarning, match="compute_loss_func"
    ):  # TRL 1.16 deprecates it; it still works
        trainer = trl.SFTTrainer(
            model=model,
            args=args,
            train_dataset=text_dataset(),
            processing_class=word_tokenizer(),
            compute_loss_func=counted,
        )
    trainer.train()
    losses = _losses(trainer)
    assert len(losses) == 10 and len(calls) == 20
    assert all(c is not None for c in calls), "the trainer passes num_items_in_batch"
    assert losses[-1] < 0.85 * losses[0], losses


def test_trainer_with_apply_tofu_fused_linear(tmp_path, monkeypatch):
    fused_calls = []

    real = hf.forward.loss_of_hidden

    def counted(*a, **k):
        fused_calls.append(k["normalizer"])
        return real(*a, **k)

    monkeypatch.setattr(hf.forward, "loss_of_hidden", counted)
    model = tiny_model("llama")
    hf.apply_tofu(model, 3.0, 0.8, fused_linear=True)
    tok = word_tokenizer()
    ds = text_dataset().map(lambda r: tok(r["text"]), remove_columns=["text"])
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)
    seen = []
    hook = model.model.register_forward_hook(lambda m, i, o: seen.append(o.last_hidden_state.shape))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=8,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=ds, data_collator=collator)
    trainer.train()
    hook.remove()
    losses = _losses(trainer)
    assert len(losses) == 8 and losses[-1] < 0.85 * losses[0], losses
    assert len(seen) == 16  # our forward ran the backbone once per micro-batch
    assert len(fused_calls) == 16 and all(
        c is not None for c in fused_calls
    )  # fused, with num_items_in_batch
