"""Resumable unlearning: checkpoints in the cache's scratch folder, a resumed run's weights, early stopping."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
from safetensors.torch import load_file

from stages.common import load_documents, load_model, load_tokenizer
from stages.config import Config
from stages.scoring import score_answers
from stages.unlearn import METHODS
from stages.unlearn import loop as unlearn_loop
from stages.unlearn.data import load_split
from stages.unlearn.distributed import init_distributed
from stages.unlearn.loop import TARGET_DIR, Data, train_method


class Killed(Exception):
    """Stands in for SIGKILL inside the loop (the pipeline test in test_faults.py sends a real one)."""


@pytest.fixture(scope="module")
def micro_data(micro_cfg: Config, prepared_micro: Path, trained_micro: Path) -> tuple[Data, Path]:
    init_distributed()
    documents = load_documents(prepared_micro)
    forget, retain = load_split(documents, "forget"), load_split(documents, "retain")
    pad = load_tokenizer(prepared_micro).pad_token_id
    return Data(forget, retain, None, None, pad), trained_micro / TARGET_DIR


def _unlearn_cfg(micro_cfg: Config, **changes):
    # 12 forget rows, batch 4: 3 steps an epoch, 6 in all; a higher lr so that the weights move visibly
    return dataclasses.replace(micro_cfg.unlearn, epochs=2, lr=2e-3, checkpoint_every=2, **changes)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_killed_unlearn_resumes_to_the_same_weights(micro_cfg, micro_data, tmp_path, monkeypatch):
    data, target = micro_data
    u, spec = _unlearn_cfg(micro_cfg), METHODS["graddiff"]
    full_rows, _ = train_method(u, spec, data, target, tmp_path / "full")

    scratch = tmp_path / "scratch"
    check = unlearn_loop.check_divergence

    def die_at_step_4(method, step, *values):
        if step == 4:  # after the checkpoint of step 2 and one more step that is lost
            raise Killed
        check(method, step, *values)

    monkeypatch.setattr(unlearn_loop, "check_divergence", die_at_step_4)
    with pytest.raises(Killed):
        train_method(u, spec, data, target, tmp_path / "killed", scratch)
    assert (scratch / "graddiff" / "latest").read_text() == "step2"
    assert [p.name for p in (scratch / "graddiff").glob("step*")] == ["step2"]
    monkeypatch.setattr(unlearn_loop, "check_divergence", check)

    rows, stats = train_method(u, spec, data, target, tmp_path / "resumed", scratch)
    assert stats["resumed_from_step"] == 2
    assert [r["step"] for r in rows] == list(range(1, 7))
    for key in ("loss", "forget_loss", "retain_loss"):
        np.testing.assert_allclose([r[key] for r in rows], [r[key] for r in full_rows], rtol=0, atol=1e-6)
    full, resumed = _weights(tmp_path / "full" / "graddiff"), _weights(tmp_path / "resumed" / "graddiff")
    start = _weights(target)
    moved = max((full[k] - start[k]).abs().max().item() for k in full)
    diff = max((full[k] - resumed[k]).abs().max().item() for k in full)
    print(f"resume: max |w_full - w_resumed| = {diff:.3g}; weights moved up to {moved:.3g} during unlearning")
    # The checkpoint restores fp32 weights and AdamW moments bit for bit and the plan is a pure function of the seed,
    # so on CPU the remaining steps repeat the same float operations in the same order: the difference is exactly 0.
    # 1e-6 leaves room only for a reduction order that differs between runs (other BLAS builds, GPUs), far below
    # the size of one step's update (`moved` is ~1e-2 here).
    assert diff <= 1e-6 < moved

    # the finished method is kept in the scratch folder: a second kill (in a later method) reuses it whole
    again_rows, again = train_method(u, spec, data, target, tmp_path / "again", scratch)
    assert again["reused"] and again_rows == rows
    assert _weights(tmp_path / "again" / "graddiff").keys() == resumed.keys()


def test_early_stop_on_forget_probability(micro_cfg, micro_data, prepared_micro, tmp_path):
    data, target = micro_data
    spec = METHODS["graddiff"]
    rows, stats = train_method(_unlearn_cfg(micro_cfg, stop_forget_prob=1e-9), spec, data, target, tmp_path / "a")
    assert stats["stopped_at_step"] is None and len(rows) == 6
    never = stats["forget_prob"]
    assert 1e-9 < never < 1
    # the stop measures what evaluate reports as forget_prob: mean over forget items of exp(-mean answer NLL)
    documents = load_documents(prepared_micro)
    forget = documents.filter(pc.equal(documents["split"], "forget"))
    pairs = list(zip(forget["question"].to_pylist(), forget["answer"].to_pylist(), strict=True))
    model = load_model(tmp_path / "a" / "graddiff", "cpu")
    scores = score_answers(model, load_tokenizer(prepared_micro), pairs, batch_size=4)
    assert never == pytest.approx(float(np.mean(np.exp(-scores.nll_avg))), rel=1e-5)

    # a target the model is already below: the first check (steps 2, 3, 4 and 6 are checked) stops the loop
    rows, stats = train_method(_unlearn_cfg(micro_cfg, stop_forget_prob=0.999), spec, data, target, tmp_path / "b")
    assert stats["stopped_at_step"] == 2 and len(rows) == 2
    assert stats["forget_prob"] <= 0.999
    assert (tmp_path / "b" / "graddiff" / "model.safetensors").is_file()


def test_stop_check_every_sets_the_checked_steps(micro_cfg, micro_data, tmp_path, monkeypatch):
    data, target = micro_data
    checked: list[int] = []  # one entry per forget-probability check
    measure = unlearn_loop.forget_prob

    def counting(engine, *args):
        checked.append(1)
        return measure(engine, *args)

    monkeypatch.setattr(unlearn_loop, "forget_prob", counting)
    spec = METHODS["graddiff"]
    u = _unlearn_cfg(micro_cfg, stop_forget_prob=1e-9)  # never reached: every due check runs
    train_method(u, spec, data, target, tmp_path / "ckpt")
    assert len(checked) == 4  # with the checkpoints (steps 2, 4) and at the epoch ends (3, 6)
    checked.clear()
    train_method(dataclasses.replace(u, stop_check_every=1), spec, data, target, tmp_path / "each")
    assert len(checked) == 6

    # every step checked: a target the model is already below stops at step 1, before the first checkpoint
    rows, stats = train_method(dataclasses.replace(u, stop_check_every=1, stop_forget_prob=0.999), spec, data,
                               target, tmp_path / "first")
    assert stats["stopped_at_step"] == 1 and len(rows) == 1


def test_a_resumed_run_continues_the_losss_state(micro_cfg, micro_data, tmp_path, monkeypatch):
    """pdu's dual weight moves every step (no warm-up here); the checkpoint carries it, so a run killed after step 2
    resumes with the weight the full run had there: the same losses and weights. Resumed from α, they would differ."""
    data, target = micro_data
    u, spec = _unlearn_cfg(micro_cfg), METHODS["pdu"].with_params({"dual_warmup_epochs": 0.0})
    full_rows, _ = train_method(u, spec, data, target, tmp_path / "full")
    scratch = tmp_path / "scratch"
    check = unlearn_loop.check_divergence

    def die_at_step_4(method, step, *values):
        if step == 4:
            raise Killed
        check(method, step, *values)

    monkeypatch.setattr(unlearn_loop, "check_divergence", die_at_step_4)
    with pytest.raises(Killed):
        train_method(u, spec, data, target, tmp_path / "killed", scratch)
    monkeypatch.setattr(unlearn_loop, "check_divergence", check)
    rows, stats = train_method(u, spec, data, target, tmp_path / "resumed", scratch)
    assert stats["resumed_from_step"] == 2
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in full_rows], rtol=0, atol=1e-6)
    full, resumed = _weights(tmp_path / "full" / "pdu"), _weights(tmp_path / "resumed" / "pdu")
    assert max((full[k] - resumed[k]).abs().max().item() for k in full) <= 1e-6
