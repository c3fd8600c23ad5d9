"""Per-item results cached per (model weights, eval set), so unchanged weights are never evaluated twice.

The key covers the weights' checksum, the eval set's rows, the tokenizer, the generation settings and the source
of every module the evaluate stage imports. The folder is the artifact cache's shared `eval_cache` (the runner
passes it); without one, nothing is cached.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from stages.code_version import code_version
from stages.common import TOKENIZER_DIR
from stages.config import Config

MANIFEST = "manifest.json"


def weights_checksum(model_dir: Path) -> str:
    """The model folder's file checksums from the manifest of the artifact that holds it, else hashed here."""
    model_dir = Path(model_dir)
    files: dict[str, str] = {}
    if not model_dir.is_symlink():
        for parent in model_dir.parents:  # the artifact's root holds the manifest
            manifest = parent / MANIFEST
            if manifest.is_file():
                prefix = f"{model_dir.relative_to(parent).as_posix()}/"
                recorded = json.loads(manifest.read_text()).get("files", {})
                files = {rel[len(prefix):]: d for rel, d in recorded.items() if rel.startswith(prefix)}
                files = {rel: d for rel, d in files.items() if "/" not in rel}  # the model's own files only
                break
    if not files:
        files = {p.name: _sha256(p) for p in sorted(model_dir.resolve().iterdir()) if p.is_file()}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def context_key(prepare_dir: Path, cfg: Config) -> dict[str, Any]:
    """What, besides the weights and the rows, decides an eval set's per-item results."""
    tokenizer = {p.name: _sha256(p) for p in sorted((Path(prepare_dir) / TOKENIZER_DIR).iterdir()) if p.is_file()}
    return {
        "tokenizer": tokenizer,
        "max_new_tokens": cfg.evaluate.max_new_tokens,
        "retain_eval_items": cfg.evaluate.retain_eval_items,
        "code": code_version(("stages.evaluate",)),
    }


def cache_path(root: Path, checksum: str, name: str, rows: list[dict[str, Any]], context: dict[str, Any]) -> Path:
    payload = {"set": name, "rows": [{k: v for k, v in r.items() if k != "gold"} for r in rows], "context": context}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(root) / checksum / f"{name}-{key}" / "item_scores.parquet"
