"""What changed since the last pipeline run of the same config: forget requests added or withdrawn, input files
edited, stages recomputed. A scheduled run's summary and its Prefect markdown artifact say it.

Each run of a config leaves `<artifact root>/runs/<config fingerprint>.json` (written after the run succeeded, so a
failed run changes nothing); the next run of the same config compares itself with it.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.cache import fingerprint
from pipeline.dag import prepare_inputs
from schemas import write_json_atomic
from stages.config import Config

RUNS_DIR = "runs"


def run_record_path(cfg: Config, artifacts: str | Path) -> Path:
    return storage.local_root(artifacts) / RUNS_DIR / f"{fingerprint(cfg.to_dict())}.json"


def record_and_compare(cfg: Config, artifacts: str | Path, stages: list[dict[str, Any]]) -> dict[str, Any]:
    """This run's changes against the last run of the same config; records this run for the next one."""
    path = run_record_path(cfg, artifacts)
    try:
        previous = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        previous = None
    by_name = {s["name"]: s for s in stages}
    current = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "forget_ids": by_name.get("prepare", {}).get("stats", {}).get("forget_ids"),
        "inputs": prepare_inputs(cfg),
        "stages": {s["name"]: s["fingerprint"] for s in stages},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, current)
    return compare(previous, current, [s["name"] for s in stages if s["status"] == "ran"])


def compare(previous: dict[str, Any] | None, current: dict[str, Any], recomputed: list[str]) -> dict[str, Any]:
    """The change set: requests added and withdrawn (files source), input files edited, added or removed."""
    before = previous or {}
    old_ids, new_ids = before.get("forget_ids") or [], current.get("forget_ids") or []
    old_files, new_files = before.get("inputs", {}).get("files", {}), current["inputs"]["files"]
    old_hub, new_hub = before.get("inputs", {}).get("hub", {}), current["inputs"]["hub"]
    return {
        "previous_run": before.get("time"),
        "requests_added": [i for i in new_ids if i not in set(old_ids)] if previous else [],
        "requests_withdrawn": [i for i in old_ids if i not in set(new_ids)],
        "forget_requests": len(new_ids),
        "inputs_changed": sorted(p for p in set(old_files) | set(new_files) if old_files.get(p) != new_files.get(p))
        if previous else [],
        "hub_revisions_changed": {d: [old_hub.get(d), c] for d, c in new_hub.items() if previous and
                                  old_hub.get(d) != c},
        "recomputed": recomputed,
    }


def changes_lines(changes: dict[str, Any]) -> list[str]:
    """The change set as short lines, for the console and the markdown artifact."""
    if changes["previous_run"] is None:
        lines = ["first run of this config"]
    else:
        lines = [f"since the last run ({changes['previous_run']}):"]
        added, withdrawn = changes["requests_added"], changes["requests_withdrawn"]
        lines.append(f"requests added: {len(added)}" + (f" ({', '.join(added)})" if added else ""))
        if withdrawn:
            lines.append(f"requests withdrawn: {len(withdrawn)} ({', '.join(withdrawn)})")
        if changes["inputs_changed"]:
            lines.append(f"input files changed: {', '.join(changes['inputs_changed'])}")
        for dataset, (old, new) in changes["hub_revisions_changed"].items():
            lines.append(f"hub dataset {dataset}: revision {old} -> {new}")
    if changes["forget_requests"]:
        lines.append(f"forget requests honoured: {changes['forget_requests']}")
    recomputed = changes["recomputed"]
    lines.append(f"stages recomputed: {', '.join(recomputed) if recomputed else 'none (all cached)'}")
    return lines


def changes_markdown(changes: dict[str, Any]) -> str:
    lines = changes_lines(changes)
    return "\n".join(["# What changed", "", *(f"- {line}" for line in lines)])
