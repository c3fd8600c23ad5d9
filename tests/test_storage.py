"""Artifact entries moved whole between a local cache and an fsspec root (memory:// and file://)."""

from __future__ import annotations

import uuid
from pathlib import Path

import fsspec
import pytest

from pipeline import storage
from pipeline.cache import ArtifactCache


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
    with node_b.lock(copy):
        assert storage.fetch(root, copy) and copy.is_complete()
    assert copy.manifest() == manifest and copy.verify() == []
    assert not storage.fetch(root, node_b.entry("masks", "ffffffffffffffff"))


def test_remote_entry_without_manifest_is_not_fetched(tmp_path):
    root = f"memory://sunlearn-{uuid.uuid4().hex[:8]}/artifacts"
    fs, base = fsspec.core.url_to_fs(root)
    fs.pipe_file(f"{base}/masks/00000000000000aa/a.txt", b"half-uploaded")
    entry = ArtifactCache(tmp_path).entry("masks", "00000000000000aa")
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
