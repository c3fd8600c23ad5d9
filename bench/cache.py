"""Cache: wall time of a cold micro run, an unchanged re-run and a γ-only change, each a real `pipeline_flow`.

All three share one artifact root (fresh, empty at the start) and one temporary Prefect server, started once before
the first run so that its start-up is in none of the times. Each time is the flow call's wall time in this process;
the stages' own `seconds` (from the run summary) are reported beside it, so Prefect's share is visible.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import Result, Row

GAMMA_CHANGE = "masks.gamma=0.3"  # micro's default is auto


def timed_flow(root: Path, preset: str, overrides: list[str]) -> dict[str, Any]:
    from pipeline.flows import pipeline_flow

    start = time.perf_counter()
    summary = pipeline_flow(preset=preset, overrides=overrides, artifacts=str(root))
    wall = time.perf_counter() - start
    return {"wall_seconds": wall, "stage_seconds": sum(s["seconds"] for s in summary["stages"]),
            "ran": [s["name"] for s in summary["stages"] if s["status"] == "ran"]}


def run(preset: str = "micro", overrides: list[str] | None = None) -> Result:
    from prefect.testing.utilities import prefect_test_harness

    overrides = overrides or []
    with tempfile.TemporaryDirectory(prefix="sunlearn-bench-cache-") as tmp, \
            prefect_test_harness(server_startup_timeout=180):
        root = Path(tmp)
        cold = timed_flow(root, preset, overrides)
        rerun = timed_flow(root, preset, overrides)
        gamma = timed_flow(root, preset, [*overrides, GAMMA_CHANGE])
    ratio = rerun["wall_seconds"] / cold["wall_seconds"]
    result = Result("cache")
    result.rows = [
        Row("unchanged re-run vs cold run", f"{preset} preset, flow wall time (stages ran: "
            f"{len(rerun['ran'])})", f"{rerun['wall_seconds']:.1f} s", f"{cold['wall_seconds']:.1f} s",
            f"{ratio:.3f}", "≤ 0.10"),
        Row("γ-only change vs cold run", f"{GAMMA_CHANGE}: ran {', '.join(gamma['ran'])}",
            f"{gamma['wall_seconds']:.1f} s", f"{cold['wall_seconds']:.1f} s",
            f"{gamma['wall_seconds'] / cold['wall_seconds']:.3f}", ""),
    ]
    result.ratios = {"rerun_vs_cold": ratio}
    result.details = {"preset": preset, "overrides": overrides, "cold": cold, "rerun": rerun, "gamma_change": gamma,
                      "gamma_vs_cold": gamma["wall_seconds"] / cold["wall_seconds"]}
    return result
