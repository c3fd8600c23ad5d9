"""The local fan-out: grid points in worker processes of this machine, with no Prefect in them.

A worker imports only the cache and the stages, not Prefect (about a third of what `pipeline.sweep` imports), so its
start-up, which every point's wait for the shared upstream includes, is that much shorter.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from typing import Any

from pipeline import storage
from pipeline.dag import fingerprints
from schemas import read_table
from stages.config import ConfigError, load_config

log = logging.getLogger("sunlearn")


def failed(exc: BaseException) -> dict[str, Any]:
    """A point's outcome when it raised."""
    return {"state": "FAILED", "error": f"{type(exc).__name__}: {exc}"}


def point_metrics(preset: str, config_file: str | None, overrides: list[str], artifacts: str) -> list[dict[str, Any]]:
    """The point's metrics, read from its evaluate artifact (fetched from a remote root when needed)."""
    cfg = load_config(preset, config_file, overrides)
    cache = storage.local_cache(artifacts)
    entry = cache.entry("evaluate", fingerprints(cfg)["evaluate"]["fingerprint"])
    with cache.lock(entry):
        storage.fetch(artifacts, entry)
    if not entry.is_complete():
        raise ConfigError(f"no evaluate artifact at {entry.path}")
    return read_table(entry.path / "metrics.parquet").to_pylist()


def run_point_process(point: list[str], preset: str, artifacts: str, config_file: str | None,
                      label: str = "", others: Sequence[list[str]] = ()) -> list[dict[str, Any]]:
    """A local worker process's job: every stage of one point through the cache, no Prefect; returns its metrics.
    While its own next stage is taken, it builds the shared stages of the `others` (the sweep's other points). Its
    log lines start with `[label]`, so that the lines of points running side by side can be told apart."""
    from stages.environment import configure_environment

    configure_environment()
    if not any(isinstance(h, _Console) for h in log.handlers):
        log.addHandler(_Console())
        log.propagate = False  # a library's root handler would print each line a second time
    for old in [f for f in log.filters if isinstance(f, _Label)]:
        log.removeFilter(old)
    if label:
        log.addFilter(_Label(label))
    from pipeline.runner import materialize_all

    materialize_all(load_config(preset, config_file, point), artifacts,
                    [load_config(preset, config_file, other) for other in others])
    atexit.unregister(_exit_without_teardown)
    atexit.register(_exit_without_teardown)  # registered last, so it runs first, after this job's imports
    return point_metrics(preset, config_file, point, artifacts)


class _Console(logging.StreamHandler):
    """A worker's log lines on stderr in the layout of Prefect's console lines, which the sweep's own lines have."""

    def __init__(self):
        super().__init__(sys.stderr)
        self.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d | %(levelname)-7s | %(name)s - %(message)s",
                                            "%H:%M:%S"))


class _Label(logging.Filter):
    def __init__(self, label: str):
        super().__init__()
        self.label = label

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = f"[{self.label}] {record.msg}"
        return True


def _exit_without_teardown() -> None:
    """A worker's exit. Tearing down an interpreter that holds torch and DeepSpeed takes seconds and frees nothing
    the OS does not; every result is written and returned by the time the pool stops its workers."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


@contextmanager
def main_hidden() -> Iterator[None]:
    """Processes spawned meanwhile do not import this process's `__main__` again, as spawn does by default: run from
    the `sunlearn` script that is pipeline.cli and Prefect (1.2 s), and a worker needs only this module."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def in_worker_processes(
    points: list[list[str]], preset: str, artifacts: str, config_file: str | None, workers: int,
    on_done: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """The local fan-out: every point in a pool of `workers` processes; per point {state, metrics | error}, each also
    given to `on_done` as it finishes."""
    outcomes: list[dict[str, Any]] = [{} for _ in points]
    # the workers log to the console; only this process is inside a flow run that the API could file their logs under
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    # spawn: a forked copy of a process holding Prefect's threads and torch's pools can hang
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        with main_hidden():  # the pool starts its processes as points are submitted
            futures = {pool.submit(run_point_process, point, preset, artifacts, config_file,
                                   f"{i + 1}/{len(points)}", points[i + 1:]): i
                       for i, point in enumerate(points)}
        for future in as_completed(futures):
            i = futures[future]
            try:
                outcomes[i] = {"state": "COMPLETED", "metrics": future.result()}
            except Exception as exc:  # the point's own failure, or its worker process died
                outcomes[i] = failed(exc)
            if on_done is not None:
                on_done(i, outcomes[i])
    return outcomes
