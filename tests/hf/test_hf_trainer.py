"""TOFUSFTTrainer and the PEFT path on tiny randomly initialised models (no downloads).

What is held here, on CPU: one backbone forward per micro-batch and no LM head call (the
logits are never built); a short run whose loss falls, with TRL's metrics logged and an
evaluation the same way; TRL's own fused-head metrics equal ours on the same batch; the
loss and every trainable parameter's gradient equal autograd through the float64
reference, with ``num_items_in_batch`` (two micro-batches equal one batch), with LoRA
adapters on the attention and MLP projections (Llama, Qwen3), and through ``apply_tofu``
on a ``PeftModel``; the MoE router loss as TRL adds it; the refusals; the cache argument
under its 5.23 and 5.24 names. QLoRA (4-bit bitsandbytes) needs CUDA: a GPU test.
"""

from __future__ import annotations

import copy

import pytest
import torch

import tofu_kernels as tk

transformers = pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
from tests.support.helpers import assert_params_close  # noqa: E402
from tests.support.hf_models import VOCAB, reference_loss, text_dataset, tiny_model, word_tokenizer  # noqa: E402
from tests.support.spies import GemmFlops  # noqa: E402
from tofu_kernels import hf, patching  # noqa: E402

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _args(tmp_path, **kw):
    """SFTConfig for the tiny runs: fp32 (TRL turns bf16 autocast on by default, on CPU too,
    which the fp64 comparisons below would have to model), no saving, one step."""
    base = dict(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        max_length=16,
        disable_tqdm=True,
        bf16=False,
    )
    return trl.SFTConfig(**{**base, **kw})


def _trainer(model, tmp_path, cls=None, n=16, **kw):
    cls = cls or hf.TOFUSFTTrainer
    extra = {
        k: kw.pop(k)
        for k in list(kw)
        if k.startswith("tofu_") or k in ("peft_config", "compute_metrics")
    }
    return cls(
        model=model,
        args=_args(tmp_path, **kw),
        train_dataset=text_dataset(n),
        eval_dataset=text_dataset(8),
        processing_class=word_tokenizer(),
        **extra,
    )


def _batch(trainer):
    """One training batch as the trainer feeds it (padded, -100 on padding)."""
    return trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))


