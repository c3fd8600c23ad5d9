"""Faults and bad input through the real CLI: one clear error line, no traceback, the cache left as it was.

Errors found while reading the config come before Prefect starts: stderr is exactly one line. Errors inside a stage
come after Prefect's own progress lines (they go to stderr as well), so there the error is stderr's last line, the only
one that starts with `sunlearn: error:`, and no traceback appears anywhere (Prefect's console copies lose theirs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.cache import MANIFEST, ArtifactCache, file_sha256
from pipeline.dag import ORDER, fingerprints
from pipeline.runner import materialize
from stages.config import load_config

pytestmark = pytest.mark.slow

CLI = [sys.executable, "-m", "pipeline.cli"]


def sunlearn(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None, timeout: int = 300):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


def assert_one_error(proc: subprocess.CompletedProcess, message: str, code: int = 1, only_line: bool = False) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[-1].startswith("sunlearn: error: ") and message in lines[-1], proc.stderr[-3000:]
    assert [line for line in lines if "sunlearn: error" in line] == lines[-1:]
    assert proc.stderr.count(message) == 1, proc.stderr[-3000:]  # Prefect's console copies of the failure dropped
    if only_line:
        assert len(lines) == 1, proc.stderr


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under the root except lock files, with size and mtime: equal before and after means untouched."""
    if not root.exists():
        return {}
    files = (p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock"))
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in files}


@pytest.fixture(scope="module")
def server_env(prefect_harness) -> dict[str, str]:
    """The session's Prefect server for the CLI processes: a temporary server per process costs 10-30 s each."""
    from prefect.settings import PREFECT_API_URL

    return {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}


@pytest.fixture(scope="module")
def micro_upstream(tmp_path_factory) -> Path:
    """An artifact root with the micro config's stages up to masks (no Prefect needed); tests copy it."""
    root = tmp_path_factory.mktemp("upstream") / "artifacts"
    cfg = load_config("micro")
    for name in ("prepare", "target", "assistants", "scores", "masks"):
        materialize(name, cfg, root)
    return root


@pytest.fixture
def root(micro_upstream: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "artifacts"
    shutil.copytree(micro_upstream, copy)
    return copy


def _entry(root: Path, stage: str, *overrides: str):
    fp = fingerprints(load_config("micro", overrides=overrides))[stage]["fingerprint"]
    return ArtifactCache(root).entry(stage, fp)


# --- errors in the config: before Prefect starts, one line and nothing written --------------------------------------

@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--preset", "mikro"], "unknown preset 'mikro' (did you mean 'micro'?)"),
        (["stage", "unlearnn"], "unknown stage 'unlearnn' (did you mean 'unlearn'?)"),
        (["run", "--set", "unlearn.methods=su,gradif"], "unknown method 'gradif' (did you mean 'graddiff'?)"),
        (["run", "--set", "unlearn.lrr=1e-5"], "unknown config key 'unlearn.lrr' (did you mean 'unlearn.lr'?)"),
        (["run", "--set", "masks.gamma=1.5"], "masks.gamma must be in [0, 1] (a difference of probabilities), got 1.5"),
        (["run", "--set", "masks.window=-1"], "masks.window must be >= 0, got -1"),
        (["run", "--set", "model.name=./no-such-model"], "model path ./no-such-model does not exist"),
    ],
)
def test_config_errors_are_one_line_before_anything_runs(args, message, tmp_path):
    preset = [] if "--preset" in args else ["--preset", "micro"]
    proc = sunlearn(*args, *preset, "--artifacts", str(tmp_path / "artifacts"), cwd=tmp_path)
    assert_one_error(proc, message, code=2, only_line=True)
    assert not (tmp_path / "artifacts").exists()


# --- bad data files: inside the prepare stage ------------------------------------------------------------------------

def _prepare_tofu(folder: Path, root: Path, env: dict[str, str]):
    return sunlearn("stage", "prepare", "--preset", "micro", "--set", "data.source=tofu", "--set",
                    f"data.path={folder}", "--set", "model.vocab_size=300", "--artifacts", str(root), env=env)


