"""Prefect flows: the pipeline as seven cached tasks, and single-stage runs.

A run started through the server keeps its paths inside the worker's allowed roots (pipeline/confinement.py).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from stages.environment import configure_environment

configure_environment()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.states import Completed  # noqa: E402

from pipeline.confinement import DEFAULT_ARTIFACTS, load_confined  # noqa: E402
from pipeline.dag import ORDER, STAGES, downstream, upstream_closure  # noqa: E402
from pipeline.reports_artifacts import publish_reports  # noqa: E402
from pipeline.runner import StageResult, materialize  # noqa: E402
from schemas import read_table  # noqa: E402
from stages.config import Config  # noqa: E402


def _summary_markdown(result: StageResult) -> str:
    lines = [f"# {result.name} ({result.status})", "", f"- fingerprint: `{result.fingerprint}`",
             f"- artifact: `{result.path}`", f"- seconds: {result.seconds:.1f}"]
    lines += [f"- input `{name}`: `{path}`" for name, path in result.inputs.items()]
    stats = {k: v for k, v in result.stats.items() if not isinstance(v, dict | list)}
    if stats:
        lines += ["", "| stat | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in stats.items()]]
    return "\n".join(lines)


@task(name="stage", task_run_name="{name}", persist_result=False)
def stage_task(name: str, cfg: Config, artifacts: str, force: bool = False) -> Any:
    """One stage through the cache; a reused stage ends in Prefect's Cached state."""
    result = materialize(name, cfg, artifacts, force)
    get_run_logger().info("%s %s in %.1fs -> %s", name, result.status, result.seconds, result.path)
    create_markdown_artifact(key=f"{name}-summary", markdown=_summary_markdown(result),
                             description=f"sunlearn stage {name}")
    data = asdict(result)
    if result.status == "cached":
        return Completed(name="Cached", data=data, message=f"{name} reused from cache")
    return data


def run_stages(cfg: Config, stages: list[str], artifacts: str, forced: set[str]) -> dict[str, Any]:
    """Submit every stage at once, each waiting for the futures of its upstream stages: independent stages (target
    and assistants) run concurrently and the UI's graph shows the DAG. Results come back in `stages` order."""
    futures: dict[str, Any] = {}
    for name in stages:
        waits = [futures[up] for up in STAGES[name].upstream if up in futures]
        futures[name] = stage_task.submit(name, cfg, artifacts, force=name in forced, wait_for=waits)
    # in run order, so the first error raised is the root failure, not a downstream stage that never started
    results = [futures[name].result() for name in stages]
    metrics: list[dict[str, Any]] = []
    if stages[-1] == "evaluate":
        evaluate_dir = Path(results[-1]["path"])
        metrics = read_table(evaluate_dir / "metrics.parquet").to_pylist()
        create_table_artifact(key="metrics", table=metrics, description="sunlearn metrics (model, metric, value)")
        publish_reports(evaluate_dir)
    return {"stages": results, "metrics": metrics}


@flow(name="sunlearn-pipeline", log_prints=True)
def pipeline_flow(
    preset: str = "embedded",
    overrides: list[str] | None = None,
    artifacts: str = DEFAULT_ARTIFACTS,
    force: str | None = None,
    config_file: str | None = None,
) -> dict[str, Any]:
    """prepare → target → assistants → scores → masks → unlearn → evaluate, each stage cached by fingerprint."""
    cfg = load_confined(preset, config_file, overrides or [], artifacts)
    return run_stages(cfg, ORDER, artifacts, set(downstream(force)) if force else set())


@flow(name="sunlearn-stage", flow_run_name="stage-{stage}", log_prints=True)
def stage_flow(
    stage: str,
    preset: str = "embedded",
    overrides: list[str] | None = None,
    artifacts: str = DEFAULT_ARTIFACTS,
    force: bool = True,
    config_file: str | None = None,
) -> dict[str, Any]:
    """One stage: reuse cached upstream, compute only what is missing, and with `force` recompute this stage."""
    cfg = load_confined(preset, config_file, overrides or [], artifacts)
    return run_stages(cfg, upstream_closure(stage), artifacts, {stage} if force else set())


@flow(name="sunlearn-study", log_prints=True)
def study_flow(file: str, artifacts: str = DEFAULT_ARTIFACTS, out_dir: str | None = None) -> str:
    """Every point of a study file as a pipeline run, then its results page (also a `study-<name>` artifact)."""
    import time

    from pipeline.study import RESULTS_DIR, load_study, study_points, write_results

    start = time.time()
    study = load_study(file)
    points = study_points(study)
    logger = get_run_logger()
    results = []
    for i, point in enumerate(points, 1):
        logger.info("study %s: run %d/%d: %s", study.name, i, len(points), " ".join(point.overrides))
        summary = run_stages(load_confined(study.preset, None, point.overrides, artifacts), ORDER, artifacts, set())
        by_stage = {s["name"]: s for s in summary["stages"]}
        results.append({"metrics": summary["metrics"],
                        "fingerprints": {name: s["fingerprint"] for name, s in by_stage.items()},
                        "paths": {name: s["path"] for name, s in by_stage.items()},
                        "masks": by_stage["masks"]["stats"]})
    page = write_results(study, results, time.time() - start, Path(out_dir) if out_dir else RESULTS_DIR)
    create_markdown_artifact(key=f"study-{study.name.replace('_', '-')}", markdown=page.read_text(),
                             description=f"sunlearn study {study.name}")
    return str(page)
