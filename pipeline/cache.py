"""Content-addressed artifact cache.

Layout: `<root>/<stage>/<fingerprint>/` holding the stage's files and `manifest.json`. A stage writes into a
temporary sibling folder; the manifest (with a checksum of every file) is written last and the folder is renamed
into place, so a folder without a manifest never counts as complete. A file lock per fingerprint makes concurrent
runs compute each artifact once; it is deleted on release, so no run, failed or not, leaves lock files behind. A
stage may keep resume state (checkpoints) in `<root>/<stage>/.scratch-<fp>/`: it survives a killed run and goes once
the artifact is published.

The root may be shared by many nodes (NFS): a temporary folder is named `.tmp-<fp>-<host>-<pid>-<random>` and holds
a heartbeat file its build touches every `HEARTBEAT_SECONDS`. `clean_stale` removes a folder whose process is dead
on this host, or whose heartbeat is older than `LEASE_SECONDS` (a build on another node that died); never a live
build on another node, whose pid means nothing here.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas import write_json_atomic

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
SCRATCH_PREFIX = ".scratch-"
HEARTBEAT = ".tmp-heartbeat"  # inside a temporary folder; the TMP_PREFIX keeps it out of the manifest
HEARTBEAT_SECONDS = 30.0
LEASE_SECONDS = 600.0  # a heartbeat this old means the build is dead, whatever its host
HOST = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname()) or "localhost"


class CacheError(RuntimeError):
    """A corrupt or unusable cache entry."""


def fingerprint(payload: Any) -> str:
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def input_hashes_file() -> Path:
    """Where content hashes of input files are kept between runs (machine-local: the keys are local paths)."""
    return Path(os.environ.get("SUNLEARN_LOCAL_CACHE", "~/.cache/sunlearn")).expanduser() / "input_hashes.json"


def content_hashes(files: Iterable[Path]) -> dict[str, str]:
    """sha256 of each file by its resolved path, re-read only when its size or mtime changed since it was last hashed.

    A 10 GB corpus costs one stat per run while it is unchanged; an edit in place changes its mtime, so it is read
    again. Hashes are kept in input_hashes_file(), entries of files that no longer exist dropped on each write.
    """
    files = list(files)
    if not files:
        return {}
    store = input_hashes_file()
    store.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(store.with_name(store.name + ".lock")):
        try:
            known = json.loads(store.read_text())
        except (OSError, json.JSONDecodeError):
            known = {}
        out, changed = {}, False
        for file in files:
            path = Path(file).expanduser().resolve()
            if not path.is_file():  # the stage that reads it names it in its error
                out[str(path)] = "missing"
                continue
            st = path.stat()
            key = [st.st_size, st.st_mtime_ns]
            cached = known.get(str(path))
            if cached is None or cached[:2] != key:
                known[str(path)], changed = [*key, file_sha256(path)], True
            out[str(path)] = known[str(path)][2]
        if changed:
            write_json_atomic(store, {p: v for p, v in known.items() if Path(p).is_file()})
    return out


@dataclass(frozen=True)
class Entry:
    stage: str
    fingerprint: str
    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def is_complete(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise CacheError(f"{self.stage} artifact {self.path}: unreadable manifest ({exc})") from exc

    def verify(self, full: bool = True) -> list[str]:
        """Problems with this entry; empty when every file matches its manifest.

        `full=False` re-hashes only files whose size or mtime changed since the manifest was written (cheap enough to
        run before every use of a multi-GB model); `full=True` re-hashes everything (`sunlearn verify`).
        """
        if not self.is_complete():
            return [f"{self.path}: no manifest"]
        try:
            manifest = self.manifest()
            files = manifest["files"]
        except (CacheError, KeyError) as exc:
            return [f"{self.path}: manifest without file list ({exc})"]
        stats = manifest.get("file_stats", {})
        problems = []
        for rel, digest in files.items():
            target = self.path / rel
            if not target.is_file():
                problems.append(f"{target}: missing")
                continue
            st = target.stat()
            unchanged = stats.get(rel) == [st.st_size, st.st_mtime_ns]
            if (full or not unchanged) and file_sha256(target) != digest:
                problems.append(f"{target}: checksum mismatch")
        return problems


def temp_dir(parent: Path, fp: str, host: str = HOST) -> Path:
    """A fresh temporary folder name beside an entry: `.tmp-<fp>-<host>-<pid>-<random>`."""
    return parent / f"{TMP_PREFIX}{fp}-{host}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def temp_owner(tmp: Path) -> tuple[str, int] | None:
    """(host, pid) from a temporary folder's name; None for a name in no known layout."""
    fp, sep, rest = tmp.name[len(TMP_PREFIX):].partition("-")
    parts = rest.rsplit("-", 2)
    if not sep or len(parts) != 3 or not parts[0] or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


