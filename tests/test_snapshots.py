"""Snapshots of each method's weights every unlearn.snapshot_every steps: where they go, what they hold, and that a
killed and resumed run still has every one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from stages.common import load_documents, load_tokenizer
from stages.config import Config, ConfigError, config_from_dict, load_config
from stages.unlearn import METHODS, UnlearnDiverged
from stages.unlearn import loop as unlearn_loop
from stages.unlearn.data import attach_selection, load_split
from stages.unlearn.distributed import init_distributed
from stages.unlearn.loop import TARGET_DIR, Data, train_method
from tests.test_unlearn import write_masks


class Killed(Exception):
    """Stands in for SIGKILL inside the loop."""


@pytest.fixture(scope="module")
def micro_data(prepared_micro: Path, trained_micro: Path, tmp_path_factory) -> tuple[Data, Path]:
    init_distributed()
    masks = tmp_path_factory.mktemp("masks")
    write_masks(prepared_micro, masks)
    documents = load_documents(prepared_micro)
    forget = attach_selection(load_split(documents, "forget"), masks / "masks.parquet")
    pad = load_tokenizer(prepared_micro).pad_token_id
    return Data(forget, load_split(documents, "retain"), None, None, pad), trained_micro / TARGET_DIR


def _unlearn_cfg(micro_cfg: Config, **changes):
    # 12 forget rows, batch 4: 3 steps an epoch, 6 in all; a higher lr so that the weights move visibly
    settings = {"epochs": 2, "lr": 2e-3, "checkpoint_every": 2, "snapshot_every": 1, **changes}
    return dataclasses.replace(micro_cfg.unlearn, **settings)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_snapshot_every_step_but_the_last(micro_cfg, micro_data, tmp_path):
    data, target = micro_data
    rows, stats = train_method(_unlearn_cfg(micro_cfg), METHODS["su"], data, target, tmp_path)
    assert stats["last_step"] == len(rows) == 6
    assert stats["snapshots"] == [1, 2, 3, 4, 5]  # step 6 is the final model, su/
    folder = tmp_path / "snapshots" / "su"
    assert sorted(p.name for p in folder.iterdir()) == [f"step-{k}" for k in range(1, 6)]  # no temporary left
    weights = [_weights(folder / f"step-{k}") for k in range(1, 6)] + [_weights(tmp_path / "su")]
    assert all((folder / f"step-{k}" / "config.json").is_file() for k in range(1, 6))
    moved = [_max_diff(a, b) for a, b in zip(weights[:-1], weights[1:], strict=True)]
    assert min(moved) > 1e-5  # each step moved the weights

    # the snapshot of step 3 is the model after exactly 3 steps: the 1-epoch plan is the 2-epoch plan's first epoch
    _, short = train_method(_unlearn_cfg(micro_cfg, epochs=1), METHODS["su"], data, target, tmp_path / "short")
    assert short["last_step"] == 3 and short["snapshots"] == [1, 2]
    assert _max_diff(weights[2], _weights(tmp_path / "short" / "su")) <= 1e-6


def test_killed_run_resumes_with_every_snapshot(micro_cfg, micro_data, tmp_path, monkeypatch):
    data, target = micro_data
    u, spec = _unlearn_cfg(micro_cfg), METHODS["graddiff"]
    train_method(u, spec, data, target, tmp_path / "full")

    scratch = tmp_path / "scratch"
    check = unlearn_loop.check_divergence

    def die_at_step_4(method, step, *values):
        if step == 4:  # after the checkpoint and snapshot of step 2 and the snapshot of step 3
            raise Killed
        check(method, step, *values)

    monkeypatch.setattr(unlearn_loop, "check_divergence", die_at_step_4)
    with pytest.raises(Killed):
        train_method(u, spec, data, target, tmp_path / "killed", scratch)
    assert sorted(p.name for p in (scratch / "snapshots" / "graddiff").iterdir()) == ["step-1", "step-2", "step-3"]
    monkeypatch.setattr(unlearn_loop, "check_divergence", check)

    _, stats = train_method(u, spec, data, target, tmp_path / "resumed", scratch)
    assert stats["resumed_from_step"] == 2 and stats["snapshots"] == [1, 2, 3, 4, 5]
    for k in range(1, 6):  # the ones written before the kill and the ones after it, all in the artifact
        full = _weights(tmp_path / "full" / "snapshots" / "graddiff" / f"step-{k}")
        assert _max_diff(full, _weights(tmp_path / "resumed" / "snapshots" / "graddiff" / f"step-{k}")) <= 1e-6

    # a method the killed run finished is reused with its snapshots
    _, again = train_method(u, spec, data, target, tmp_path / "again", scratch)
    assert again["reused"] and again["snapshots"] == [1, 2, 3, 4, 5]
    assert (tmp_path / "again" / "snapshots" / "graddiff" / "step-5" / "model.safetensors").is_file()


def test_early_stop_keeps_only_the_earlier_snapshots(micro_cfg, micro_data, tmp_path):
    data, target = micro_data
    u = _unlearn_cfg(micro_cfg, stop_forget_prob=0.999, stop_check_every=2)  # already below: stops at step 2
    _, stats = train_method(u, METHODS["graddiff"], data, target, tmp_path)
    assert stats["stopped_at_step"] == stats["last_step"] == 2 and stats["snapshots"] == [1]
    assert [p.name for p in (tmp_path / "snapshots" / "graddiff").iterdir()] == ["step-1"]


def test_zero3_snapshots_hold_the_whole_model(micro_cfg, micro_data, tmp_path):
    data, target = micro_data
    for stage in (0, 3):
        u = _unlearn_cfg(micro_cfg, epochs=1, zero_stage=stage, checkpoint_every=0)
        train_method(u, METHODS["su"], data, target, tmp_path / f"zero{stage}")
    a, b = (_weights(tmp_path / f"zero{stage}" / "snapshots" / "su" / "step-2") for stage in (0, 3))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert _max_diff(a, b) < 1e-6


def test_a_diverged_run_writes_no_snapshot(micro_cfg, micro_data, tmp_path):
    """The check waits for unlearn.divergence_check_every steps, but never past a save: step 1's divergence is caught
    before step 1's snapshot, and reported as step 1."""
    data, target = micro_data
    u = _unlearn_cfg(micro_cfg, max_forget_loss=1e-3, divergence_check_every=100)
    with pytest.raises(UnlearnDiverged, match=r"graddiff: forget NLL .* at step 1;"):
        train_method(u, METHODS["graddiff"], data, target, tmp_path)
    assert not (tmp_path / "graddiff").exists()
    assert not any((tmp_path / "snapshots").rglob("*.safetensors"))


def test_snapshot_every_is_validated():
    with pytest.raises(ConfigError, match=r"unlearn.snapshot_every must be >= 0 \(0: off\), got -1"):
        load_config("micro", overrides=["unlearn.snapshot_every=-1"])
    with pytest.raises(ConfigError, match=r"unlearn.divergence_check_every must be >= 1, got 0"):
        load_config("micro", overrides=["unlearn.divergence_check_every=0"])


def test_config_from_dict_goes_through_coercion_and_validation():
    cfg = load_config("micro", overrides=["unlearn.snapshot_every=2", "unlearn.params.npo.beta=0.3", "masks.gamma=0.4"])
    assert config_from_dict(cfg.to_dict()) == cfg
    tree = cfg.to_dict()
    tree["unlearn"]["snapshot_every"] = "3"  # a string, as a hand-edited job file could hold
    assert config_from_dict(tree).unlearn.snapshot_every == 3
    tree["unlearn"]["methods"] = ["su", "gradif"]
    with pytest.raises(ConfigError, match="unknown method 'gradif'"):
        config_from_dict(tree)
