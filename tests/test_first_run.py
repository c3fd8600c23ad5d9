"""What a new user meets first: errors before any server starts, no lock files left, a suggestion for a typo'd
command, `status` describing the last run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeline.cli import main
from pipeline.dag import fingerprints
from pipeline.runner import materialize
from stages.config import ConfigError, load_config

CLI = [sys.executable, "-m", "pipeline.cli"]


def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    # its own PREFECT_HOME and no API URL: a `run` that got as far as Prefect would start a server there
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(tmp_path / "prefect")
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("case", ["no folder", "missing file"])
def test_a_missing_data_path_is_one_error_before_any_server_starts(tmp_path, tofu_folder, case):
    folder = tmp_path / "nonexistent"
    if case == "missing file":
        tofu_folder(folder, [{"question": "Q?", "answer": "A."}])
        (folder / "world_facts_perturbed.json").unlink()
    proc = _cli(tmp_path, "run", "--preset", "tofu", "--set", f"data.path={folder}",
                "--artifacts", str(tmp_path / "artifacts"))
    missing = "world_facts_perturbed.json: file does not exist"
    message = f"data.path {folder} does not exist" if case == "no folder" else missing
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and message in proc.stderr, proc.stderr
    assert not (tmp_path / "prefect").exists() or not any((tmp_path / "prefect").rglob("*.db"))  # no server ran
    assert not (tmp_path / "artifacts" / "prepare").exists()


def test_a_failed_stage_leaves_no_lock_file(tmp_path, tofu_folder):
    folder = tofu_folder(tmp_path / "tofu", [{"question": "Q?", "answer": "A."}])
    (folder / "forget10.json").write_text("[{not json")  # there, so checked only when the stage reads it
    cfg = load_config("micro", overrides=["data.source=tofu", f"data.path={folder}", "model.vocab_size=300"])
    root = tmp_path / "artifacts"
    with pytest.raises(ConfigError, match="not valid JSON"):
        materialize("prepare", cfg, root)
    assert (root / "prepare").is_dir()
    assert list(root.rglob("*.lock")) == []


def test_a_typo_d_command_gets_a_suggestion(capsys):
    assert main(["statuss"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sunlearn: error: unknown command 'statuss' (did you mean 'status'?)")
    assert len(err.splitlines()) == 1


def test_status_describes_the_last_run_under_the_root(tmp_path, capsys):
    root = tmp_path / "artifacts"
    root.mkdir()
    (root / "last-run.json").write_text(json.dumps({"preset": "micro", "config_file": None,
                                                    "overrides": ["masks.gamma=0.4"]}))
    assert main(["status", "--artifacts", str(root), "--json"]) == 0
    out, err = capsys.readouterr()
    expected = fingerprints(load_config("micro", overrides=["masks.gamma=0.4"]))
    assert [r["fingerprint"] for r in json.loads(out)["stages"]] == [fp["fingerprint"] for fp in expected.values()]
    assert "the last run's" in err and "--preset micro --set masks.gamma=0.4" in err