@contextmanager
def heartbeat(tmp: Path, every: float = HEARTBEAT_SECONDS) -> Iterator[None]:
    """Touch `tmp/HEARTBEAT` now and every `every` seconds until the block ends, so other nodes see a live build."""
    beat = tmp / HEARTBEAT
    beat.touch()
    stop = threading.Event()

    def refresh() -> None:
        while not stop.wait(every):
            try:
                beat.touch()
            except FileNotFoundError:  # the folder was published or removed
                return

    thread = threading.Thread(target=refresh, name=f"heartbeat-{tmp.name}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        beat.unlink(missing_ok=True)


class ArtifactCache:
    def __init__(self, root: str | Path, host: str = HOST, heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 lease_seconds: float = LEASE_SECONDS):
        self.root = Path(root).expanduser().resolve()
        self.host = host  # whose pids this cache may check: another node's are never tested here
        self.heartbeat_seconds = heartbeat_seconds
        self.lease_seconds = lease_seconds

    def entry(self, stage: str, fp: str) -> Entry:
        return Entry(stage, fp, self.root / stage / fp)

    def scratch(self, entry: Entry) -> Path:
        """A folder for the entry's resume state that outlives a killed run (use it under `lock`)."""
        path = self._scratch_path(entry)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def shared(self, name: str) -> Path:
        """A folder under the root that artifacts of several fingerprints share (content-keyed inside)."""
        path = self.root / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _scratch_path(self, entry: Entry) -> Path:
        return entry.path.parent / f"{SCRATCH_PREFIX}{entry.fingerprint}"

    def _lock_path(self, entry: Entry) -> Path:
        return entry.path.parent / f".{entry.fingerprint}.lock"

    @contextmanager
    def lock(self, entry: Entry) -> Iterator[None]:
        entry.path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(self._lock_path(entry)):
            yield

    def busy(self, entry: Entry) -> bool:
        """Whether another process holds the entry's lock now: a hint for scheduling, stale as soon as it returns."""
        return busy(self._lock_path(entry))

    def build(
        self,
        entry: Entry,
        produce: Callable[[Path], dict[str, Any] | None],
        meta: dict[str, Any],
    ) -> dict[str, Any]:
        """Run `produce(tmp_dir)` and publish its files atomically; returns the manifest."""
        self.clean_stale(entry.path.parent)
        tmp = temp_dir(entry.path.parent, entry.fingerprint, self.host)
        tmp.mkdir(parents=True)
        try:
            start = time.time()
            # the heartbeat runs until the manifest is written: hashing a large model takes a while too
            with heartbeat(tmp, self.heartbeat_seconds):
                stats = produce(tmp) or {}
                paths = [p for p in sorted(tmp.rglob("*")) if p.is_file() and not p.name.startswith(TMP_PREFIX)]
                files = {str(p.relative_to(tmp)): file_sha256(p) for p in paths}
                file_stats = {str(p.relative_to(tmp)): [p.stat().st_size, p.stat().st_mtime_ns] for p in paths}
                manifest = {
                    **meta,
                    "stage": entry.stage,
                    "fingerprint": entry.fingerprint,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "seconds": round(time.time() - start, 3),
                    "stats": stats,
                    "files": files,
                    "file_stats": file_stats,
                }
                write_json_atomic(tmp / MANIFEST, manifest)
            if entry.path.exists():  # an incomplete leftover (no manifest): never trusted, replace it
                shutil.rmtree(entry.path)
            os.rename(tmp, entry.path)
            shutil.rmtree(self._scratch_path(entry), ignore_errors=True)
            return manifest
        except Exception:  # a stage that failed starts over next time; only a kill or Ctrl-C resumes
            shutil.rmtree(self._scratch_path(entry), ignore_errors=True)
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def clean_stale(self, stage_dir: Path) -> None:
        """Remove temporary folders of dead builds: this host's whose pid is gone, anyone's past the lease."""
        if not stage_dir.is_dir():
            return
        for tmp in stage_dir.glob(f"{TMP_PREFIX}*"):
            if tmp.is_dir() and self.is_stale(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    def is_stale(self, tmp: Path) -> bool:
        owner = temp_owner(tmp)
        if owner is not None and owner[0] == self.host and not _pid_alive(owner[1]):
            return True
        try:  # the heartbeat, or for a folder without one (a fetch, an old layout) the folder itself
            beat = (tmp / HEARTBEAT).stat().st_mtime if (tmp / HEARTBEAT).exists() else tmp.stat().st_mtime
        except FileNotFoundError:
            return False
        return time.time() - beat > self.lease_seconds

    def entries(self, stages: Iterable[str]) -> Iterator[Entry]:
        """Every artifact folder (complete or not) of the given stages, skipping temporary folders."""
        for stage in stages:
            stage_dir = self.root / stage
            if stage_dir.is_dir():
                for path in sorted(p for p in stage_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
                    yield Entry(stage, path.name, path)

    def verify_all(self, stages: Iterable[str], fix: bool = False) -> list[dict[str, Any]]:
        """Check every entry; with `fix`, remove corrupt or incomplete ones and stale temporary folders."""
        stages = list(stages)
        if fix:
            for stage in stages:
                self.clean_stale(self.root / stage)
        report = []
        for entry in self.entries(stages):
            problems = entry.verify(full=True)
            if problems and fix:
                shutil.rmtree(entry.path, ignore_errors=True)
            report.append({"stage": entry.stage, "fingerprint": entry.fingerprint, "path": str(entry.path),
                           "ok": not problems, "problems": problems, "removed": bool(problems and fix)})
        return report


_held = threading.local()  # the lock paths this thread holds: taking one again nests instead of deadlocking


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an flock on `path` (blocking) and delete the file when releasing it, even after an error. A thread that
    already holds it holds it once more (the outermost release unlocks), as a process that claimed a stage does when
    it builds it; `busy` still sees it held.

    Deleting a lock file others may wait on is safe because a waiter, once it holds its lock, checks that the file it
    locked is still the one at `path`, and otherwise tries again on the new file.
    """
    held = _held.__dict__.setdefault("paths", set())
    key = os.path.abspath(path)
    if key in held:
        yield
        return
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.path.exists(path) and os.path.samestat(os.fstat(fd), os.stat(path)):
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    held.add(key)
    try:
        yield
    finally:
        held.discard(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)


def busy(path: Path) -> bool:
    """Whether another process holds `exclusive_lock(path)` now: a hint for scheduling, stale once it returns."""
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing the descriptor releases a lock taken on it
    return False


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
