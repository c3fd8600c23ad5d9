"""The real assistants → scores → masks stages on a synthetic corpus of a given size, run once per size and shared.

Scoring, masks, scaling and footprint all read the same runs, so `make bench` trains each size's assistants once.
The assistants stage runs in a spawned process: there, the peak RSS of the largest child (lmplz or build_binary) is
lmplz's footprint, untouched by anything else this process ran.
"""

from __future__ import annotations

import multiprocessing
import resource
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.corpus import write_documents
from stages.config import Config


@dataclass
class SizedRun:
    n_tokens: int  # tokens of the forget split: the tokens scored and masked
    root: Path
    seconds: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    kenlm_peak_mb: float = 0.0

    def dir(self, stage: str) -> Path:
        return self.root / stage


def bench_config() -> Config:
    """5-gram KenLM and window ±2 as every preset has them, with a fixed γ = 0.5, which the Python loop that the masks
    bench compares with can apply (the default, auto, only adds one histogram pass) and which earlier figures used."""
    cfg = Config()
    cfg.masks.gamma = 0.5
    return cfg


def _train_assistants(prepare: Path, out: Path) -> tuple[float, dict[str, Any], float]:
    from stages.assistants import train_assistants

    start = time.perf_counter()
    stats = train_assistants(bench_config(), {"prepare": prepare}, out)
    seconds = time.perf_counter() - start
    return seconds, stats, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def _stage(run: SizedRun, name: str, fn, inputs: dict[str, Path]) -> None:
    out = run.dir(name)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    start = time.perf_counter()
    run.stats[name] = fn(bench_config(), inputs, out)
    run.seconds[name] = time.perf_counter() - start


class SizedRuns:
    """Memoised per size: corpus, then assistants, scores and masks, each timed."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.runs: dict[int, SizedRun] = {}

    def get(self, n_tokens: int) -> SizedRun:
        if n_tokens in self.runs:
            return self.runs[n_tokens]
        from stages.masks import build_masks
        from stages.scores import score_tokens

        run = SizedRun(n_tokens, self.workdir / f"tokens-{n_tokens}")
        run.stats["corpus"] = write_documents(run.dir("prepare"), n_tokens)
        out = run.dir("assistants")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            seconds, stats, peak = pool.apply(_train_assistants, (run.dir("prepare"), out))
        run.seconds["assistants"], run.stats["assistants"], run.kenlm_peak_mb = seconds, stats, peak
        _stage(run, "scores", score_tokens, {"prepare": run.dir("prepare"), "assistants": out})
        _stage(run, "masks", build_masks, {"scores": run.dir("scores")})
        self.runs[n_tokens] = run
        return run
