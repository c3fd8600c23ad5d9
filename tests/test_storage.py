"""Artifact entries moved whole between a local cache and an fsspec root (memory:// and file://)."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.cache import MANIFEST, ArtifactCache


def _produce(out: Path) -> dict:
    (out / "sub").mkdir()
    (out / "a.txt").write_text("alpha")
    (out / "sub" / "b.bin").write_bytes(bytes(range(256)))
    return {"tokens_selected": 3}


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_publish_then_fetch_on_another_node(tmp_path, scheme):
    root = f"memory://sunlearn-{uuid.uuid4().hex[:8]}/artifacts" if scheme == "memory" else f"file://{tmp_path}/shared"
    node_a, node_b = ArtifactCache(tmp_path / "a"), ArtifactCache(tmp_path / "b")
    entry = node_a.entry("masks", "0123456789abcdef")
    manifest = node_a.build(entry, _produce, {"config": {"masks": {"gamma": 0.5}}})
    storage.publish(root, entry)

    copy = node_b.entry("masks", "0123456789abcdef")
    assert storage.is_cached(root, copy) and not copy.path.exists()  # seen there, not copied
    assert not storage.is_cached(root, node_b.entry("masks", "ffffffffffffffff"))
    with node_b.lock(copy):
        assert storage.fetch(root, copy) and copy.is_complete()
    assert copy.manifest() == manifest and copy.verify() == []
    assert not storage.fetch(root, node_b.entry("masks", "ffffffffffffffff"))


def test_remote_entry_without_manifest_is_not_fetched(tmp_path):
    root = f"memory://sunlearn-{uuid.uuid4().hex[:8]}/artifacts"
    fs, base = fsspec.core.url_to_fs(root)
    fs.pipe_file(f"{base}/masks/00000000000000aa/a.txt", b"half-uploaded")
    entry = ArtifactCache(tmp_path).entry("masks", "00000000000000aa")
    assert not storage.is_cached(root, entry)
    assert not storage.fetch(root, entry) and not entry.path.exists()


def test_a_plain_path_is_its_own_working_copy(tmp_path):
    assert storage.local_root(tmp_path) == tmp_path.resolve()
    assert not storage.is_remote(tmp_path) and storage.is_remote("s3://bucket/artifacts")
    assert storage.local_root("s3://bucket/a") != storage.local_root("s3://bucket/b")


def test_stages_publish_to_a_remote_root_and_a_fresh_node_reuses_them(tmp_path, monkeypatch, micro_cfg):
    """The real prepare → assistants → scores → masks through materialize, with the root a file:// URL."""
    from pipeline.runner import materialize_until

    root = f"file://{tmp_path}/shared"
    monkeypatch.setattr(storage, "CACHE_HOME", tmp_path / "node_a")
    first = materialize_until("masks", micro_cfg, root)
    assert [r.status for r in first] == ["ran"] * 4
    for r in first:
        assert (tmp_path / "shared" / r.name / r.fingerprint / "manifest.json").is_file()
    monkeypatch.setattr(storage, "CACHE_HOME", tmp_path / "node_b")  # another node: an empty local working copy
    second = materialize_until("masks", micro_cfg, root)
    assert [r.status for r in second] == ["cached"] * 4
    assert all(Path(r.path).is_relative_to(tmp_path / "node_b") for r in second)


def _remote_root(scheme: str, tmp_path: Path) -> str:
    return f"memory://sunlearn-{uuid.uuid4().hex[:8]}/artifacts" if scheme == "memory" else f"file://{tmp_path}/shared"


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_verify_reads_the_remote_entries_and_fix_removes_a_corrupt_one(tmp_path, monkeypatch, scheme):
    monkeypatch.setattr(storage, "CACHE_HOME", tmp_path / "node")
    root = _remote_root(scheme, tmp_path)
    builder = ArtifactCache(tmp_path / "builder")
    good, bad = builder.entry("masks", "00000000000000aa"), builder.entry("masks", "00000000000000bb")
    for entry in (good, bad):
        builder.build(entry, _produce, {})
        storage.publish(root, entry)
    fs, base = fsspec.core.url_to_fs(root)
    fs.pipe_file(f"{base}/masks/00000000000000bb/a.txt", b"bit rot")

    report = {r["path"]: r for r in storage.verify(root, ["masks"])}
    assert report[storage.join(root, "masks", "00000000000000aa")]["ok"]
    broken = report[storage.join(root, "masks", "00000000000000bb")]
    assert not broken["ok"] and "a.txt: checksum mismatch" in broken["problems"][0]
    storage.verify(root, ["masks"], fix=True)
    assert not fs.exists(f"{base}/masks/00000000000000bb") and fs.exists(f"{base}/masks/00000000000000aa/{MANIFEST}")


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_put_tree_uploads_under_the_root(tmp_path, scheme):
    root = _remote_root(scheme, tmp_path)
    folder = tmp_path / "out"
    _produce(folder.mkdir() or folder)
    location = storage.put_tree(root, "sweeps/abc", folder)
    assert location == f"{root}/sweeps/abc"
    with fsspec.open(f"{location}/sub/b.bin", "rb") as fh:
        assert fh.read() == bytes(range(256))


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_sweep_report_and_verify_on_a_remote_root(tmp_path, monkeypatch, scheme, prefect_harness):
    """The real sweep, report and verify with the root an fsspec URL: nothing lands in a local folder named `memory:`
    or `file:`, and a fresh node reads what they wrote from the root alone."""
    from pipeline.cli import main
    from pipeline.dag import ORDER
    from pipeline.runner import build_reports
    from pipeline.sweep import sweep_flow
    from stages.config import load_config

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(storage, "CACHE_HOME", tmp_path / "node_a")
    root = _remote_root(scheme, tmp_path)
    common = ["evaluate.max_new_tokens=4"]
    result = sweep_flow(grid=["masks.gamma=0.3,0.5"], preset="micro", overrides=common, artifacts=root)
    assert result["path"].startswith(f"{root}/sweeps/") and not result["failed"]
    with fsspec.open(f"{result['path']}/sweep_metrics.parquet", "rb") as fh:
        table = pq.read_table(fh).to_pydict()
    assert sorted(set(table["params"])) == ['{"masks.gamma": "0.3"}', '{"masks.gamma": "0.5"}']
    assert not list(tmp_path.glob("*:"))

    monkeypatch.setattr(storage, "CACHE_HOME", tmp_path / "node_b")  # a fresh node: everything comes from the root
    written = build_reports(load_config("micro", None, [*common, "masks.gamma=0.3"]), root)
    assert {w.rpartition("/")[2] for w in written} >= {"results.md", "pareto.png", "selection.html"}
    with fsspec.open(next(w for w in written if w.endswith("results.md")), "rt") as fh:
        assert "su" in fh.read()
    report = storage.verify(root, ORDER)
    remote = [r for r in report if r["path"].startswith(root)]
    assert len(remote) == 4 + 2 * 3 and all(r["ok"] for r in report)  # prepare..scores once, masks..evaluate twice
    assert main(["verify", "--artifacts", root]) == 0
    assert not list(tmp_path.glob("*:"))
