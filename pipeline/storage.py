"""Artifact roots on any fsspec filesystem (s3://, gs://, hdfs://, file://, memory://).

A stage reads and writes a local working copy of the cache (`local_root`); entries move between it and the remote
root whole: `fetch` downloads an entry whose remote manifest exists, `publish` uploads an entry's files and then its
manifest, so a remote entry without a manifest is never trusted, as in the local cache. A plain path needs none of
this: `local_root` returns it and `fetch`/`publish` do nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import uuid
from pathlib import Path

import fsspec

from pipeline.cache import MANIFEST, TMP_PREFIX, ArtifactCache, Entry

CACHE_HOME = Path(os.environ.get("SUNLEARN_LOCAL_CACHE", "~/.cache/sunlearn")).expanduser()


def is_remote(root: str | Path) -> bool:
    return "://" in str(root)


def local_root(root: str | Path) -> Path:
    """Where stages read and write: the root itself, or for a URL a local working copy named after it."""
    if not is_remote(root):
        return Path(root).expanduser().resolve()
    return CACHE_HOME / "remote" / hashlib.sha256(str(root).rstrip("/").encode()).hexdigest()[:16]


def local_cache(root: str | Path) -> ArtifactCache:
    return ArtifactCache(local_root(root))


def _remote(root: str, entry: Entry) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, base = fsspec.core.url_to_fs(root)
    return fs, f"{base.rstrip('/')}/{entry.stage}/{entry.fingerprint}"


def fetch(root: str | Path, entry: Entry) -> bool:
    """Make `entry` complete locally if it is complete remotely; True when it is complete locally afterwards.

    Call it holding `ArtifactCache.lock(entry)`, as for a build: it replaces an incomplete local folder.
    """
    if entry.is_complete() or not is_remote(root):
        return entry.is_complete()
    fs, remote = _remote(str(root), entry)
    if not fs.exists(f"{remote}/{MANIFEST}"):
        return False
    tmp = entry.path.parent / f"{TMP_PREFIX}{entry.fingerprint}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp.mkdir(parents=True)
    try:
        manifest = fs.cat_file(f"{remote}/{MANIFEST}")
        for rel in _manifest_files(manifest):
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{remote}/{rel}", str(tmp / rel))
        (tmp / MANIFEST).write_bytes(manifest)  # last: the copy counts only once every file is in
        if entry.path.exists():
            shutil.rmtree(entry.path)
        os.rename(tmp, entry.path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return True


def publish(root: str | Path, entry: Entry) -> None:
    """Upload a complete local entry: every file first, the manifest last."""
    if not is_remote(root):
        return
    fs, remote = _remote(str(root), entry)
    manifest = entry.manifest_path.read_bytes()
    for rel in _manifest_files(manifest):
        fs.makedirs(posixpath.dirname(f"{remote}/{rel}"), exist_ok=True)
        fs.put_file(str(entry.path / rel), f"{remote}/{rel}")
    fs.pipe_file(f"{remote}/{MANIFEST}", manifest)


def _manifest_files(manifest: bytes) -> list[str]:
    return sorted(json.loads(manifest)["files"])
