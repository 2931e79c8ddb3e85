"""``tofu_kernels.axolotl.TOFUPlugin`` through Axolotl 0.21.0's own code, on CPU.

What runs Axolotl's code, in a subprocess of its own per part (Axolotl patches transformers
and sets environment variables as it loads a config and a model; no test file after this one
in the same worker should see that):

- the config: ``axolotl.cli.config.load_cfg`` on the example YAML (its base model and data
  set swapped for a tiny local Llama and a local JSON file), the plugin loaded by Axolotl's
  ``PluginManager`` from ``plugins:`` and found through our ``axolotl.plugins`` entry point,
  our keys validated by Axolotl's merged schema (``validate_config``); wrong keys and values
  and each conflicting combination refused with both keys named; a model type outside
  ``SUPPORTED_MODELS`` refused by the ``pre_model_load`` / ``post_model_load`` hooks;
- training (slow): ``axolotl.common.datasets.load_datasets`` and
  ``axolotl.train.setup_model_and_trainer`` (Axolotl's model loader, which calls the plugin's
  hooks, and its trainer builder), then ``trainer.train()`` for two steps: the first step's
  logged loss equals fp64 TOFU of the batch the model saw, full fine-tuning and LoRA; at
  gamma 0, beta 1 the losses and the trained weights equal the run without TOFU (Axolotl's own
  cross entropy).

Axolotl's telemetry is off (``AXOLOTL_DO_NOT_TRACK=1``) and the Hub offline in these runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.checkout import ROOT
from tests.support.side_folders import AXOLOTL, with_side_folder

EXAMPLE = ROOT / "examples" / "axolotl" / "llama_tofu.yaml"
PLUGIN = "tofu_kernels.axolotl.TOFUPlugin"
GAMMA, BETA = 2.0, 0.7  # not the defaults: the values must travel
OFFLINE = {
    "AXOLOTL_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "disabled",
    "OMP_NUM_THREADS": "1",
    "CUDA_VISIBLE_DEVICES": "",
}


def _run_part(part: str, tmp_path: Path) -> dict:
    """Run ``part`` of this file in a fresh interpreter with Axolotl's side folder on its path;
    its results, as JSON."""
    env = with_side_folder(AXOLOTL, {**os.environ, **OFFLINE})
    env["PYTHONPATH"] = os.pathsep.join([env["PYTHONPATH"], str(ROOT)])
    out = subprocess.run(
        [sys.executable, "-m", "tests.hf.test_axolotl", part, str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    return json.loads((tmp_path / f"{part}.json").read_text())


# ----------------------------------------------------------------- what the subprocesses run


def _tiny_checkpoints(tmp: Path) -> tuple[Path, Path, Path]:
    """A tiny Llama with a word tokenizer, a tiny GPT-2 (a model type TOFU refuses), a JSON
    lines data set over the tokenizer's words."""
    import transformers

    from tests.support.hf_models import text_dataset, tiny_model, word_tokenizer

    llama, gpt2, data = tmp / "llama", tmp / "gpt2", tmp / "data.jsonl"
    tiny_model("llama").save_pretrained(llama)
    word_tokenizer().save_pretrained(llama)
    transformers.GPT2LMHeadModel(
        transformers.GPT2Config(
            vocab_size=97, n_embd=16, n_layer=1, n_head=2, bos_token_id=95, eos_token_id=95
        )
    ).save_pretrained(gpt2)
    word_tokenizer().save_pretrained(gpt2)
    text_dataset(16).to_json(data)
    return llama, gpt2, data


def _base_cfg(tmp: Path, model: Path, data: Path, **extra) -> dict:
    """A complete small SFT config: the tiny model, the local data, CPU and fp32."""
    return {
        **dict(
            base_model=str(model),
            datasets=[dict(path=str(data), ds_type="json", type="completion")],
            sequence_len=16,
            micro_batch_size=2,
            gradient_accumulation_steps=1,
            max_steps=2,
            num_epochs=1,
            learning_rate=0.05,
            optimizer="sgd",
            lr_scheduler="constant",
            output_dir=str(tmp / "out"),
            dataset_prepared_path=str(tmp / "prepared"),
            val_set_size=0.0,
            save_strategy="no",
            dataset_num_proc=1,
            bf16=False,
            fp32=True,
            seed=7,
            logging_steps=1,
        ),
        **extra,
    }


TOFU = dict(plugins=[PLUGIN], tofu_loss=True, tofu_gamma=GAMMA, tofu_beta=BETA)