def _reference(model, batch, num_items=None):
    """fp64 TOFU on the model's own logits (the class forward, full logits)."""
    logits = (
        type(model)
        .forward(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        .logits
    )
    return reference_loss(logits, batch["labels"], num_items)


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _compute_loss_matches_fp64(trainer, base):
    """``trainer.compute_loss`` on one batch with ``num_items_in_batch`` (what Trainer passes):
    the loss and every trainable gradient against autograd through the fp64 reference of
    ``base`` (the causal LM). Returns the batch, its count, the gradients and the loss."""
    model = trainer.model
    batch = _batch(trainer)
    n = (hf.shift_labels(batch["labels"]) != -100).sum()
    model.train()
    model.zero_grad()
    _reference(base, batch, n).backward()
    want = _grads(model)
    assert all(g.abs().sum() > 0 for g in want.values())
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=n)
    loss.backward()
    with torch.no_grad():
        ref = _reference(base, batch, n)
    assert abs(loss.item() - ref.item()) <= 2e-5 * ref.item()
    assert_params_close(
        model, want, rtol=2e-4, atol=1e-6
    )  # the trainable ones (the frozen have none)
    return batch, n, want, ref


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run shared by the tests below: 12 steps of 2 micro-batches, counted."""
    model = tiny_model("qwen3")
    calls = {"backbone": 0, "lm_head loss": 0, "logits": 0}

    def count(key):
        calls[key] += 1

    model.model.register_forward_hook(lambda *_: count("backbone"))
    # lm_head runs once per forward, for the fused loss (its output a tuple), never for logits (a tensor)
    model.lm_head.register_forward_hook(
        lambda m, a, out: count("logits" if torch.is_tensor(out) else "lm_head loss")
    )
    trainer = _trainer(
        model, tmp_path_factory.mktemp("run"), n=32, max_steps=12, gradient_accumulation_steps=2
    )
    trainer.train()
    train_calls = dict(calls)
    metrics = trainer.evaluate()
    eval_calls = {k: calls[k] - train_calls[k] for k in calls}
    return trainer, train_calls, eval_calls, metrics


def test_one_forward_per_step_and_the_loss_falls(trained):
    trainer, train_calls, eval_calls, metrics = trained
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 12
    assert train_calls == {"backbone": 24, "lm_head loss": 24, "logits": 0}, (
        "one forward per micro-batch, no logits"
    )
    losses = [h["loss"] for h in logs]
    assert losses[-1] < 0.85 * losses[0], losses
    for h in logs:  # TRL's metrics, under TRL's names, from our kernels
        assert 0.0 < h["entropy"] < torch.log(torch.tensor(float(VOCAB))).item() + 1e-4
        assert 0.0 <= h["mean_token_accuracy"] <= 1.0 and h["num_tokens"] > 0
    assert logs[-1]["mean_token_accuracy"] > logs[0]["mean_token_accuracy"]
    # evaluation: the same single pass (8 examples, batch 8: one forward), TOFU as eval_loss
    assert eval_calls == {"backbone": 1, "lm_head loss": 1, "logits": 0}
    assert {"eval_loss", "eval_entropy", "eval_mean_token_accuracy"} <= set(metrics)


def test_evaluation_loss_equals_the_reference(trained):
    """After training most targets are confident (p ~ 1 - 1e-3), where fp32 statistics
    cannot resolve log p to fp64's precision (docs/design.md section 6): the bound is the
    loss tolerance or twice what the same reference computed in fp32 misses by."""
    trainer = trained[0]
    model = trainer.model
    model.eval()
    batch = trainer._prepare_inputs(next(iter(trainer.get_eval_dataloader())))
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        logits = (
            type(model)
            .forward(model, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            .logits
        )
        target = hf.shift_labels(batch["labels"])
        ref, ref32 = (
            tk.tofu_loss_reference(logits, target, compute_dtype=dt)[0].sum()
            / (target != -100).sum()
            for dt in (torch.float64, torch.float32)
        )
    assert abs(loss.item() - ref.item()) <= max(
        2e-5 * ref.item(), 2 * abs(ref32.item() - ref.item())
    )


def test_metrics_equal_trls_fused_head(tmp_path, trained):
    """The same batch through TRL's SFTTrainer (its fused LM head) and ours: equal entropy
    and token accuracy to fp32 tolerance, in training and in evaluation mode."""
    model = trained[0].model
    ours = _trainer(copy.deepcopy(model), tmp_path / "ours")
    theirs = _trainer(copy.deepcopy(model), tmp_path / "trl", cls=trl.SFTTrainer)
    batch = _batch(theirs)
    for mode in ("train", "eval"):
        for t in (ours, theirs):
            t.model.train(mode == "train")
            with torch.no_grad():
                t.compute_loss(t.model, dict(batch))
        for key in ("entropy", "mean_token_accuracy"):
            a, b = ours._metrics[mode][key][-1], theirs._metrics[mode][key][-1]
            assert a == pytest.approx(b, rel=1e-5, abs=1e-6), (mode, key, a, b)
    assert (
        ours._metrics["train"]["mean_token_accuracy"][-1] > 0
    )  # the trained model hits some targets


def test_loss_and_gradients_equal_fp64_and_accumulation_equals_one_batch(tmp_path):
    """compute_loss with num_items_in_batch (what Trainer passes): the loss and every
    parameter's gradient equal autograd through the fp64 reference; two micro-batches
    normalised by the whole batch's count give the big batch's gradient."""
    model = tiny_model("llama")
    trainer = _trainer(model, tmp_path, per_device_train_batch_size=6)
    batch, n, want, ref = _compute_loss_matches_fp64(trainer, model)
    model.zero_grad()
    total = 0.0
    for part in (slice(0, 2), slice(2, 6)):
        mb = {k: v[part] for k, v in batch.items()}
        micro = trainer.compute_loss(model, mb, num_items_in_batch=n)
        micro.backward()
        total += micro.item()
    assert abs(total - ref.item()) <= 2e-5 * ref.item()
    assert_params_close(
        model, want, rtol=2e-4, atol=1e-6
    )  # the trainable ones (the frozen have none)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_lora_adapter_gradients_equal_fp64(tmp_path, family):
    """TOFUSFTTrainer(peft_config=LoRA on the attention and MLP projections): the LM head and
    the base weights are frozen; the loss and every adapter parameter's gradient equal
    autograd through the fp64 reference; apply_tofu on the PeftModel itself gives the same."""
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )  # random B: the adapters change the logits
    trainer = _trainer(tiny_model(family), tmp_path, peft_config=config)
    model = trainer.model
    assert isinstance(model, peft.PeftModel)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable), trainable
    base = model.get_base_model()
    assert not base.lm_head.weight.requires_grad
    batch, n, want, ref = _compute_loss_matches_fp64(trainer, base)
    # apply_tofu on the PeftModel: model(..., labels=...).loss through the adapters' forward
    hf.revert_tofu(model)
    hf.apply_tofu(model, fused_linear=True)
    model.zero_grad()
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
        num_items_in_batch=n,
    )
    assert out.logits is None and abs(out.loss.item() - ref.item()) <= 2e-5 * ref.item()
    out.loss.backward()
    assert_params_close(
        model, want, rtol=2e-4, atol=1e-6
    )  # the trainable ones (the frozen have none)
    # the fused-head forward TRL installed, which the trainer's replaced
    trls = patching.original(base, "forward")
    hf.revert_tofu(model)
    assert base.__dict__.get("forward") is trls and getattr(base, "_tofu_loss", None) is None
    assert "forward" not in base.lm_head.__dict__


def test_moe_router_loss_as_trl_adds_it(tmp_path, monkeypatch):
    """A tiny Qwen3-MoE with router logits: the loss is TOFU plus the trainer's
    router_aux_loss_coef times the model's own load-balancing loss, as in TRL."""
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.02,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg).float()
    trainer = _trainer(model, tmp_path)
    assert trainer.aux_loss_enabled
    batch = _batch(trainer)
    model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch))
        own = type(model).forward(
            model,
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_router_logits=True,
        )
        ref = (
            reference_loss(own.logits, batch["labels"])
            + trainer.router_aux_loss_coef * own.aux_loss
        )
    assert abs(loss.item() - ref.item()) <= 2e-5 * ref.item()
    assert trainer._metrics["train"]["aux_loss"][-1] == pytest.approx(own.aux_loss.item(), rel=1e-5)
    # Inside accumulation over 2 micro-batches on 2 processes (TRL's arithmetic): the summed
    # TOFU over num_items_in_batch times the process count, the router loss over the steps.
    n = (hf.shift_labels(batch["labels"]) != -100).sum()
    trainer.current_gradient_accumulation_steps = 2
    monkeypatch.setattr(type(trainer.accelerator), "num_processes", property(lambda self: 2))
    assert trainer.args.average_tokens_across_devices
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=3 * n)
        ref = (
            reference_loss(own.logits, batch["labels"], 3 * n) * 2
            + trainer.router_aux_loss_coef * own.aux_loss / 2
        )
    assert abs(loss.item() - ref.item()) <= 2e-5 * ref.item()