ROW = {"question": "Q?", "answer": "A."}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", "retain90.json: file does not exist"),
        ("unreadable", "forget10.json: not valid JSON"),
        ("no_question", "forget10.json: row 1 has no 'question'"),
        ("empty_forget", "forget10.json: the forget set is empty"),
    ],
)
def test_bad_data_files(case, message, tmp_path, server_env, tofu_folder):
    forget = {"no_question": [ROW, {"answer": "A."}], "empty_forget": []}.get(case, [ROW])
    folder = tofu_folder(tmp_path / "tofu", forget)
    if case == "missing":
        (folder / "retain90.json").unlink()
    if case == "unreadable":
        (folder / "forget10.json").write_text('[{"question": "Q?",')
    proc = _prepare_tofu(folder, tmp_path / "artifacts", server_env)
    assert_one_error(proc, message, code=2)
    assert snapshot(tmp_path / "artifacts") == {}


def test_forget_overlapping_retain_warns_and_goes_on(tmp_path, server_env, tofu_folder):
    folder = tofu_folder(tmp_path / "tofu", [ROW], retain=[ROW, {"question": "R?", "answer": "B."}])
    proc = _prepare_tofu(folder, tmp_path / "artifacts", server_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warning = [line for line in proc.stderr.splitlines() if "WARNING" in line]
    assert len(warning) == 1 and "1 forget items also appear in the retain set" in warning[0]
    assert "sunlearn: error" not in proc.stderr


# --- faults inside later stages, on a copy of a micro root ------------------------------------------------------------

def test_lmplz_failing_shows_its_stderr_tail(root, tmp_path, server_env):
    fake = tmp_path / "kenlm"
    fake.mkdir()
    (fake / "lmplz").write_text("#!/bin/sh\necho 'Reading corpus' >&2\necho 'ERROR: No space left' >&2\nexit 3\n")
    (fake / "lmplz").chmod(0o755)
    before = snapshot(root)
    proc = sunlearn("stage", "assistants", "--preset", "micro", "--artifacts", str(root),
                    env={**server_env, "SUNLEARN_KENLM_BIN": str(fake)})
    assert_one_error(proc, "lmplz failed (exit 3): Reading corpus | ERROR: No space left")
    assert snapshot(root) == before


def test_lmplz_missing(root, tmp_path, server_env):
    # no lmplz anywhere: an empty SUNLEARN_KENLM_BIN, a PATH without it, and no repository build (.kenlm/bin)
    code = ("import sys; from pathlib import Path; import stages.assistants as a; a.REPO_KENLM_BIN = Path('/nowhere'); "
            "from pipeline.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**server_env, "SUNLEARN_KENLM_BIN": str(tmp_path), "PATH": str(Path(sys.executable).parent)}
    before = snapshot(root)
    proc = subprocess.run([sys.executable, "-c", code, "stage", "assistants", "--preset", "micro", "--artifacts",
                           str(root)], capture_output=True, text=True, env=env, timeout=300)
    assert_one_error(proc, "lmplz not found (run `make setup` to build KenLM, or set SUNLEARN_KENLM_BIN)")
    assert snapshot(root) == before


def test_mask_selecting_nothing_warns_and_records_it(root, server_env):
    proc = sunlearn("stage", "masks", "--preset", "micro", "--set", "masks.gamma=1.0", "--artifacts", str(root),
                    env=server_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gamma=1 selects no tokens; SU will not change the model (lower masks.gamma)" in proc.stderr
    entry = _entry(root, "masks", "masks.gamma=1.0")
    stats = entry.manifest()["stats"]
    assert stats["warning"] == "no tokens selected" and stats["tokens_selected"] == 0


def test_off_schema_parquet_names_file_and_column(root, server_env):
    scores = _entry(root, "scores")
    path = scores.path / "token_scores.parquet"
    pq.write_table(pq.read_table(path).drop(["score_diff"]), path)
    # a manifest that matches the file: an artifact written by other code, not a corrupt one
    manifest = json.loads(scores.manifest_path.read_text())
    manifest["files"]["token_scores.parquet"] = file_sha256(path)
    manifest["file_stats"]["token_scores.parquet"] = [path.stat().st_size, path.stat().st_mtime_ns]
    scores.manifest_path.write_text(json.dumps(manifest))
    before = snapshot(root)
    proc = sunlearn("stage", "masks", "--preset", "micro", "--artifacts", str(root), env=server_env)
    assert_one_error(proc, f"{path}: missing column 'score_diff'")
    assert snapshot(root) == before


def test_corrupt_upstream_is_refused_and_verify_finds_it(root, server_env):
    scores = _entry(root, "scores")
    path = scores.path / "token_scores.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    before = snapshot(root)
    proc = sunlearn("stage", "masks", "--preset", "micro", "--artifacts", str(root), env=server_env)
    assert_one_error(proc, f"masks: upstream scores artifact is unusable ({path}: checksum mismatch); "
                           "run `sunlearn verify --fix` and run again")
    assert snapshot(root) == before

    check = sunlearn("verify", "--artifacts", str(root))
    assert check.returncode == 1
    assert f"corrupt: scores/{scores.fingerprint}: {path}: checksum mismatch" in check.stdout
    fixed = sunlearn("verify", "--fix", "--artifacts", str(root))
    assert fixed.returncode == 0 and "4 of 5 artifacts verified, 1 removed" in fixed.stdout
    assert not scores.path.exists()


def test_diverging_forget_loss_writes_no_model(root, server_env):
    proc = sunlearn("stage", "unlearn", "--preset", "micro", "--set", "unlearn.max_forget_loss=1", "--artifacts",
                    str(root), env=server_env)
    assert_one_error(proc, "passed unlearn.max_forget_loss=1.0 at step 1; lower unlearn.lr (now 0.0005) or raise "
                           "unlearn.max_forget_loss")
    assert snapshot(root / "unlearn") == {}  # no artifact, no temporary folder, no checkpoint


# --- SIGKILL during unlearn -------------------------------------------------------------------------------------------

def test_sigkill_during_unlearn_then_rerun_recomputes_only_unlearn_and_evaluate(tmp_path):
    # checkpoint every step so the kill lands after a checkpoint; few new tokens keep evaluate short
    root = tmp_path / "artifacts"
    args = ["run", "--preset", "micro", "--set", "unlearn.checkpoint_every=1", "--set", "evaluate.max_new_tokens=4",
            "--artifacts", str(root)]
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    try:
        while not list((root / "unlearn").glob(".scratch-*/*/latest")):  # a checkpoint of su or graddiff
            assert proc.poll() is None, "the run ended before its first unlearn checkpoint"
            assert time.time() < deadline, "no unlearn checkpoint after 300 s"
            time.sleep(0.2)
        temp = list((root / "unlearn").glob(".tmp-*"))
        assert temp  # the stage was mid-build
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not [p for p in (root / "unlearn").iterdir() if not p.name.startswith(".")]  # nothing counts as done

    rerun = sunlearn(*args, "--json")
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout)
    assert [s["name"] for s in summary["stages"] if s["status"] == "ran"] == ["unlearn", "evaluate"]
    assert [s["name"] for s in summary["stages"]] == ORDER
    assert not any(p.exists() for p in temp)  # the killed run's temporary folder is gone
    assert not list((root / "unlearn").glob(".scratch-*"))  # and so is the resume state, once published
    verify = sunlearn("verify", "--artifacts", str(root), "--json")
    assert verify.returncode == 0
    assert [e["ok"] for e in json.loads(verify.stdout)["entries"]] == [True] * len(ORDER)
    stats = json.loads((Path(summary["stages"][ORDER.index("unlearn")]["path"]) / MANIFEST).read_text())["stats"]
    assert any(method["resumed_from_step"] >= 1 for method in stats.values())  # it went on from the checkpoint
