"""Materialise one stage through the cache: verify its inputs, reuse or compute it. No Prefect here.

Prefect tasks (pipeline/flows.py) wrap this; scripts and benchmarks can call it directly.
"""

from __future__ import annotations

import gc
import importlib
import inspect
import logging
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.cache import CacheError
from pipeline.dag import STAGES, fingerprints, upstream_closure
from pipeline.references import evaluate_references
from stages.config import Config, ConfigError

log = logging.getLogger("sunlearn")


@dataclass
class StageResult:
    name: str
    status: str  # "ran" | "cached"
    seconds: float
    path: str
    fingerprint: str
    stats: dict[str, Any]
    inputs: dict[str, str]


class FrozenHeap:
    """Stages free each model with gc.collect(), which otherwise walks every object torch and transformers made at
    import (0.18 s a call here, 0.00 s frozen). So before a stage the heap is collected and what is alive is frozen,
    but only while no other stage runs in this process (the flow runs target beside assistants in threads): objects
    of a stage in flight, frozen, would never be collected once it drops them, a model's memory among them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.running = 0

    @contextmanager
    def stage(self) -> Iterator[None]:
        with self._lock:
            if not self.running:
                gc.collect()
                gc.freeze()
            self.running += 1
        try:
            yield
        finally:
            with self._lock:
                self.running -= 1


STAGE_HEAP = FrozenHeap()


def materialize(name: str, cfg: Config, artifacts: str | Path, force: bool = False) -> StageResult:
    """The stage's artifact, computed only when it is missing (or `force`). Upstream artifacts must be complete."""
    spec = STAGES[name]
    fps = fingerprints(cfg)
    cache = storage.local_cache(artifacts)  # the root itself, or a local working copy of a remote (fsspec) root
    entry = cache.entry(name, fps[name]["fingerprint"])
    inputs: dict[str, Path] = {}
    for up in spec.upstream:
        upstream_entry = cache.entry(up, fps[up]["fingerprint"])
        with cache.lock(upstream_entry):
            storage.fetch(artifacts, upstream_entry)
        problems = upstream_entry.verify(full=False)
        if problems:
            raise CacheError(f"{name}: upstream {up} artifact is unusable ({problems[0]}); "
                             "run `sunlearn verify --fix` and run again")
        inputs[up] = upstream_entry.path
    start = time.time()
    with cache.lock(entry):
        if not force:
            storage.fetch(artifacts, entry)
        if entry.is_complete() and not force:
            manifest = entry.manifest()
            status = "cached"
        else:
            log.info("%s: computing %s", name, entry.path)
            meta = {"config": fps[name]["config"], "upstream": fps[name]["upstream"], "code": fps[name]["code"],
                    "inputs": {k: str(v) for k, v in inputs.items()}}
            function = spec.function(cfg)
            # a stage that can resume (unlearn) keeps its checkpoints in a scratch folder that survives a kill;
            # unlearn keeps trained methods and evaluate per-item results in folders every artifact shares
            params = inspect.signature(function).parameters
            extra = {"scratch": cache.scratch(entry)} if "scratch" in params else {}
            for shared in ("eval_cache", "method_cache"):  # results keyed by content, shared by every artifact
                if shared in params:
                    extra[shared] = cache.shared(shared)
            with STAGE_HEAP.stage():
                manifest = cache.build(entry, lambda tmp: function(cfg, inputs, tmp, **extra), meta)
            storage.publish(artifacts, entry)
            status = "ran"
    return StageResult(name, status, round(time.time() - start, 2), str(entry.path), entry.fingerprint,
                       manifest.get("stats", {}), {k: str(v) for k, v in inputs.items()})


# the stages points of a sweep can share; unlearn and evaluate are each point's own
SHARED = ("prepare", "target", "assistants", "scores", "masks")


def next_stage(candidates: list[str], loaded: Collection[str]) -> str:
    """The first candidate whose libraries are already loaded, else the first: a process that has not imported
    transformers builds the assistants while one that loaded it during its wait takes the target."""
    return min(candidates, key=lambda name: not set(STAGES[name].preload) <= set(loaded))


def others_shared_stage(others: Sequence[Config], artifacts: str | Path) -> tuple[str, Config] | None:
    """A shared stage of another point that is missing, whose upstream is complete and that no process is building."""
    cache = storage.local_cache(artifacts)
    for cfg in others:
        fps = fingerprints(cfg)
        entries = {name: cache.entry(name, fps[name]["fingerprint"]) for name in SHARED}
        for name, entry in entries.items():
            if (not entry.is_complete() and not cache.busy(entry)
                    and all(entries[up].is_complete() for up in STAGES[name].upstream)):
                return name, cfg
    return None


