"""The reference models' (target, retain) evaluations, split between the processes of a local fan-out.

Every point of a sweep evaluates the same target and retain models first, and points that reach evaluate together
would each compute all of it. Here each (model, eval set) is computed by the one process that claims it, into the
shared eval cache under the key the evaluate stage reads, so the stage then finds every reference result cached.
Nothing here decides a result: the stage's own functions compute each table, and a result another process wrote is
taken as it is.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.cache import busy, exclusive_lock
from pipeline.dag import fingerprints
from stages.config import Config

log = logging.getLogger("sunlearn")


@dataclass(frozen=True)
class Job:
    """One reference model on one eval set, and where the eval cache keeps its per-item results."""

    ref: Any  # stages.evaluate.stage.ModelRef
    eval_set: Any  # stages.evaluate.stage.EvalSet
    result: Path

    @property
    def lock(self) -> Path:
        return self.result.parent.parent / f".{self.result.parent.name}.lock"


def reference_jobs(cfg: Config, artifacts: str | Path) -> tuple[list[Job], Path]:
    """Every (reference model, eval set) of `cfg`, and the prepare artifact; the prepare and target artifacts must
    be complete."""
    from stages.common import load_documents
    from stages.evaluate.cache import cache_path, context_key, weights_checksum
    from stages.evaluate.stage import REFERENCE_MODELS, ModelRef, eval_sets

    fps = fingerprints(cfg)
    cache = storage.local_cache(artifacts)
    upstream = {name: cache.entry(name, fps[name]["fingerprint"]) for name in ("prepare", "target")}
    for entry in upstream.values():
        with cache.lock(entry):
            storage.fetch(artifacts, entry)  # a remote root's artifacts, into the local working copy
    prepare, target = upstream["prepare"].path, upstream["target"].path
    eval_cache = cache.shared("eval_cache")
    sets = eval_sets(load_documents(prepare).to_pylist(), cfg)
    context = context_key(prepare, cfg)
    refs = [ModelRef(name, 0, target / name) for name in REFERENCE_MODELS if (target / name).is_dir()]
    jobs = [Job(ref, s, cache_path(eval_cache, weights_checksum(ref.path), s.name, s.context_rows, context))
            for ref in refs for s in sets.values()]
    return jobs, prepare


def evaluate_references(cfg: Config, artifacts: str | Path) -> int:
    """Fill the eval cache with the reference models' results on every eval set, taking first what no other process
    is computing; returns how many this process computed."""
    from schemas import write_table
    from stages.common import load_model, load_tokenizer
    from stages.evaluate.stage import item_table

    left, prepare = reference_jobs(cfg, artifacts)
    tokenizer, loaded, computed = None, (None, None), 0
    while left := [job for job in left if not job.result.is_file()]:
        job = ([j for j in left if not busy(j.lock)] or left)[0]
        job.lock.parent.mkdir(parents=True, exist_ok=True)
        with exclusive_lock(job.lock):
            if job.result.is_file():  # another process computed it while this one waited
                continue
            start = time.perf_counter()
            if loaded[0] != job.ref:
                loaded = (job.ref, load_model(job.ref.path).eval())
                tokenizer = tokenizer or load_tokenizer(prepare)
            table = item_table(job.ref, job.eval_set, job.eval_set.run(loaded[1], tokenizer))
            job.result.parent.mkdir(parents=True, exist_ok=True)
            write_table(table, job.result)
            computed += 1
            log.info("reference %s on %s evaluated in %.1fs", job.ref.name, job.eval_set.name,
                     time.perf_counter() - start)
    return computed
