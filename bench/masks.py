"""Mask building: the masks stage against a straightforward per-token Python loop that gives the same masks.

Both sides read token_scores.parquet and write masks.parquet; the stage also writes mask_doc_stats.parquet and its
stats. The loop's masks are checked equal to the stage's, row for row. A second figure compares the mask logic
alone: `answer_segments` + `widen` on numpy arrays against the loop on Python lists, reading and writing excluded.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from bench.report import Result, Row, tokens_label
from bench.sized import SizedRuns, bench_config
from schemas import read_table, write_table


def python_masks(doc_ids: list[str], diff: list[float], in_answer: list[bool], gamma: float, window: int
                 ) -> tuple[list[bool], list[bool]]:
    """Seed and selected per token: one document at a time, each seed widened inside its document's answer."""
    n = len(doc_ids)
    seed, selected = [False] * n, [False] * n
    start = 0
    while start < n:
        end = start
        while end < n and doc_ids[end] == doc_ids[start]:
            end += 1
        first = start
        while first < end and not in_answer[first]:
            first += 1
        for i in range(first, end):
            if in_answer[i] and diff[i] > gamma:
                seed[i] = True
                for j in range(max(first, i - window), min(end, i + window + 1)):
                    selected[j] = True
        start = end
    return seed, selected


def python_stage(scores_dir: Path, out: Path) -> tuple[list[bool], list[bool]]:
    """The loop as a stage: read, loop, write masks.parquet."""
    masks = bench_config().masks
    scores = read_table(scores_dir / "token_scores.parquet")
    seed, selected = python_masks(scores["doc_id"].to_pylist(), scores["score_diff"].to_pylist(),
                                  scores["in_answer"].to_pylist(), float(masks.gamma), masks.window)
    out.mkdir(parents=True, exist_ok=True)
    write_table(pa.table({"doc_id": scores["doc_id"], "position": scores["position"], "selected": selected,
                          "seed": seed, "in_answer": scores["in_answer"], "gold": scores["gold"]}),
                out / "masks.parquet")
    return seed, selected


def compute_only(scores_dir: Path) -> tuple[float, float]:
    """Seconds of the vectorised mask logic and of the Python loop, on inputs already in memory."""
    from stages.masks import answer_segments, document_starts, widen

    masks = bench_config().masks
    gamma = float(masks.gamma)
    scores = read_table(scores_dir / "token_scores.parquet",
                        columns=["doc_id", "position", "score_diff", "in_answer"])
    position = scores["position"].to_numpy()
    diff, in_answer = scores["score_diff"].to_numpy(), scores["in_answer"].to_numpy(zero_copy_only=False)
    start = time.perf_counter()
    widen((diff > gamma) & in_answer, answer_segments(document_starts(position), in_answer), masks.window)
    vectorised = time.perf_counter() - start
    lists = scores["doc_id"].to_pylist(), diff.tolist(), in_answer.tolist()
    start = time.perf_counter()
    python_masks(*lists, gamma, masks.window)
    return vectorised, time.perf_counter() - start


def run(runs: SizedRuns, sizes: list[int]) -> Result:
    result = Result("masks")
    per_size = {}
    for n in sizes:
        sized = runs.get(n)
        start = time.perf_counter()
        seed, selected = python_stage(sized.dir("scores"), runs.workdir / f"python-masks-{n}")
        loop_seconds = time.perf_counter() - start
        stage = read_table(sized.dir("masks") / "masks.parquet", columns=["seed", "selected"])
        identical = bool(np.array_equal(stage["selected"].to_numpy(zero_copy_only=False), np.array(selected))
                         and np.array_equal(stage["seed"].to_numpy(zero_copy_only=False), np.array(seed)))
        stage_seconds = sized.seconds["masks"]
        vectorised, python = compute_only(sized.dir("scores"))
        per_size[n] = {"stage_seconds": stage_seconds, "python_seconds": loop_seconds, "identical": identical,
                       "selected": int(np.count_nonzero(selected)), "logic_seconds": vectorised,
                       "python_logic_seconds": python}
        result.rows.append(Row("masks vs per-token Python loop", f"{tokens_label(n)} tokens (identical: "
                               f"{'yes' if identical else 'NO'})", f"{stage_seconds:.2f} s", f"{loop_seconds:.2f} s",
                               f"{loop_seconds / stage_seconds:.1f}×", "≥ 20× at 10M"))
        result.rows.append(Row("masks logic vs Python loop", f"{tokens_label(n)} tokens, no I/O",
                               f"{vectorised:.2f} s", f"{python:.2f} s", f"{python / vectorised:.1f}×", ""))
    largest = per_size[max(sizes)]
    result.ratios = {"masks_vs_python_10m": largest["python_seconds"] / largest["stage_seconds"],
                     "masks_logic_vs_python_10m": largest["python_logic_seconds"] / largest["logic_seconds"]}
    result.details = {"per_size": per_size, "identical": all(p["identical"] for p in per_size.values())}
    return result
