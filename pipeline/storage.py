"""Artifact roots on any fsspec filesystem (s3://, gs://, hdfs://, file://, memory://).

A stage reads and writes a local working copy of the cache (`local_root`); entries move between it and the remote
root whole: `fetch` downloads an entry whose remote manifest exists, `publish` uploads an entry's files and then its
manifest, so a remote entry without a manifest is never trusted, as in the local cache. A plain path needs none of
this: `local_root` returns it and `fetch`/`publish` do nothing.

Outputs that are not cache entries (a sweep's table, reports) are written locally and uploaded whole with `put_tree`
under `join(root, ...)`; `verify` checks the remote entries themselves, not only the working copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fsspec

from pipeline.cache import MANIFEST, ArtifactCache, Entry, heartbeat, temp_dir

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


def is_cached(root: str | Path, entry: Entry) -> bool:
    """Whether `entry` is complete here or, for a remote root, there; nothing is copied."""
    if entry.is_complete() or not is_remote(root):
        return entry.is_complete()
    fs, remote = _remote(str(root), entry)
    return fs.exists(f"{remote}/{MANIFEST}")


def fetch(root: str | Path, entry: Entry) -> bool:
    """Make `entry` complete locally if it is complete remotely; True when it is complete locally afterwards.

    Call it holding `ArtifactCache.lock(entry)`, as for a build: it replaces an incomplete local folder.
    """
    if entry.is_complete() or not is_cached(root, entry):
        return entry.is_complete()
    fs, remote = _remote(str(root), entry)
    tmp = temp_dir(entry.path.parent, entry.fingerprint)
    tmp.mkdir(parents=True)
    try:
        with heartbeat(tmp):  # a long download on a shared working copy must not look dead to other nodes
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


def join(root: str | Path, *parts: str) -> str:
    """A location under the root, as a URL for a remote root and as a resolved path otherwise."""
    if is_remote(root):
        return "/".join([str(root).rstrip("/"), *parts])
    return str(local_root(root).joinpath(*parts))


def put_tree(root: str | Path, rel: str, folder: Path) -> str:
    """Upload every file of a local folder to `<root>/<rel>/` (nothing to do when it is that folder already);
    returns `join(root, rel)`."""
    if is_remote(root):
        fs, base = fsspec.core.url_to_fs(str(root))
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            target = f"{base.rstrip('/')}/{rel}/{path.relative_to(folder).as_posix()}"
            fs.makedirs(posixpath.dirname(target), exist_ok=True)
            fs.put_file(str(path), target)
    elif Path(folder).resolve() != local_root(root) / rel:
        shutil.copytree(folder, local_root(root) / rel, dirs_exist_ok=True)
    return join(root, rel)


def fetch_files(root: str | Path, patterns: Iterable[str], dest: Path) -> Path:
    """Copies of the remote files matching `patterns` (globs relative to the root) under `dest`, for readers that
    only look (reports over every run). Never a cache: `dest` is replaced whole. A plain root is returned as is."""
    if not is_remote(root):
        return local_root(root)
    fs, base = fsspec.core.url_to_fs(str(root))
    base = base.rstrip("/")
    shutil.rmtree(dest, ignore_errors=True)
    for pattern in patterns:
        for remote in sorted(fs.glob(f"{base}/{pattern}")):
            target = dest / remote.strip("/")[len(base.strip("/")):].lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(target))
    return dest


def verify(root: str | Path, stages: Iterable[str], fix: bool = False) -> list[dict[str, Any]]:
    """`sunlearn verify`: every entry of the local working copy, and for a remote root every remote entry too.

    With `fix`, remove what is corrupt or incomplete (a remote entry without a manifest is left alone: it may be an
    upload in progress)."""
    stages = list(stages)
    report = local_cache(root).verify_all(stages, fix=fix)
    if not is_remote(root):
        return report
    fs, base = fsspec.core.url_to_fs(str(root))
    base = base.rstrip("/")
    for stage in stages:
        if not fs.isdir(f"{base}/{stage}"):
            continue
        for folder in sorted(fs.ls(f"{base}/{stage}", detail=False)):
            fp = posixpath.basename(folder.rstrip("/"))
            if fp.startswith(".") or not fs.isdir(folder) or not fs.exists(f"{folder}/{MANIFEST}"):
                continue
            problems = _remote_problems(fs, folder)
            if problems and fix:
                fs.rm(folder, recursive=True)
            report.append({"stage": stage, "fingerprint": fp, "path": join(root, stage, fp), "ok": not problems,
                           "problems": problems, "removed": bool(problems and fix)})
    return report


def _remote_problems(fs: fsspec.AbstractFileSystem, folder: str) -> list[str]:
    try:
        files = json.loads(fs.cat_file(f"{folder}/{MANIFEST}"))["files"]
    except (OSError, ValueError, KeyError) as exc:
        return [f"{folder}: manifest without file list ({exc})"]
    problems = []
    for rel, digest in sorted(files.items()):
        if not fs.isfile(f"{folder}/{rel}"):
            problems.append(f"{folder}/{rel}: missing")
            continue
        sha = hashlib.sha256()
        with fs.open(f"{folder}/{rel}", "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                sha.update(chunk)
        if sha.hexdigest() != digest:
            problems.append(f"{folder}/{rel}: checksum mismatch")
    return problems
