"""The micro flow end to end on real components, and what the cache recomputes."""

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cache import ArtifactCache
from pipeline.dag import ORDER
from pipeline.flows import pipeline_flow, stage_flow

pytestmark = pytest.mark.slow


def _ran(summary):
    return [s["name"] for s in summary["stages"] if s["status"] == "ran"]


@pytest.fixture(scope="module")
def micro_root(tmp_path_factory, prefect_harness):
    root = tmp_path_factory.mktemp("artifacts")
    state = pipeline_flow(preset="micro", artifacts=str(root), return_state=True)
    first = state.result()
    first["flow_run_id"] = state.state_details.flow_run_id
    return root, first


def test_micro_flow_runs_end_to_end(micro_root):
    root, first = micro_root
    assert _ran(first) == ORDER
    assert [s["name"] for s in first["stages"]] == ORDER
    models = {m["model"] for m in first["metrics"]}
    assert models == {"target", "retain", "su", "graddiff"}
    names = {m["metric"] for m in first["metrics"]}
    for metric in ("forget_quality", "model_utility", "forget_rouge", "retain_rouge", "forget_prob", "retain_prob",
                   "forget_truth_ratio"):
        assert metric in names
    assert all(ArtifactCache(root).entry(s["name"], s["fingerprint"]).verify() == [] for s in first["stages"])


def test_independent_stages_overlap_and_the_graph_shows_the_dag(micro_root):
    """From the API's task runs: target ran while assistants ran, and each stage waited on exactly its upstream."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from pipeline.dag import STAGES

    _, first = micro_root
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[first["flow_run_id"]])))
    by_name = {run.name: run for run in runs}
    assert set(by_name) == set(ORDER)
    target, assistants = by_name["target"], by_name["assistants"]
    assert target.start_time < assistants.end_time and assistants.start_time < target.end_time
    assert by_name["prepare"].end_time <= min(target.start_time, assistants.start_time)
    ids = {run.id: name for name, run in by_name.items()}
    for name, run in by_name.items():
        waited = {ids[dep.id] for dep in run.task_inputs.get("wait_for", [])}
        assert waited == set(STAGES[name].upstream), name


def test_second_run_recomputes_nothing(micro_root):
    root, first = micro_root
    second = pipeline_flow(preset="micro", artifacts=str(root))
    assert _ran(second) == []
    assert [s["status"] for s in second["stages"]] == ["cached"] * len(ORDER)
    assert [s["path"] for s in second["stages"]] == [s["path"] for s in first["stages"]]
    assert second["metrics"] == first["metrics"]


def test_gamma_change_recomputes_only_masks_unlearn_evaluate(micro_root):
    root, _ = micro_root
    # a γ no other test of this module runs, so the outcome does not depend on test order
    changed = pipeline_flow(preset="micro", overrides=["masks.gamma=0.15"], artifacts=str(root))
    assert _ran(changed) == ["masks", "unlearn", "evaluate"]


def test_force_recomputes_the_stage_and_downstream(micro_root):
    root, _ = micro_root
    forced = pipeline_flow(preset="micro", artifacts=str(root), force="scores")
    assert _ran(forced) == ["scores", "masks", "unlearn", "evaluate"]


def test_stage_flow_recomputes_only_that_stage(micro_root):
    root, _ = micro_root
    summary = stage_flow(stage="masks", preset="micro", artifacts=str(root))
    assert _ran(summary) == ["masks"]
    assert [s["name"] for s in summary["stages"]] == ["prepare", "assistants", "scores", "masks"]


def test_cli_json_and_status(micro_root):
    root, _ = micro_root
    env = dict(os.environ)  # the CLI starts its own temporary Prefect server
    cmd = [sys.executable, "-m", "pipeline.cli"]
    proc = subprocess.run([*cmd, "run", "--preset", "micro", "--json", "--artifacts", str(root)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout)
    assert [s["status"] for s in summary["stages"]] == ["cached"] * len(ORDER)
    assert set(summary["stages"][0]) == {"name", "status", "seconds", "path"}
    assert {m["model"] for m in summary["metrics"]} == {"target", "retain", "su", "graddiff"}
    status = subprocess.run([*cmd, "status", "--preset", "micro", "--json", "--artifacts", str(root)],
                            capture_output=True, text=True, env=env, timeout=120)
    assert [s["state"] for s in json.loads(status.stdout)["stages"]] == ["cached"] * len(ORDER)


def test_a_failed_sweep_point_is_logged_with_its_error_and_the_rest_still_count(micro_root, caplog):
    from pipeline.sweep import sweep_flow

    root, _ = micro_root
    with caplog.at_level(logging.INFO, logger="sunlearn"):  # 0.001 diverges at the first step; 50 is the default
        result = sweep_flow(grid=["unlearn.max_forget_loss=0.001,50.0"], preset="micro", artifacts=str(root))
    assert [f["point"] for f in result["failed"]] == ["unlearn.max_forget_loss=0.001"]
    assert {r["point"] for r in result["rows"]} == {1}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "point 1/2" in r.getMessage()]
    assert len(warned) == 1 and "UnlearnDiverged" in warned[0] and "max_forget_loss" in warned[0], caplog.text


def test_sweep_reuses_upstream_and_collects_one_table(micro_root):
    from pipeline.sweep import sweep_flow
    from schemas import read_table

    root, _ = micro_root
    result = sweep_flow(grid=["masks.gamma=0.2,0.4", "unlearn.seed=0,1"], preset="micro", artifacts=str(root))
    assert len(result["points"]) == 4
    table = read_table(Path(result["path"]) / "sweep_metrics.parquet").to_pydict()
    assert sorted(set(table["point"])) == [0, 1, 2, 3]
    # only masks, unlearn and evaluate differ between points: one target and one assistants artifact serve all
    for stage in ("target", "assistants"):
        assert len([p for p in (root / stage).iterdir() if not p.name.startswith(".")]) == 1
    mu = [r for r in result["summary"] if r["metric"] == "model_utility" and r["model"] == "su"]
    assert len(mu) == 2 and all(r["n"] == 2 for r in mu)  # mean over the two seeds, per gamma
