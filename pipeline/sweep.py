"""`sunlearn sweep`: a grid of config values as one Prefect flow, one metrics table.

Each grid point is an ordinary pipeline run, so every stage upstream of what the point changes is reused from the
cache (a γ sweep trains the target and the assistants once). Seeds are a grid key like any other
(`unlearn.seed=0,1,2`); the summary reports the mean and spread over every key named in `--seeds-key`.

`run_points` runs a list of points (each a list of `key=value` overrides) three ways: one after the other in this
process; `parallel` at a time in local worker processes (the cache's file locks compute each artifact once); or,
against a Prefect server, as flow runs of the `pipeline` deployment that any worker of the pool takes. A failed point
is reported by name and the others still count.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from pipeline import storage
from pipeline.cache import fingerprint
from pipeline.confinement import load_confined
from pipeline.dag import ORDER
from pipeline.flows import DEFAULT_ARTIFACTS, run_stages
from pipeline.workers import failed, in_worker_processes, point_metrics
from schemas import write_json_atomic, write_table
from stages.config import ConfigError, load_config

PIPELINE_DEPLOYMENT = "sunlearn-pipeline/pipeline"
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

log = logging.getLogger("sunlearn")


@dataclass
class PointResult:
    """One grid point's outcome: its metrics rows when it completed, its error when not."""

    name: str  # the point's overrides joined, as logs and the failure list name it
    overrides: list[str]
    state: str  # COMPLETED, FAILED, CRASHED or CANCELLED
    metrics: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    flow_run_id: str | None = None  # set when the point ran as a flow run of the pipeline deployment
    worker: str | None = None  # the Prefect worker that ran it


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """['masks.gamma=0.3,0.5', 'unlearn.seed=0,1'] -> {'masks.gamma': ['0.3', '0.5'], ...}"""
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not values.strip():
            raise ConfigError(f"--grid expects key=v1,v2,..., got {item!r}")
        grid[key.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return grid


def grid_points(grid: dict[str, list[str]]) -> list[dict[str, str]]:
    keys = list(grid)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*(grid[k] for k in keys))]


def point_name(point: list[str]) -> str:
    return ",".join(point) or "(defaults)"


def server_configured() -> bool:
    """True when a Prefect server is named (PREFECT_API_URL): then points go to the work pool by default."""
    return bool(os.environ.get("PREFECT_API_URL"))


def run_points(
    points: list[list[str]],
    preset: str = "embedded",
    overrides: list[str] | None = None,
    artifacts: str = DEFAULT_ARTIFACTS,
    config_file: str | None = None,
    parallel: int = 1,
    via_deployment: bool = False,
) -> list[PointResult]:
    """Run every point (its `key=value` overrides after the common `overrides`); one result per point, in order.

    Every point's config is validated before any work starts. `parallel` is the number of points at once: local
    worker processes, or with `via_deployment` flow runs of the pipeline deployment in flight.
    """
    if parallel < 1:
        raise ConfigError(f"--parallel must be at least 1, got {parallel}")
    full = [[*(overrides or []), *point] for point in points]
    for point in full:
        load_config(preset, config_file, point)
    if not storage.is_remote(artifacts):  # every process, on every node, must mean the same folder
        artifacts = str(storage.local_root(artifacts))
    progress = PointProgress([point_name(point) for point in points])
    if via_deployment:
        outcomes = _on_the_pool(full, preset, artifacts, config_file, parallel, on_done=progress)
    elif parallel > 1:
        outcomes = in_worker_processes(full, preset, artifacts, config_file, parallel, on_done=progress)
    else:
        outcomes = []
        for i, point in enumerate(full):
            outcomes.append(_here(point, preset, artifacts, config_file))
            progress(i, outcomes[-1])
    return [
        PointResult(point_name(point), point, **outcome) for point, outcome in zip(points, outcomes, strict=True)
    ]


class PointProgress:
    """A log line per finished point: which one, how it ended, how many have finished, the time so far."""

    def __init__(self, names: list[str]):
        self.names, self.finished, self.failed, self.start = names, 0, 0, time.perf_counter()

    def __call__(self, i: int, outcome: dict[str, Any]) -> None:
        self.finished += 1
        self.failed += outcome["state"] != "COMPLETED"
        failed = f", {self.failed} failed" if self.failed else ""
        ok = outcome["state"] == "COMPLETED"
        state = outcome["state"] if ok else f"{outcome['state']} ({outcome.get('error', 'no error recorded')})"
        log.log(logging.INFO if ok else logging.WARNING, "point %d/%d %s: %s (%d of %d finished%s, %.1f min)",
                i + 1, len(self.names), self.names[i], state, self.finished, len(self.names), failed,
                (time.perf_counter() - self.start) / 60)


