"""What the prepare stage reads from outside the repository: local files and hub datasets, per source.

The prepare fingerprint covers a content hash of every file listed here and the commit each hub dataset resolves to
(pipeline.dag), so editing a data file in place, appending a forget request or moving a hub revision recomputes
prepare and what depends on it.
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from stages.config import ConfigError, DataConfig

COMMIT = re.compile(r"[0-9a-f]{40}")


def input_files(data: DataConfig) -> list[Path]:
    """Every local file the source reads (a folder's files included), in a stable order."""
    from stages import prepare

    if data.source == "files":
        from stages.corpus import input_files as files_source_inputs

        return files_source_inputs(data)
    if data.source == "tofu" and data.path and Path(data.path).expanduser().is_dir():
        folder = Path(data.path).expanduser()
        holdout = folder / prepare.tofu_holdout_file(data)
        return [folder / f"{stem}.json" for stem in prepare.tofu_stems(data).values()] + [holdout] * holdout.is_file()
    if data.source == "muse" and data.path not in (None, "embedded") and Path(data.path).expanduser().is_dir():
        folder = Path(data.path).expanduser()
        return sorted({p for pattern, _, _ in prepare.MUSE_FILES.values() for p in folder.glob(pattern)})
    return []


def hub_datasets(data: DataConfig) -> list[tuple[str, str]]:
    """(dataset id, resolved commit) of every hub dataset the source reads."""
    from stages import prepare
    from stages.corpus import is_local

    default = {"tofu": prepare.TOFU_HUB_ID, "muse": prepare.MUSE_HUB_ID}.get(data.source)
    path = data.path or default
    if data.source == "embedded" or path is None or (data.source, path) == ("muse", "embedded") or is_local(path):
        return []
    return [(path, resolve_revision(path, data.revision))]


@cache
def resolve_revision(dataset_id: str, revision: str | None) -> str:
    """The commit `revision` (default: main) of a hub dataset names now; offline, the one the local hub cache holds.

    Cached per process, so every stage of one run sees the same commit.
    """
    if revision and COMMIT.fullmatch(revision):
        return revision
    try:
        from huggingface_hub import HfApi

        sha = HfApi().dataset_info(dataset_id, revision=revision).sha
        if sha:
            return sha
        reason = "the hub returned no commit"
    except Exception as exc:  # offline, unknown id, auth: fall back to the local cache, else one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    from huggingface_hub.constants import HF_HUB_CACHE

    ref = Path(HF_HUB_CACHE) / f"datasets--{dataset_id.replace('/', '--')}" / "refs" / (revision or "main")
    if ref.is_file():
        return ref.read_text().strip()
    raise ConfigError(f"cannot resolve the revision of hub dataset {dataset_id} ({reason}), and the local hub cache "
                      "has none; set data.revision to a commit")
