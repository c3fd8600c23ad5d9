"""Profiles of the hot paths: the scores and masks stages under pyinstrument, top costs by self time.

Self time is time spent in a function's own code, not in what it calls; C extensions (kenlm, pyarrow, numpy) show
as the Python line that called them.
"""

from __future__ import annotations

import shutil
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.report import Result, markdown_table, tokens_label
from bench.sized import SizedRuns, bench_config

TOP = 6


def top_costs(session: Any, top: int = TOP) -> list[dict[str, Any]]:
    total = session.duration
    self_time: dict[str, float] = defaultdict(float)
    stack = [session.root_frame()]
    while stack:
        frame = stack.pop()
        stack.extend(frame.children)
        if not frame.is_synthetic and frame.total_self_time > 0:
            self_time[f"{frame.function} ({frame.file_path_short}:{frame.line_no})"] += frame.total_self_time
    ranked = sorted(self_time.items(), key=lambda kv: -kv[1])[:top]
    return [{"function": name, "seconds": seconds, "share": seconds / total} for name, seconds in ranked]


def profile_stage(fn, inputs: dict[str, Path], out: Path) -> tuple[float, list[dict[str, Any]]]:
    from pyinstrument import Profiler

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    profiler = Profiler(interval=0.001)
    profiler.start()
    fn(bench_config(), inputs, out)
    session = profiler.stop()
    return session.duration, top_costs(session)


def run(runs: SizedRuns, n_tokens: int) -> Result:
    from stages.masks import build_masks
    from stages.scores import score_tokens

    sized = runs.get(n_tokens)
    work = runs.workdir / f"profile-{n_tokens}"
    stages = {
        "scores": (score_tokens, {"prepare": sized.dir("prepare"), "assistants": sized.dir("assistants")}),
        "masks": (build_masks, {"scores": sized.dir("scores")}),
    }
    result = Result("profile")
    rows = []
    for name, (fn, inputs) in stages.items():
        seconds, costs = profile_stage(fn, inputs, work / name)
        result.details[name] = {"seconds": seconds, "top": costs}
        rows += [[name, f"`{c['function']}`", f"{c['seconds']:.2f} s", f"{100 * c['share']:.0f}%"] for c in costs]
    result.extra_tables = [f"Top self-time costs at {tokens_label(n_tokens)} tokens (pyinstrument):\n\n"
                           + markdown_table(["stage", "function", "self time", "share"], rows)]
    return result