# name -> keys on top of the base config (with the plugin listed unless the name says not)
ERROR_CASES = {
    "misspelt_key": dict(TOFU, tofu_gama=1.0),
    "misspelt_key_entry_point_only": dict(tofu_loss=True, tofu_gama=1.0),
    "gamma_negative": dict(TOFU, tofu_gamma=-1.0),
    "beta_zero": dict(TOFU, tofu_beta=0.0),
    "beta_not_a_number": dict(TOFU, tofu_beta="hot"),
    "chunk_size_zero": dict(TOFU, tofu_chunk_size=0),
    "keys_without_tofu_loss": dict(plugins=[PLUGIN], tofu_gamma=GAMMA),
    "cut_cross_entropy": dict(TOFU, cut_cross_entropy=True, bf16=True, fp32=False),
    "liger_fused_linear_cross_entropy": dict(TOFU, liger_fused_linear_cross_entropy=True),
    "liger_cross_entropy": dict(TOFU, liger_cross_entropy=True),
    "chunked_cross_entropy": dict(TOFU, chunked_cross_entropy=True),
    "use_eaft": dict(TOFU, use_eaft=True),
    "use_dft": dict(TOFU, use_dft=True),
    "label_smoothing_factor": dict(TOFU, label_smoothing_factor=0.1),
    "rl": dict(TOFU, rl="dpo"),
}


def _config_part(tmp: Path) -> dict:
    import yaml
    from axolotl.cli.config import load_cfg
    from axolotl.integrations.base import PluginManager, get_builtin_plugins
    from axolotl.utils.config import prepare_plugins, validate_config
    from axolotl.utils.dict import DictDefault

    import tofu_kernels.axolotl as ta

    llama, gpt2, data = _tiny_checkpoints(tmp)
    res = {"builtin": list(get_builtin_plugins())}

    # the example file, as a user's YAML, through Axolotl's loader
    raw = yaml.safe_load(EXAMPLE.read_text())
    raw.update(
        {
            k: v
            for k, v in _base_cfg(tmp, llama, data).items()
            if k in ("base_model", "datasets", "output_dir")
        }
    )
    raw.update(tofu_gamma=GAMMA, tofu_beta=BETA, bf16=False, fp32=True, tofu_chunk_size=64)
    (tmp / "example.yml").write_text(yaml.safe_dump(raw))
    cfg = load_cfg(str(tmp / "example.yml"))
    manager = PluginManager.get_instance()
    res["example"] = {k: cfg[k] for k in ta.FIELDS} | {
        "model_config_type": cfg.model_config_type,
        "adapter": cfg.adapter,
        "registered": [
            type(p).__module__ + "." + type(p).__name__ for p in manager.plugins.values()
        ],
        "input_args": manager.get_input_args(),
    }
    # without the plugin's keys, the defaults (tofu_loss off)
    cfg = DictDefault(_base_cfg(tmp, llama, data, plugins=[PLUGIN]))
    prepare_plugins(cfg)
    res["defaults"] = {k: validate_config(cfg).get(k) for k in ta.FIELDS}

    res["errors"] = {}
    for name, extra in ERROR_CASES.items():
        cfg = DictDefault(_base_cfg(tmp, llama, data, **extra))
        prepare_plugins(cfg)
        try:
            validate_config(cfg)
            res["errors"][name] = None
        except Exception as e:  # what Axolotl raises (pydantic's ValidationError, ValueError)
            res["errors"][name] = f"{type(e).__name__}: {e}"

    # a model type outside SUPPORTED_MODELS: the hooks Axolotl calls before and after loading
    import transformers

    cfg = load_cfg(DictDefault(_base_cfg(tmp, gpt2, data, **TOFU)))
    res["gpt2_type"] = cfg.model_config_type
    for hook, call in (
        ("pre_model_load", lambda: manager.pre_model_load(cfg)),
        (
            "post_model_load",
            lambda: manager.post_model_load(
                cfg, transformers.AutoModelForCausalLM.from_pretrained(gpt2)
            ),
        ),
    ):
        try:
            call()
            res[hook] = None
        except ValueError as e:
            res[hook] = str(e)

    # post_trainer_create refuses a trainer that would not read the model's loss
    class _Args:
        label_smoothing_factor = 0.0

    class _Trainer:
        compute_loss_func, args = None, _Args()

    res["trainer_checks"] = {}
    for name, change in (
        ("ok", {}),
        ("compute_loss_func", {"compute_loss_func": print}),
        ("label_smoothing_factor", {"args": type("A", (), {"label_smoothing_factor": 0.1})()}),
    ):
        trainer = _Trainer()
        for k, v in change.items():
            setattr(trainer, k, v)
        try:
            ta.TOFUPlugin().post_trainer_create(DictDefault(tofu_loss=True), trainer)
            res["trainer_checks"][name] = None
        except ValueError as e:
            res["trainer_checks"][name] = str(e)
    return res


