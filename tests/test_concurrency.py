"""Two real `sunlearn run` processes on one artifact root: each artifact is computed once, the other run reuses it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.cache import ArtifactCache
from pipeline.dag import ORDER

pytestmark = pytest.mark.slow


def test_two_runs_at_once_compute_each_artifact_once(tmp_path):
    root = tmp_path / "artifacts"
    # each process starts its own temporary Prefect server, as two users' `sunlearn run` would
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--preset", "micro", "--json", "--set",
           "evaluate.max_new_tokens=4", "--artifacts", str(root)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [proc.communicate(timeout=600) for proc in procs]
    for proc, (_, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
    summaries = [{s["name"]: s for s in json.loads(stdout)["stages"]} for stdout, _ in outputs]

    cache = ArtifactCache(root)
    for stage in ORDER:
        # one complete folder per stage, the same one in both summaries
        folders = [p for p in (root / stage).iterdir() if not p.name.startswith(".")]
        assert len(folders) == 1 and all(s[stage]["path"] == str(folders[0]) for s in summaries)
        assert sorted(s[stage]["status"] for s in summaries) == ["cached", "ran"], stage
        assert not list((root / stage).glob(".tmp-*"))
    assert all(entry.verify(full=True) == [] for entry in cache.entries(ORDER))
