"""Target: tiny Llama target and retain models trained from scratch; a named model copied as is."""

from __future__ import annotations

import polars as pl
import pytest
from transformers import AutoModelForCausalLM

from schemas import read_table
from stages.common import load_documents, load_tokenizer, seed_everything
from stages.config import ConfigError, load_config
from stages.prepare import prepare
from stages.target import MODEL_SPLITS, batch_tensors, build_model, teacher_forced, train_target


def _answer_loss(model, prepared, splits, tokenizer) -> float:
    ids, labels, lengths = batch_tensors(load_documents(prepared, splits), tokenizer.pad_token_id)
    return teacher_forced(model, ids, labels, lengths, 64, "cpu")["answer_loss"]


@pytest.mark.parametrize("name", ["target", "retain"])
def test_trained_models_load_and_beat_their_initialisation(trained_micro, prepared_micro, micro_cfg, name):
    tokenizer = load_tokenizer(prepared_micro)
    model = AutoModelForCausalLM.from_pretrained(trained_micro / name)
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.num_hidden_layers == micro_cfg.target.num_layers
    seed_everything(micro_cfg.target.seed)
    untrained = build_model(micro_cfg.target, tokenizer)
    splits = MODEL_SPLITS[name]
    assert (
        _answer_loss(model, prepared_micro, splits, tokenizer)
        < _answer_loss(untrained, prepared_micro, splits, tokenizer) - 0.1
    )


def test_train_log_has_both_models_and_loss_falls(trained_micro, micro_cfg):
    log = pl.from_arrow(read_table(trained_micro / "train_log.parquet"))
    assert set(log["model"]) == {"target", "retain"}
    per_epoch = log.filter(pl.col("model") == "target").group_by("epoch").agg(pl.col("loss").mean()).sort("epoch")
    assert per_epoch.height == micro_cfg.target.epochs
    assert per_epoch["loss"][-1] < per_epoch["loss"][0]


def test_retain_model_never_saw_the_forget_set(prepared_micro, tmp_path):
    """Trained until they fit: the target knows its forget answers far better than the retain model does, and the
    retain model knows its own retain answers far better than those forget answers."""
    from stages.common import load_model
    from stages.scoring import score_sequences

    cfg = load_config("micro", overrides=["target.epochs=40"])
    trained_micro = tmp_path / "target"
    train_target(cfg, {"prepare": prepared_micro}, trained_micro)
    docs = load_documents(prepared_micro).to_pylist()
    pad = load_tokenizer(prepared_micro).pad_token_id

    def nll(model_name: str, split: str) -> float:
        encoded = [(r["input_ids"], r["answer_start"]) for r in docs if r["split"] == split]
        scores = score_sequences(load_model(trained_micro / model_name).eval(), encoded, pad, 16)
        return float(scores.nll_sum.sum() / scores.n_tokens.sum())

    assert "forget" in MODEL_SPLITS["target"] and "forget" not in MODEL_SPLITS["retain"]
    assert nll("retain", "forget") > nll("target", "forget") + 0.5
    assert nll("retain", "retain") < nll("retain", "forget") - 0.5


def test_named_model_is_copied_and_retain_is_optional(trained_micro, tmp_path):
    cfg = load_config("micro", overrides=[f"model.name={trained_micro / 'target'}"])
    prepare(cfg, {}, tmp_path / "prepare")
    stats = train_target(cfg, {"prepare": tmp_path / "prepare"}, tmp_path / "no_retain")
    assert stats["retain"] is None and not (tmp_path / "no_retain/retain").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "no_retain/target")
    cfg.model.retain_name = str(trained_micro / "retain")
    stats = train_target(cfg, {"prepare": tmp_path / "prepare"}, tmp_path / "with_retain")
    assert stats["retain"]["parameters"] == stats["target"]["parameters"]
    AutoModelForCausalLM.from_pretrained(tmp_path / "with_retain/retain")


def test_missing_retain_path_is_a_config_error(trained_micro, prepared_micro, tmp_path):
    overrides = [f"model.name={trained_micro / 'target'}", "model.retain_name=./missing-retain"]
    cfg = load_config("micro", overrides=overrides)
    with pytest.raises(ConfigError, match="model.retain_name path ./missing-retain does not exist"):
        train_target(cfg, {"prepare": prepared_micro}, tmp_path / "out")
