"""Trained methods cached per (method, its parameters, the unlearn settings, and the data, weights and mask it
reads), under a folder every unlearn artifact shares: a run that adds a method trains only that one, and a change
of γ retrains only the methods that read the mask.

Each entry holds the method's final model, its snapshots and its log rows and stats (result.json, written last);
an entry without result.json is incomplete and never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from schemas import write_json_atomic
from stages.code_version import code_version
from stages.config import Config
from stages.unlearn.methods import MethodSpec

RESULT = "result.json"
# unlearn settings that choose which methods run, not how one trains
NOT_TRAINING = ("methods", "params")


def _folder_digest(folder: Path, prefix: str = "") -> str:
    """Checksums of an artifact's files under `prefix`, from its manifest when it has one, else hashed here."""
    folder = Path(folder)
    manifest = folder / "manifest.json"
    if manifest.is_file():
        files = {rel: d for rel, d in json.loads(manifest.read_text()).get("files", {}).items()
                 if rel.startswith(prefix)}
    else:
        root = folder / prefix if prefix else folder
        paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        files = {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def method_key(cfg: Config, spec: MethodSpec, inputs: dict[str, Path], target_dir: str) -> str:
    """What decides one method's trained weights: its name and parameters, the unlearn settings, the tokenised
    documents, the target's weights, the mask when the method reads one, and the unlearn code."""
    unlearn = {k: v for k, v in cfg.section("unlearn").items() if k not in NOT_TRAINING}
    payload = {
        "method": spec.name,
        "params": spec.params,
        "unlearn": unlearn,
        "documents": _folder_digest(inputs["prepare"]),
        "target": _folder_digest(inputs["target"], f"{target_dir}/"),
        "masks": _folder_digest(inputs["masks"], "masks.parquet") if spec.selective else None,
        "code": code_version(("stages.unlearn",)),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def restore(entry: Path, out: Path, name: str) -> dict[str, Any] | None:
    """Link a cached method's model and snapshots into `out`; its log rows and stats, or None when not cached."""
    result = entry / RESULT
    if not result.is_file():
        return None
    shutil.copytree(entry / "model", out / name, copy_function=os.link)
    if (entry / "snapshots").is_dir():
        shutil.copytree(entry / "snapshots", out / "snapshots" / name, copy_function=os.link)
    return json.loads(result.read_text())


def store(entry: Path, out: Path, name: str, rows: list[dict], stats: dict[str, Any]) -> None:
    """Publish a trained method's files as a cache entry: linked into a temporary folder, renamed into place."""
    if (entry / RESULT).is_file():
        return
    tmp = entry.with_name(f".tmp-{entry.name}-{uuid.uuid4().hex[:6]}")
    shutil.copytree(out / name, tmp / "model", copy_function=os.link)
    if (out / "snapshots" / name).is_dir():
        shutil.copytree(out / "snapshots" / name, tmp / "snapshots", copy_function=os.link)
    write_json_atomic(tmp / RESULT, {"rows": rows, "stats": stats})
    entry.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, entry)
    except OSError:  # another run published the same method first
        shutil.rmtree(tmp, ignore_errors=True)
