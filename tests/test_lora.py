"""unlearn.lora: peft adapters in the real DeepSpeed engine (ZeRO 0-2), the merged model saved and evaluated."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_unlearn import PAD, forget_nll, memorised_model, random_split, write_masks

from schemas import read_table
from stages.config import ConfigError, LoraConfig, UnlearnConfig, load_config
from stages.unlearn import METHODS, unlearn
from stages.unlearn.data import collate
from stages.unlearn.distributed import init_distributed
from stages.unlearn.loop import Data, train_method
from stages.unlearn.lora import trainable, with_lora

ADAPTED = ("q_proj", "v_proj")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    init_distributed()
    path = tmp_path_factory.mktemp("lora_tiny") / "model"
    rng = np.random.default_rng(0)
    forget, retain = random_split(rng, "f", 4), random_split(rng, "r", 6)
    memorised_model([forget, retain]).save_pretrained(path)
    return path, Data(forget, retain, None, None, PAD)


def test_only_adapter_parameters_receive_gradients(tiny):
    from transformers import AutoModelForCausalLM

    path, data = tiny
    model = with_lora(AutoModelForCausalLM.from_pretrained(path), LoraConfig(r=4, target_modules=list(ADAPTED)))
    batch = collate(data.forget, np.arange(len(data.forget)), PAD)
    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels()).loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert {id(p) for p in trainable(model)} == {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert sum(p.numel() for p in trainable(model)) < 0.2 * sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_lora_unlearning_saves_a_merged_model_that_changed_only_where_adapted(tiny, tmp_path, stage):
    path, data = tiny
    u = UnlearnConfig(lr=1e-2, epochs=2, batch_size=2, zero_stage=stage, checkpoint_every=0,
                      lora=LoraConfig(r=4, alpha=8, target_modules=list(ADAPTED)))
    train_method(u, METHODS["graddiff"], data, path, tmp_path)
    target, merged = load_file(path / "model.safetensors"), load_file(tmp_path / "graddiff" / "model.safetensors")
    assert set(merged) == set(target)  # a plain model folder: no adapter tensors, nothing missing
    changed = {k for k in target if not torch.equal(target[k], merged[k])}
    assert changed and all(any(m in k for m in ADAPTED) for k in changed)
    assert forget_nll(tmp_path / "graddiff", data.forget) > forget_nll(path, data.forget)


def test_lora_config_keys_and_zero3(micro_cfg):
    cfg = load_config("micro", overrides=["unlearn.lora.r=8", "unlearn.lora.alpha=32",
                                          "unlearn.lora.target_modules=q_proj,v_proj"])
    assert (cfg.unlearn.lora.r, cfg.unlearn.lora.alpha, cfg.unlearn.lora.target_modules) == (8, 32.0,
                                                                                            ["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match="did you mean"):
        load_config("micro", overrides=["unlearn.lora.alpah=8"])
    with pytest.raises(ConfigError, match="ZeRO-3"):
        load_config("micro", overrides=["unlearn.lora.r=8", "unlearn.zero_stage=3"])


def test_lora_on_micro_evaluates_to_finite_metrics(micro_cfg, prepared_micro, trained_micro, tmp_path):
    from stages.evaluate import evaluate

    masks = tmp_path / "masks"
    write_masks(prepared_micro, masks)
    cfg = copy.deepcopy(micro_cfg)
    cfg.unlearn.methods, cfg.unlearn.lr, cfg.unlearn.lora.r = ["su"], 5e-3, 4
    inputs = {"prepare": prepared_micro, "target": trained_micro, "masks": masks}
    unlearn(cfg, inputs, tmp_path / "unlearn")
    evaluate(cfg, {**inputs, "unlearn": tmp_path / "unlearn"}, tmp_path / "evaluate")
    rows = read_table(tmp_path / "evaluate/metrics.parquet").to_pylist()
    values = {(r["model"], r["metric"]): r["value"] for r in rows}
    su = {name: v for (model, name), v in values.items() if model == "su"}
    assert su and all(math.isfinite(v) for name, v in su.items())
    assert su["forget_prob"] != values[("target", "forget_prob")]  # the merged adapters changed the model


def test_lora_snapshots_leave_the_adapters_training(tiny, tmp_path):
    """A snapshot saves a merged copy: the adapters stay, so each later step still moves the weights."""
    path, data = tiny
    u = UnlearnConfig(lr=1e-2, epochs=2, batch_size=2, checkpoint_every=0, snapshot_every=1,
                      lora=LoraConfig(r=4, alpha=8, target_modules=list(ADAPTED)))
    _, stats = train_method(u, METHODS["graddiff"], data, path, tmp_path)
    steps = [*stats["snapshots"], stats["last_step"]]
    folders = [tmp_path / "snapshots" / "graddiff" / f"step-{k}" for k in stats["snapshots"]] + [tmp_path / "graddiff"]
    weights = [load_file(folder / "model.safetensors") for folder in folders]
    assert len(steps) > 2
    for before, after in zip(weights, weights[1:], strict=False):
        assert any(not torch.equal(before[k], after[k]) for k in before)