def test_an_accumulated_batch_without_tokens_trains_nothing(tmp_path):
    """num_items_in_batch 0 (every completion truncated away): loss 0, zero gradients, no error."""
    model = tiny_model("llama")
    trainer = _trainer(model, tmp_path)
    batch = _batch(trainer)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    model.train()
    model.zero_grad()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(0))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())
    assert trainer._metrics["train"]["mean_token_accuracy"][-1] == 0.0


def test_bad_settings_are_named_as_the_user_typed_them():
    from tofu_kernels.hf.trainer import trainer_params

    with pytest.raises(
        ValueError, match=r"^TOFUSFTTrainer: tofu_gamma must be a finite number >= 0, got -1.0$"
    ):
        trainer_params(-1.0, None, None)
    with pytest.raises(
        ValueError, match=r"^TOFUSFTTrainer: tofu_beta must be a finite number > 0, got 0$"
    ):
        trainer_params(None, 0, None)


def test_head_flops_scale_with_the_tokens_that_train(tmp_path):
    """The output layer's GEMM FLOPs of a training step (the products with the vocabulary's
    size, which no other tensor of the tiny model has), with 0, 50 and 90 % of the training
    tokens turned into -100: they scale with the tokens that train, to within one chunk."""
    model = tiny_model("llama")
    chunk = 4
    trainer = _trainer(model, tmp_path, tofu_chunk_size=chunk)
    batch = _batch(trainer)
    per_row = (
        3 * 2 * model.config.hidden_size * VOCAB
    )  # the logits, dhidden, dweight (gradient in the forward)
    g = torch.Generator().manual_seed(3)
    for frac in (0.0, 0.5, 0.9):
        labels = batch["labels"].clone()
        trains = (labels != -100).nonzero()
        drop = trains[torch.randperm(len(trains), generator=g)[: int(frac * len(trains))]]
        labels[drop[:, 0], drop[:, 1]] = -100
        kept = int((hf.shift_labels(labels) != -100).sum())
        model.zero_grad()
        with GemmFlops(dim=VOCAB) as f:
            trainer.compute_loss(
                model, {**batch, "labels": labels}, num_items_in_batch=torch.tensor(kept)
            ).backward()
        assert kept * per_row <= f.flops <= (kept + chunk) * per_row, (
            frac,
            kept,
            f.flops / per_row,
        )


