"""Prefect flows: the pipeline as seven cached tasks, and single-stage runs."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.env import configure_environment

configure_environment()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.states import Completed  # noqa: E402

from pipeline.cache import ArtifactCache, CacheError  # noqa: E402
from pipeline.config import Config, load_config  # noqa: E402
from pipeline.reports_artifacts import publish_reports  # noqa: E402
from pipeline.stages import ORDER, STAGES, downstream, fingerprints, upstream_closure  # noqa: E402
from schemas import read_table  # noqa: E402

DEFAULT_ARTIFACTS = "artifacts"


@dataclass
class StageResult:
    name: str
    status: str  # "ran" | "cached"
    seconds: float
    path: str
    fingerprint: str
    stats: dict[str, Any]


def _summary_markdown(result: StageResult, inputs: dict[str, Path]) -> str:
    lines = [f"# {result.name} ({result.status})", "", f"- fingerprint: `{result.fingerprint}`",
             f"- artifact: `{result.path}`", f"- seconds: {result.seconds:.1f}"]
    lines += [f"- input `{name}`: `{path}`" for name, path in inputs.items()]
    stats = {k: v for k, v in result.stats.items() if not isinstance(v, dict | list)}
    if stats:
        lines += ["", "| stat | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in stats.items()]]
    return "\n".join(lines)


@task(name="stage", task_run_name="{name}", persist_result=False)
def stage_task(name: str, cfg: Config, artifacts: str, force: bool = False) -> Any:
    """Run one stage through the cache. Upstream artifacts must already be complete."""
    logger = get_run_logger()
    spec = STAGES[name]
    fps = fingerprints(cfg)
    cache = ArtifactCache(artifacts)
    entry = cache.entry(name, fps[name]["fingerprint"])
    inputs = {}
    for up in spec.upstream:
        upstream_entry = cache.entry(up, fps[up]["fingerprint"])
        problems = upstream_entry.verify(full=False)
        if problems:
            raise CacheError(f"{name}: upstream {up} artifact is unusable ({problems[0]}); "
                             "run `sunlearn verify --fix` and run again")
        inputs[up] = upstream_entry.path
    start = time.time()
    with cache.lock(entry):
        if entry.is_complete() and not force:
            manifest = entry.manifest()
            status = "cached"
        else:
            logger.info("%s: computing %s", name, entry.path)
            meta = {"config": fps[name]["config"], "upstream": fps[name]["upstream"], "code": fps[name]["code"],
                    "inputs": {k: str(v) for k, v in inputs.items()}}
            manifest = cache.build(entry, lambda tmp: spec.function()(cfg, inputs, tmp), meta)
            status = "ran"
    result = StageResult(name, status, round(time.time() - start, 2), str(entry.path), entry.fingerprint,
                         manifest.get("stats", {}))
    logger.info("%s %s in %.1fs -> %s", name, status, result.seconds, entry.path)
    create_markdown_artifact(key=f"{name}-summary", markdown=_summary_markdown(result, inputs),
                             description=f"sunlearn stage {name}")
    if status == "cached":
        return Completed(name="Cached", data=asdict(result), message=f"{name} reused from cache")
    return asdict(result)


def _metrics(cfg: Config, artifacts: str) -> list[dict[str, Any]]:
    entry = ArtifactCache(artifacts).entry("evaluate", fingerprints(cfg)["evaluate"]["fingerprint"])
    if not entry.is_complete():
        return []
    return read_table(entry.path / "metrics.parquet").to_pylist()


def run_stages(cfg: Config, stages: list[str], artifacts: str, forced: set[str]) -> dict[str, Any]:
    # a cached stage returns a Cached state, so take every result from its state
    results = [stage_task(name, cfg, artifacts, force=name in forced, return_state=True).result() for name in stages]
    metrics = _metrics(cfg, artifacts) if "evaluate" in stages else []
    if metrics:
        create_table_artifact(key="metrics", table=metrics, description="sunlearn metrics (model, metric, value)")
        publish_reports(ArtifactCache(artifacts).entry("evaluate", fingerprints(cfg)["evaluate"]["fingerprint"]).path)
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
    cfg = load_config(preset, config_file, overrides or [])
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
    cfg = load_config(preset, config_file, overrides or [])
    return run_stages(cfg, upstream_closure(stage), artifacts, {stage} if force else set())
