"""Sweep fan-out: wall time of a 4-point micro sweep in 2 local worker processes against 1, in one run
(`sweep_parallel`); `sweep_points` times the same on the embedded preset with the shared upstream already built.

Both runs go through the same path (`pipeline.workers.in_worker_processes`) on fresh artifact roots, so the shared
upstream (prepare, target, assistants, scores) is computed once in each (for `sweep_points`, before the clock) and
the process start-up is in both.
The two tables must be equal: the fan-out changes when points run, never what they compute.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.report import Result, Row

GRID = [[f"masks.gamma={g}", f"unlearn.seed={s}"] for g in ("0.3", "0.5") for s in ("0", "1")]


def timed(root: Path, preset: str, overrides: list[str], workers: int, grid: list[list[str]]) -> tuple[float, list]:
    from pipeline.workers import in_worker_processes

    start = time.perf_counter()
    outcomes = in_worker_processes([[*overrides, *p] for p in grid], preset, str(root), None, workers)
    wall = time.perf_counter() - start
    failed = [o.get("error") for o in outcomes if o["state"] != "COMPLETED"]
    if failed:
        raise RuntimeError(f"sweep point failed with {workers} workers: {failed[0]}")
    return wall, [o["metrics"] for o in outcomes]


# the stages every point of GRID shares; `upstream_cached` builds them before the clock starts
UPSTREAM = ("prepare", "target", "assistants", "scores")


def build_upstream(root: Path, preset: str, overrides: list[str]) -> None:
    from pipeline.runner import materialize
    from stages.config import load_config

    cfg = load_config(preset, None, [*overrides, *GRID[0]])
    for stage in UPSTREAM:
        materialize(stage, cfg, root)


def run(preset: str = "micro", overrides: list[str] | None = None, points: int = len(GRID), pairs: int = 3,
        upstream_cached: bool = False) -> Result:
    """`points` of GRID (the --quick smoke run takes 2: one per worker), timed `pairs` times with 1 worker and then
    2, alternated so that a slow spell of the machine (this VM reports steal time) falls on both; the median pair's
    ratio counts. With `upstream_cached`, each root has the shared upstream before its sweep starts: the points'
    own masks, unlearn and evaluate, and each worker's start, are what is timed."""
    overrides, grid = overrides or [], GRID[:points]
    walls, tables_equal = [], True
    for _ in range(pairs):
        with tempfile.TemporaryDirectory(prefix="sunlearn-bench-sweep-") as tmp:
            if upstream_cached:
                for side in ("one", "two"):
                    build_upstream(Path(tmp) / side, preset, overrides)
            one, one_table = timed(Path(tmp) / "one", preset, overrides, 1, grid)
            two, two_table = timed(Path(tmp) / "two", preset, overrides, 2, grid)
        walls.append((one, two))
        tables_equal &= one_table == two_table
    ratios = sorted(two / one for one, two in walls)
    one, two = next((o, t) for o, t in walls if t / o == ratios[len(ratios) // 2])
    name = "sweep_points" if upstream_cached else "sweep_parallel"
    roots = "upstream cached" if upstream_cached else "fresh roots"
    result = Result(name)
    result.rows = [Row(f"sweep, 2 local workers vs 1 ({roots})",
                       f"{len(grid)}-point {preset} sweep (γ × seed), {roots}, median of {pairs} pairs "
                       f"(ratios {', '.join(f'{r:.3f}' for r in ratios)})",
                       f"{two:.1f} s", f"{one:.1f} s", f"{ratios[len(ratios) // 2]:.3f}",
                       "" if upstream_cached else "≤ 0.65")]
    result.ratios = {f"{name}_2_vs_1": ratios[len(ratios) // 2]}
    result.details = {"preset": preset, "overrides": overrides, "points": grid, "pairs_seconds": walls,
                      "one_worker_seconds": one, "two_workers_seconds": two, "tables_equal": tables_equal,
                      "upstream_cached": upstream_cached}
    return result