def _here(point: list[str], preset: str, artifacts: str, config_file: str | None) -> dict[str, Any]:
    try:
        summary = run_stages(load_config(preset, config_file, point), ORDER, artifacts, set())
    except Exception as exc:  # a failed point is reported; the others still run
        return failed(exc)
    return {"state": "COMPLETED", "metrics": summary["metrics"]}


def _on_the_pool(
    points: list[list[str]], preset: str, artifacts: str, config_file: str | None, parallel: int, poll: float = 2.0,
    on_done: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Each point a flow run of the pipeline deployment, at most `parallel` in flight; wait for all of them."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.exceptions import ObjectNotFound

    parameters = {"preset": preset, "artifacts": artifacts}
    if config_file is not None:
        parameters["config_file"] = config_file
    pending = list(range(len(points)))
    running: dict[int, Any] = {}
    outcomes: list[dict[str, Any]] = [{} for _ in points]
    with get_client(sync_client=True) as client:
        while pending or running:
            while pending and len(running) < parallel:
                i = pending.pop(0)
                try:
                    running[i] = run_deployment(PIPELINE_DEPLOYMENT, parameters={**parameters, "overrides": points[i]},
                                                flow_run_name=f"point-{point_name(points[i])}", timeout=0)
                except ObjectNotFound:
                    raise ConfigError(f"the Prefect server has no deployment {PIPELINE_DEPLOYMENT}: start one with "
                                      "`sunlearn serve`, deploy with `prefect deploy --all`, or unset "
                                      "PREFECT_API_URL to run the points here") from None
            time.sleep(poll)
            for i, flow_run in list(running.items()):
                flow_run = client.read_flow_run(flow_run.id)
                if flow_run.state is None or flow_run.state.type.value not in FINAL_STATES:
                    continue
                del running[i]
                state = flow_run.state.type.value
                outcome = {"state": state, "flow_run_id": str(flow_run.id),
                           "worker": flow_run.labels.get("prefect.worker.name")}
                if state == "COMPLETED":
                    try:
                        outcome["metrics"] = point_metrics(preset, config_file, points[i], artifacts)
                    except Exception as exc:
                        outcome.update(failed(exc))
                else:
                    outcome["error"] = f"flow run {flow_run.name}: {state}: {flow_run.state.message or ''}".strip()
                outcomes[i] = outcome
                if on_done is not None:
                    on_done(i, outcome)
    return outcomes


def summarise(frame: pl.DataFrame, over: str | None) -> pl.DataFrame:
    """Mean, std and count of each (model, metric, grid point without `over`)."""
    keys = [c for c in frame.columns if c.startswith("grid.") and c != f"grid.{over}"]
    return (
        frame.group_by(["model", "metric", *keys], maintain_order=True)
        .agg(pl.col("value").mean().alias("mean"), pl.col("value").std().alias("std"), pl.len().alias("n"))
        .sort(["metric", *keys, "model"])
    )


@flow(name="sunlearn-sweep", log_prints=True)
def sweep_flow(
    grid: list[str],
    preset: str = "embedded",
    overrides: list[str] | None = None,
    artifacts: str = DEFAULT_ARTIFACTS,
    seeds_key: str | None = "unlearn.seed",
    config_file: str | None = None,
    parallel: int = 1,
    via_deployment: bool | None = None,
) -> dict[str, Any]:
    """The grid's points, `parallel` at a time; `via_deployment` (default: when PREFECT_API_URL is set) sends each
    to the work pool as a flow run of the pipeline deployment."""
    logger = get_run_logger()
    parsed = parse_grid(grid)
    points = grid_points(parsed)
    for point in points:  # validate (and confine) every point before any work starts
        load_confined(preset, config_file, [*(overrides or []), *(f"{k}={v}" for k, v in point.items())], artifacts)
    via = server_configured() if via_deployment is None else via_deployment
    logger.info("sweep: %d points, %d at a time, %s", len(points), parallel,
                f"as flow runs of {PIPELINE_DEPLOYMENT}" if via else "on this machine")
    results = run_points([[f"{k}={v}" for k, v in point.items()] for point in points], preset, overrides,
                         artifacts, config_file, parallel, via)
    failed = [{"point": r.name, "state": r.state, "error": r.error} for r in results if r.state != "COMPLETED"]
    for f in failed:
        logger.error("sweep point %s %s: %s", f["point"], f["state"], f["error"])
    rows = [{**m, "point": i, **{f"grid.{k}": v for k, v in point.items()}}
            for i, (point, r) in enumerate(zip(points, results, strict=True)) for m in r.metrics]
    if not rows:
        raise RuntimeError(f"every sweep point failed; first: {failed[0]['point']}: {failed[0]['error']}")
    frame = pl.DataFrame(rows)
    key = fingerprint({"grid": parsed, "preset": preset, "overrides": overrides})
    out = storage.local_root(artifacts) / "sweeps" / key
    out.mkdir(parents=True, exist_ok=True)
    write_table(
        pa.table({
            "point": frame["point"].to_list(),
            "params": [json.dumps({k[5:]: r[k] for k in r if k.startswith("grid.")}) for r in rows],
            "model": frame["model"].to_list(),
            "step": frame["step"].to_list(),
            "metric": frame["metric"].to_list(),
            "value": frame["value"].to_list(),
        }),
        out / "sweep_metrics.parquet",
    )
    final = frame.filter(pl.col("step") == pl.col("step").max().over(["point", "model"]))
    summary_frame = summarise(final.drop("point", "step"), seeds_key if seeds_key in parsed else None)
    write_json_atomic(out / "summary.json", summary_frame.to_dicts())
    write_json_atomic(out / "points.json", [vars(r) | {"metrics": len(r.metrics)} for r in results])
    location = storage.put_tree(artifacts, f"sweeps/{key}", out)
    markdown = _markdown(summary_frame)
    if failed:
        markdown += "\n\nFailed points:\n" + "\n".join(f"- `{f['point']}`: {f['error']}" for f in failed)
    create_markdown_artifact(key="sweep-summary", markdown=markdown, description="sunlearn sweep")
    return {"path": location, "points": points, "rows": rows, "summary": summary_frame.to_dicts(), "failed": failed,
            "results": [vars(r) for r in results]}


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The sweep summary as aligned text: one line per (metric, grid point, model)."""
    if not rows:
        return "(no metrics)"
    cols = list(rows[0])
    cells = [[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _markdown(frame: pl.DataFrame) -> str:
    cols = frame.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in frame.iter_rows():
        lines.append("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


@flow(name="sunlearn-study", log_prints=True)
def study_flow(file: str, artifacts: str = DEFAULT_ARTIFACTS, out_dir: str | None = None, parallel: int = 1,
               via_deployment: bool | None = None) -> dict[str, Any]:
    """Every run of a study file through run_points (so `parallel` and the pool work as for a sweep), then its
    results page, also published as a `study-<name>` artifact. A run that diverged is a result and goes on the page;
    other failed runs are named, the page shows the rest and `sunlearn study --check` calls it stale."""
    import time

    from pipeline.study import RESULTS_DIR, load_study, point_fingerprints, study_points, to_compute, write_results
    from stages.unlearn import UnlearnDiverged

    start = time.time()
    study = load_study(file)
    points = study_points(study)
    for point in points:  # confined like a pipeline run, before any work
        load_confined(study.preset, None, point.overrides, artifacts)
    via = server_configured() if via_deployment is None else via_deployment
    get_run_logger().info("study %s: %d runs, %d at a time; %s", study.name, len(points), parallel,
                          to_compute(study, points, artifacts))
    outcomes = run_points([p.overrides for p in points], study.preset, None, artifacts, None, parallel, via)
    cache = storage.local_cache(artifacts)
    results, diverged, failed = [], [], []
    for point, outcome in zip(points, outcomes, strict=True):
        fps = point_fingerprints(study, point)
        if outcome.state != "COMPLETED" and f"{UnlearnDiverged.__name__}: " in outcome.error:
            diverged.append({"point": point, "fingerprints": fps, "error": outcome.error})
            continue
        if outcome.state != "COMPLETED":
            failed.append(f"{outcome.name}: {outcome.error}")
            continue
        entries = {stage: cache.entry(stage, fp) for stage, fp in fps.items()}
        for stage in ("prepare", "masks", "evaluate"):  # what the page reads beyond the metrics
            with cache.lock(entries[stage]):
                storage.fetch(artifacts, entries[stage])
        results.append({"point": point, "metrics": outcome.metrics, "fingerprints": fps,
                        "paths": {stage: str(entry.path) for stage, entry in entries.items()},
                        "masks": entries["masks"].manifest().get("stats", {})})
    if not results:
        first = failed[0] if failed else f"{' '.join(diverged[0]['point'].overrides)}: {diverged[0]['error']}"
        raise RuntimeError(f"every run of study {study.name} failed; first: {first}")
    page = write_results(study, results, time.time() - start, Path(out_dir) if out_dir else RESULTS_DIR, failed,
                         diverged)
    create_markdown_artifact(key=f"study-{study.name.replace('_', '-')}", markdown=page.read_text(),
                             description=f"sunlearn study {study.name}")
    return {"page": str(page), "failed": failed}