def test_refusals_and_fallbacks(tmp_path):
    model = tiny_model("qwen3")
    with pytest.raises(ValueError, match="compute_loss_func"):
        hf.TOFUSFTTrainer(
            model=model,
            args=_args(tmp_path),
            train_dataset=text_dataset(),
            processing_class=word_tokenizer(),
            compute_loss_func=hf.tofu_loss_func(),
        )
    with pytest.raises(ValueError, match="label_smoothing_factor"):
        _trainer(model, tmp_path, label_smoothing_factor=0.1)
    with pytest.raises(ValueError, match="loss_type"):
        _trainer(model, tmp_path, loss_type="dft")
    with pytest.raises(ValueError, match="not both"):
        _trainer(model, tmp_path, tofu_gamma=2.0, tofu_params=tk.TOFUParams())
    with pytest.raises(ValueError, match="gamma"):
        _trainer(model, tmp_path, tofu_gamma=-1.0)
    with pytest.raises(
        ValueError, match="compute_loss_func"
    ):  # positionally, SFTTrainer's 7th argument
        hf.TOFUSFTTrainer(
            model,
            _args(tmp_path),
            None,
            text_dataset(),
            None,
            word_tokenizer(),
            hf.tofu_loss_func(),
        )
    with pytest.raises(ValueError, match="ignore_index must be -100"):
        _trainer(model, tmp_path, tofu_params=tk.TOFUParams(ignore_index=-1))
    with pytest.raises(ValueError, match="^TOFUSFTTrainer: tofu_params must have reduction 'mean'"):
        _trainer(model, tmp_path, tofu_params=tk.TOFUParams(return_metrics=True))
    with pytest.raises(ValueError, match="^apply_tofu: params must have reduction 'mean'"):
        hf.apply_tofu(tiny_model("llama"), params=tk.TOFUParams(reduction="sum"))
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2)
    )
    with pytest.raises(ValueError, match="^TOFUSFTTrainer: GPT2LMHeadModel is not supported"):
        _trainer(gpt2, tmp_path)  # refused before the dataset is prepared
    trainer = _trainer(model, tmp_path)
    batch = {
        k: v for k, v in _batch(trainer).items() if k not in ("attention_mask", "position_ids")
    }
    model.train()
    with pytest.raises(ValueError, match="'attention_mask' or 'position_ids'"):
        trainer.compute_loss(model, batch)
    # compute_metrics needs logits: said once, at construction; evaluation then works
    seen = []
    with pytest.warns(UserWarning, match="compute_metrics"):
        trainer = _trainer(
            model,
            tmp_path,
            compute_metrics=lambda p: seen.append(p.predictions.shape) or {"n": 1.0},
            tofu_params=tk.TOFUParams(gamma=2.0, beta=0.9),
        )
    assert trainer.tofu_params.gamma == 2.0
    metrics = trainer.evaluate()
    assert seen and seen[0][-1] == VOCAB and "eval_n" in metrics and "eval_loss" in metrics


class _Llama524(transformers.LlamaForCausalLM):
    """A causal LM whose forward names its cache ``cache`` (transformers 5.24's spelling)."""

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ):
        self.seen_cache = cache
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            logits_to_keep=logits_to_keep,
            **kwargs,
        )


