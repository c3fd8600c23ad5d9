"""A sweep fanned out over a work pool: a real server, two process workers, each grid point a flow run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from test_server import REPO, _manifests, prefect_client, sunlearn_serve

from pipeline.dag import ORDER

pytestmark = pytest.mark.slow

GRID = ["--grid", "masks.gamma=0.3,0.5", "--grid", "unlearn.seed=0,1"]
COMMON = ["--preset", "micro", "--set", "evaluate.max_new_tokens=4"]


def _sweep(root: Path, *extra: str, env: dict[str, str] | None = None) -> dict:
    return _sweep_with_log(root, *extra, env=env)[0]


def _sweep_with_log(root: Path, *extra: str, env: dict[str, str] | None = None,
                    grid: list[str] = GRID) -> tuple[dict, str]:
    cmd = [sys.executable, "-m", "pipeline.cli", "sweep", *COMMON, *grid, "--artifacts", str(root), "--json", *extra]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env or dict(os.environ))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _table(result: dict) -> list[tuple]:
    table = pq.read_table(Path(result["path"]) / "sweep_metrics.parquet").to_pylist()
    return sorted((r["point"], r["params"], r["model"], r["metric"], r["value"]) for r in table)


@pytest.mark.timeout(1200)
def test_sweep_points_run_as_flow_runs_on_two_workers(tmp_path):
    root = tmp_path / "pool"
    with sunlearn_serve(tmp_path, root, "--workers", "2") as (_, api_url, _):
        env = {**os.environ, "PREFECT_API_URL": api_url}
        pooled = _sweep(root, "--parallel", "4", env=env)
        with prefect_client(api_url) as client:
            from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName, FlowRunFilter

            by_deployment = DeploymentFilter(name=DeploymentFilterName(any_=["pipeline"]))
            runs = client.read_flow_runs(deployment_filter=by_deployment)
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [r.id for r in runs]}))
    assert pooled["failed"] == []
    assert len(runs) == 4 and {r.state.type.value for r in runs} == {"COMPLETED"}
    workers = Counter(r.labels.get("prefect.worker.name") for r in runs)
    assert len(workers) == 2 and None not in workers, workers
    # each artifact computed once: one task run that really ran per cache entry, every other one reused it
    ran = Counter(t.name for t in task_runs if t.state.name == "Completed")
    entries = {stage: len(v) for stage, v in _manifests(root).items()}
    assert entries == {"prepare": 1, "target": 1, "assistants": 1, "scores": 1, "masks": 2, "unlearn": 4,
                       "evaluate": 4}
    assert {s: ran[s] for s in ORDER} == entries

    sequential = _sweep(tmp_path / "sequential")
    assert _table(pooled) == _table(sequential) and len(_table(pooled)) > 0


@pytest.mark.timeout(1200)
def test_local_workers_compute_each_artifact_once_and_evaluate_the_references_once(tmp_path):
    """Without a server, --parallel 2 runs the points in two worker processes: each artifact exists once, each
    reference result was computed by one worker, and the workers log no Prefect warning. (That the table equals one
    worker's is checked by the quick bench's sweep_parallel, in tests/test_bench.py.)"""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    local, log = _sweep_with_log(tmp_path / "local", "--parallel", "2", env=env, grid=["--grid", "unlearn.seed=0,1"])
    assert local["failed"] == [] and len(_table(local)) > 0
    entries = {stage: len(v) for stage, v in _manifests(tmp_path / "local").items()}
    assert entries == {"prepare": 1, "target": 1, "assistants": 1, "scores": 1, "masks": 1, "unlearn": 2,
                       "evaluate": 2}
    computed = Counter(line.split(" evaluated in ")[0].split("reference ", 1)[1]
                       for line in log.splitlines() if "reference " in line and " evaluated in " in line)
    assert computed and set(computed.values()) == {1}, computed  # every (model, set) once, by one of the workers
    assert "attempted to send logs to the API" not in log
    # each worker's lines name their point; the sweep logs each point as it finishes
    assert all(line.split(" - ", 1)[-1].startswith(("[1/2] ", "[2/2] "))
               for line in log.splitlines() if " evaluated in " in line)
    assert sum(f"({k} of 2 finished, " in log for k in (1, 2)) == 2


def test_workers_do_not_import_the_parents_main_module_again(tmp_path):
    """spawn imports the parent's __main__ again in every child, and the `sunlearn` script's is pipeline.cli, which
    brings Prefect. Under main_hidden (the pool's start in in_worker_processes) a spawned child has no Prefect; the
    same pool started without it, the control, has."""
    script = tmp_path / "main.py"
    script.write_text(
        "import multiprocessing\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "import prefect  # as pipeline.cli imports it\n"
        "from pipeline.workers import main_hidden\n"
        "PROBE = \"'prefect' in __import__('sys').modules\"\n"
        "def child_has_prefect(hidden):\n"
        "    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context('spawn')) as pool:\n"
        "        if not hidden:\n"
        "            return pool.submit(eval, PROBE).result()\n"
        "        with main_hidden():\n"
        "            future = pool.submit(eval, PROBE)\n"
        "        return future.result()\n"
        "if __name__ == '__main__':\n"
        "    print(child_has_prefect(True), child_has_prefect(False))\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["False", "True"]
