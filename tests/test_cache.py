"""The artifact cache: atomic publication, manifests with checksums, stale temp folders."""

import json
import os

import pytest

from pipeline.cache import MANIFEST, ArtifactCache


def test_build_publishes_files_with_manifest_last(tmp_path):
    cache = ArtifactCache(tmp_path)
    entry = cache.entry("masks", "abc")

    def produce(tmp):
        (tmp / "x.txt").write_text("hello")
        assert not entry.path.exists()  # nothing visible while the stage runs
        return {"n": 1}

    manifest = cache.build(entry, produce, {"config": {}})
    assert entry.is_complete()
    assert json.loads((entry.path / MANIFEST).read_text())["stats"] == {"n": 1}
    assert set(manifest["files"]) == {"x.txt"}
    assert entry.verify() == []
    (entry.path / "x.txt").write_text("tampered")
    assert "checksum mismatch" in entry.verify()[0]


def test_failed_stage_leaves_nothing(tmp_path):
    cache = ArtifactCache(tmp_path)
    entry = cache.entry("masks", "abc")

    def produce(tmp):
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        cache.build(entry, produce, {})
    assert not entry.path.exists()
    assert list((tmp_path / "masks").iterdir()) == []


def test_stale_temp_folders_of_dead_processes_are_removed(tmp_path):
    cache = ArtifactCache(tmp_path)
    stale = tmp_path / "masks" / ".tmp-abc-999999999-ffffff"
    stale.mkdir(parents=True)
    live = tmp_path / "masks" / f".tmp-abc-{os.getpid()}-eeeeee"
    live.mkdir()
    cache.build(cache.entry("masks", "abc"), lambda tmp: None, {})
    assert not stale.exists()
    assert live.exists()


def test_quick_verify_catches_changed_files_and_verify_all_fixes(tmp_path):
    cache = ArtifactCache(tmp_path)
    entry = cache.entry("scores", "f00")
    cache.build(entry, lambda tmp: (tmp / "token_scores.parquet").write_bytes(b"x" * 100), {})
    assert entry.verify(full=False) == []
    target = entry.path / "token_scores.parquet"
    target.write_bytes(b"y" * 100)  # same size, new mtime: the quick check re-hashes it
    assert "checksum mismatch" in entry.verify(full=False)[0]
    incomplete = tmp_path / "scores" / "0ddba11"
    incomplete.mkdir()
    report = cache.verify_all(["scores"], fix=True)
    assert {r["fingerprint"]: r["removed"] for r in report} == {"0ddba11": True, "f00": True}
    assert not entry.path.exists() and not incomplete.exists()