def claimable(left: Sequence[str], loaded: Collection[str], complete_or_busy: Callable[[str], bool],
              taken: Callable[[str], bool]) -> str | None:
    """The first stage not yet ready whose libraries are not all `loaded`, not `taken` (held by any process), and
    whose upstream is each complete or being built: the one a waiting process claims, so that it loads those
    libraries for it while the others build the rest, instead of another process taking it unloaded meanwhile."""
    for name in left:
        spec = STAGES[name]
        if (not set(spec.preload) <= set(loaded) and set(spec.upstream) & set(left) and not taken(name)
                and all(complete_or_busy(up) for up in spec.upstream)):
            return name
    return None


def materialize_all(cfg: Config, artifacts: str | Path, others: Sequence[Config] = ()) -> list[StageResult]:
    """Every stage of `cfg`, next always one whose upstream is done and that no other process is building, so
    processes that share upstream stages build independent ones side by side (target beside assistants) instead of
    queueing on one lock. While every ready stage is taken, it claims a later stage that needs libraries it has not
    loaded (holding its lock) and loads them, or else builds the shared stages of the `others` (the sweep's other
    points), each time looking again at this point's ready stages. Before evaluate, the reference models' evaluations
    are split with the other processes (pipeline.references). Returns this point's stages."""
    fps = fingerprints(cfg)
    cache = storage.local_cache(artifacts)
    entries = {name: cache.entry(name, fps[name]["fingerprint"]) for name in STAGES}
    left, results, claims = list(STAGES), [], {}
    try:
        while left:
            ready = [name for name in left if not set(STAGES[name].upstream) & set(left)]
            free = [name for name in ready if name in claims or not cache.busy(entries[name])]
            if not free and (claim := claimable(
                    left, sys.modules, lambda up: entries[up].is_complete() or cache.busy(entries[up]),
                    lambda name: name in claims or cache.busy(entries[name]))):
                claims[claim] = ExitStack()
                claims[claim].enter_context(cache.lock(entries[claim]))
                log.info("%s: claimed, loading its libraries while other processes build its upstream", claim)
                for module in STAGES[claim].preload:
                    importlib.import_module(module)
                continue
            if not free and (job := others_shared_stage(others, artifacts)):
                log.info("%s: built for another point while this one waits", job[0])
                materialize(*job, artifacts)
                continue
            name = next_stage(free or ready, sys.modules)
            if name == "evaluate" and not entries[name].is_complete():
                evaluate_references(cfg, artifacts)  # shared with every other point evaluating now, each part once
            results.append(materialize(name, cfg, artifacts))
            left.remove(name)
            if name in claims:
                claims.pop(name).close()
    finally:
        for claim in claims.values():
            claim.close()
    return results


def materialize_until(stage: str, cfg: Config, artifacts: str | Path) -> list[StageResult]:
    """Every stage up to and including `stage`, reusing whatever is cached."""
    return [materialize(name, cfg, artifacts) for name in upstream_closure(stage)]


# what the pareto plot reads of every run under a root: small files, never the models
RUN_FILES = ("evaluate/*/manifest.json", "evaluate/*/metrics.parquet", "masks/*/manifest.json",
             "unlearn/*/manifest.json")


def build_reports(cfg: Config, artifacts: str | Path) -> list[str]:
    """`sunlearn report`: results.md, pareto.png and selection.html of the config's evaluate artifact, written to
    `<root>/reports/<evaluate fingerprint>/` (uploaded for a remote root); returns where each file is."""
    from stages.reports import report_from_artifacts

    fps = fingerprints(cfg)
    cache = storage.local_cache(artifacts)
    entries = {name: cache.entry(name, fps[name]["fingerprint"]) for name in ("prepare", "scores", "masks", "evaluate")}
    for entry in entries.values():
        with cache.lock(entry):
            storage.fetch(artifacts, entry)
    evaluate = entries.pop("evaluate")
    if not evaluate.is_complete():
        where = storage.join(artifacts, "evaluate", evaluate.fingerprint)
        raise ConfigError(f"no evaluate artifact for this config at {where}; run `sunlearn run` first")
    out = cache.root / "reports" / evaluate.fingerprint
    inputs = {name: entry.path for name, entry in entries.items() if entry.is_complete()}
    with tempfile.TemporaryDirectory(prefix="sunlearn-runs-") as tmp:
        runs = storage.fetch_files(artifacts, RUN_FILES, Path(tmp))
        names = report_from_artifacts(evaluate.path, runs, out, inputs)
    location = storage.put_tree(artifacts, f"reports/{evaluate.fingerprint}", out)
    return [f"{location}/{name}" for name in names]