def _train_run(tmp: Path, name: str, **extra) -> dict:
    """Axolotl's data loading, model loader and trainer builder on the tiny model, two steps;
    the first batch the model saw, the logged losses, the trained weights."""
    import torch
    from axolotl.cli.args import TrainerCliArgs
    from axolotl.cli.config import load_cfg
    from axolotl.common.datasets import load_datasets
    from axolotl.integrations.base import PluginManager
    from axolotl.train import setup_model_and_trainer
    from axolotl.utils.dict import DictDefault

    llama, data = tmp / "llama", tmp / "data.jsonl"
    PluginManager._instance = (
        None  # each run registers its own plugins, as a fresh `axolotl train` does
    )
    cfg = load_cfg(DictDefault(_base_cfg(tmp / name, llama, data, **extra)))
    meta = load_datasets(cfg=cfg, cli_args=TrainerCliArgs())
    trainer, model, *_ = setup_model_and_trainer(cfg, meta)
    seen = []
    model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(
            {k: kw[k].clone() for k in ("input_ids", "labels") if k in kw}
        ),
        with_kwargs=True,
    )
    trainer.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    torch.save(
        {"batch": seen[0], "weights": {k: v.detach().clone() for k, v in model.named_parameters()}},
        tmp / f"{name}.pt",
    )
    return {
        "trainer": type(trainer).__name__,
        "model": type(model).__name__,
        "tofu": getattr(base, "_tofu_loss", None) is not None,
        "params": None
        if getattr(base, "_tofu_loss", None) is None
        else [base._tofu_loss.params.gamma, base._tofu_loss.params.beta],
        "steps": trainer.state.global_step,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
    }


def _train_part(tmp: Path) -> dict:
    _tiny_checkpoints(tmp)
    # Axolotl turns its own LoRA kernels on by default; they allocate on CUDA
    lora = dict(
        adapter="lora",
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_linear=True,
        lora_mlp_kernel=False,
        lora_qkv_kernel=False,
        lora_o_kernel=False,
        lora_embedding_kernel=False,
    )
    return {
        "tofu": _train_run(tmp, "tofu", **TOFU),
        "tofu_lora": _train_run(tmp, "tofu_lora", **TOFU, **lora),
        "ce_mode": _train_run(
            tmp, "ce_mode", plugins=[PLUGIN], tofu_loss=True, tofu_gamma=0.0, tofu_beta=1.0
        ),
        "axolotl_ce": _train_run(tmp, "axolotl_ce"),
    }


if __name__ == "__main__":
    part, where = sys.argv[1], Path(sys.argv[2])
    result = {"config": _config_part, "train": _train_part}[part](where)
    (where / f"{part}.json").write_text(json.dumps(result))
    sys.exit(0)


# ----------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def config_results(tmp_path_factory):
    """Axolotl's config code in one subprocess (about 10 s: importing Axolotl is most of it),
    shared by the tests marked slow below."""
    return _run_part("config", tmp_path_factory.mktemp("axolotl_config"))


@pytest.mark.slow
def test_example_yaml_loads_through_axolotls_config_with_the_plugin(config_results):
    ex = config_results["example"]
    assert PLUGIN in ex["registered"] and "tofu_kernels.axolotl.TOFUArgs" in ex["input_args"]
    assert (
        ex["tofu_loss"],
        ex["tofu_gamma"],
        ex["tofu_beta"],
        ex["tofu_fused_linear"],
        ex["tofu_chunk_size"],
    ) == (True, GAMMA, BETA, True, 64)
    assert ex["model_config_type"] == "llama" and ex["adapter"] == "lora"
    assert config_results["defaults"] == {
        "tofu_loss": None,
        "tofu_gamma": 3.0,
        "tofu_beta": 0.8,
        "tofu_fused_linear": True,
        "tofu_chunk_size": None,
    }


