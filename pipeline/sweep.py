"""`sunlearn sweep`: a grid of config values as one Prefect flow, one metrics table.

Each grid point is an ordinary pipeline run, so every stage upstream of what the point changes is reused from the
cache (a γ sweep trains the target and the assistants once). Seeds are a grid key like any other
(`unlearn.seed=0,1,2`); the summary reports the mean and spread over every key named in `--seeds-key`.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from pipeline.cache import fingerprint
from pipeline.confinement import load_confined
from pipeline.dag import ORDER
from pipeline.flows import DEFAULT_ARTIFACTS, run_stages
from schemas import write_json_atomic, write_table
from stages.config import ConfigError, load_config


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
) -> dict[str, Any]:
    logger = get_run_logger()
    parsed = parse_grid(grid)
    points = grid_points(parsed)
    for point in points:  # validate (and confine) every point before any work starts
        load_confined(preset, config_file, [*(overrides or []), *(f"{k}={v}" for k, v in point.items())], artifacts)
    rows: list[dict[str, Any]] = []
    for i, point in enumerate(points, 1):
        logger.info("sweep point %d/%d: %s", i, len(points), point)
        cfg = load_config(preset, config_file, [*(overrides or []), *(f"{k}={v}" for k, v in point.items())])
        summary = run_stages(cfg, ORDER, artifacts, set())
        rows += [{**m, "point": i - 1, **{f"grid.{k}": v for k, v in point.items()}} for m in summary["metrics"]]
    frame = pl.DataFrame(rows)
    out = Path(artifacts) / "sweeps" / fingerprint({"grid": parsed, "preset": preset, "overrides": overrides})
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
    create_markdown_artifact(key="sweep-summary", markdown=_markdown(summary_frame), description="sunlearn sweep")
    return {"path": str(out), "points": points, "rows": rows, "summary": summary_frame.to_dicts()}


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