def test_cache_argument_passes_through_under_either_name():
    """apply_tofu's forward never names the cache itself: the class forward (5.23:
    past_key_values, 5.24: cache) and the backbone get it as the caller spelled it, and
    generate() keeps working."""
    ids = torch.randint(0, VOCAB, (2, 7))
    model = tiny_model("llama")
    model.eval()
    with torch.no_grad():
        want = model.generate(ids, max_new_tokens=4, do_sample=False)
    hf.apply_tofu(model, fused_linear=True)
    with torch.no_grad():
        assert torch.equal(model.generate(ids, max_new_tokens=4, do_sample=False), want)
        cache = transformers.DynamicCache(config=model.config)
        out = model(ids, None, None, cache, use_cache=True)  # positionally, as the class orders it
    assert out.past_key_values is cache and cache.get_seq_length() == 7
    new = _Llama524(model.config)
    new.load_state_dict(model.state_dict())
    hf.apply_tofu(new, fused_linear=True)
    marker = object()
    backbone = []
    new.model.register_forward_pre_hook(
        lambda m, a, k: backbone.append(k.get("cache")), with_kwargs=True
    )
    new.eval()
    with torch.no_grad():
        new(input_ids=ids, cache=marker)  # evaluation: the class forward
    assert new.seen_cache is marker
    new.train()
    new(input_ids=ids, labels=ids, cache=marker).loss.backward()  # training: the backbone, directly
    assert backbone[-1] is marker


@pytest.mark.gpu
def test_gpu_qlora_4bit_trains_and_matches_reference(tmp_path):
    """The paper's setup: QLoRA (bitsandbytes 4-bit base, bf16 compute, LoRA adapters) with
    TOFUSFTTrainer on a tiny Llama saved and reloaded quantized: the loss equals fp64 TOFU on
    the quantized model's own logits, the adapters' gradients equal autograd through it, and a
    few steps train."""
    pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    src = tiny_model("llama")
    src.save_pretrained(tmp_path / "base")
    bnb = transformers.BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16
    )
    model = transformers.LlamaForCausalLM.from_pretrained(
        tmp_path / "base", quantization_config=bnb, dtype=torch.bfloat16, device_map={"": 0}
    )
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        target_modules=LORA_TARGETS,
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    )
    args = _args(tmp_path / "out", use_cpu=False, bf16=True, max_steps=6, learning_rate=1e-3)
    trainer = hf.TOFUSFTTrainer(
        model=model,
        args=args,
        train_dataset=text_dataset(32),
        processing_class=word_tokenizer(),
        peft_config=config,
    )
    peft_model = trainer.model
    batch = _batch(trainer)
    n = (hf.shift_labels(batch["labels"]) != -100).sum()
    peft_model.train()
    peft_model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _reference(peft_model.get_base_model(), batch, n).backward()
    want = _grads(peft_model)
    peft_model.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = trainer.compute_loss(peft_model, dict(batch), num_items_in_batch=n)
        with torch.no_grad():
            ref = _reference(peft_model.get_base_model(), batch, n)
    loss.backward()
    assert abs(loss.item() - ref.item()) <= 1e-2 * ref.item()  # bf16 logits either way
    assert_params_close(peft_model, want, norm_rtol=0.05)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))


def test_metrics_reach_the_host_in_one_sync(tmp_path, monkeypatch):
    """TRL's metrics from one gather and one device-to-host copy per step (TRL's own code
    makes four: three .item() and a tensor comparison), equal to the values TRL's arithmetic
    gives on the same outputs."""
    trainer = _trainer(tiny_model("llama"), tmp_path)
    batch = _batch(trainer)
    trainer.model.train()
    with torch.no_grad():
        outputs = trainer.model(**batch, tofu_metrics=True)
    syncs = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        orig = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _o=orig, _n=name: syncs.append(_n) or _o(self, *a)
        )
    trainer._log_tofu_metrics("train", batch, outputs)
    monkeypatch.undo()
    assert syncs == ["tolist"], syncs
    n = outputs.label_mask.sum()
    m = trainer._metrics["train"]
    assert m["entropy"][-1] == pytest.approx((outputs.entropy.sum() / n).item(), rel=1e-6)
    assert m["mean_token_accuracy"][-1] == pytest.approx((outputs.top1.sum() / n).item(), rel=1e-6)
    assert m["num_tokens"] == [batch["attention_mask"].sum().item()]