@pytest.mark.slow
def test_the_entry_point_registers_the_plugin(config_results):
    """Axolotl's registry of installed plugins (the ``axolotl.plugins`` entry points) holds ours."""
    assert PLUGIN in config_results["builtin"]
    assert 'tofu = "tofu_kernels.axolotl:TOFUPlugin"' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_wrong_keys_and_conflicts_are_refused_naming_both_keys(config_results, name):
    err = config_results["errors"][name]
    assert err is not None, f"{name}: Axolotl's validation accepted {ERROR_CASES[name]}"
    want = {
        "misspelt_key": ["tofu_gama", "tofu_gamma"],
        "misspelt_key_entry_point_only": ["tofu_gama"],
        "gamma_negative": ["tofu_gamma", ">= 0"],
        "beta_zero": ["tofu_beta", "> 0"],
        "beta_not_a_number": ["tofu_beta"],
        "chunk_size_zero": ["tofu_chunk_size"],
        "keys_without_tofu_loss": ["tofu_gamma", "tofu_loss"],
    }.get(name, ["tofu_loss", name])
    for key in want:
        assert key in err, (name, key, err)


@pytest.mark.slow
def test_unsupported_model_type_is_refused_by_the_model_hooks(config_results):
    assert config_results["gpt2_type"] == "gpt2"
    for hook in ("pre_model_load", "post_model_load"):
        err = config_results[hook]
        assert err is not None and "tofu_loss" in err and "base_model" in err, (hook, err)
    assert (
        "gpt2" in config_results["pre_model_load"]
        and "GPT2LMHeadModel" in config_results["post_model_load"]
    )
    checks = config_results["trainer_checks"]
    assert checks["ok"] is None
    assert (
        "compute_loss_func" in checks["compute_loss_func"]
        and "tofu_loss" in checks["compute_loss_func"]
    )
    assert "label_smoothing_factor" in checks["label_smoothing_factor"]


def test_supported_model_types_are_the_hf_entry_points():
    """The plugin's model types map onto tofu_kernels.hf.SUPPORTED_MODELS, one to one."""
    pytest.importorskip("transformers")
    import ast

    from tofu_kernels.hf import SUPPORTED_MODELS

    tree = ast.parse((ROOT / "tofu_kernels" / "axolotl.py").read_text())
    types = next(
        ast.literal_eval(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "MODEL_TYPES"
    )
    assert sorted(types.values()) == sorted(SUPPORTED_MODELS)


@pytest.fixture(scope="module")
def train_results(tmp_path_factory):
    where = tmp_path_factory.mktemp("axolotl_train")
    return where, _run_part("train", where)


def _fp64_first_loss(where: Path, run: str, gamma: float, beta: float) -> float:
    """fp64 TOFU of the first batch the run's model saw, on the initial weights (the saved
    checkpoint: LoRA's adapters start at zero), normalised as the Trainer does (one
    micro-batch a step: the batch's token count)."""
    import torch
    import transformers

    import tofu_kernels as tk
    from tofu_kernels.hf import shift_labels

    batch = torch.load(where / f"{run}.pt")["batch"]
    model = transformers.AutoModelForCausalLM.from_pretrained(where / "llama", dtype=torch.float64)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits
    target = shift_labels(batch["labels"])
    per_token, _ = tk.tofu_loss_reference(logits, target, gamma=gamma, beta=beta)
    return float(per_token.sum() / (target != -100).sum())


@pytest.mark.slow
@pytest.mark.parametrize("run", ["tofu", "tofu_lora"])
def test_axolotls_trainer_trains_tofu_equal_to_fp64(train_results, run):
    where, res = train_results
    r = res[run]
    assert (
        r["trainer"] == "AxolotlTrainer"
        and r["tofu"]
        and r["params"] == [GAMMA, BETA]
        and r["steps"] == 2
    )
    assert r["model"] == ("PeftModelForCausalLM" if run == "tofu_lora" else "LlamaForCausalLM")
    assert len(r["losses"]) == 2
    assert r["losses"][0] == pytest.approx(_fp64_first_loss(where, run, GAMMA, BETA), rel=1e-5)


@pytest.mark.slow
def test_ce_mode_equals_axolotls_own_cross_entropy(train_results):
    """gamma 0, beta 1 through the plugin = Axolotl's run without it: both logged losses and
    every trained weight (two SGD steps)."""
    import torch

    where, res = train_results
    ours, theirs = res["ce_mode"], res["axolotl_ce"]
    assert ours["tofu"] and not theirs["tofu"] and ours["params"] == [0.0, 1.0]
    assert ours["losses"] == pytest.approx(theirs["losses"], rel=1e-5)
    assert ours["losses"][0] == pytest.approx(
        _fp64_first_loss(where, "ce_mode", 0.0, 1.0), rel=1e-5
    )
    a, b = (
        torch.load(where / "ce_mode.pt")["weights"],
        torch.load(where / "axolotl_ce.pt")["weights"],
    )
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)
