"""Evaluate stage: TOFU metrics for the target, the retain model and every unlearned model.

Reads prepare/documents.parquet + tokenizer, target/{target,retain} and unlearn/<method>; writes metrics.parquet
(model, metric, value) and item_scores.parquet (per model, split and item). Models are loaded one at a time.
To add a metric: write a pure function in stages/metrics.py and call it from `evaluate_split`.
"""

from __future__ import annotations

import gc
import itertools
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from pipeline.config import Config
from schemas import ITEM_SCORES, METRICS, write_table
from stages import metrics as M
from stages.common import load_documents, load_model, load_tokenizer
from stages.scoring import generate_greedy, prompt_ids, score_answers

log = logging.getLogger("sunlearn")


@dataclass(frozen=True)
class SplitSpec:
    split: str  # documents split
    prefix: str  # metric-name prefix
    correct: str  # column holding the "correct" answer of the truth ratio
    prob: str  # registered per-item probability metric
    truth_ratio: str  # registered truth-ratio aggregate


# As TOFU: every probability, truth ratio and generation is conditioned on `question` (never paraphrased_question);
# the truth ratio compares the paraphrased answer (forget, retain) or the answer (ra, wf) with the perturbed ones.
SPLITS = (
    SplitSpec("forget", "forget", "paraphrased_answer", "probability", "truth_ratio_closer_to_1"),
    SplitSpec("eval_retain", "retain", "paraphrased_answer", "probability", "truth_ratio_true_better"),
    SplitSpec("real_authors", "ra", "answer", "normalised_probability", "truth_ratio_true_better"),
    SplitSpec("world_facts", "wf", "answer", "normalised_probability", "truth_ratio_true_better"),
)
UTILITY_INPUTS = [f"{p}_{m}" for p in ("retain", "ra", "wf") for m in ("prob", "rouge", "truth_ratio")]
METRIC_NAMES = [
    *(f"{s.prefix}_{m}" for s in SPLITS for m in ("prob", "rouge", "truth_ratio")),
    "forget_quality",
    "model_utility",
    "forget_exact_mem",
    "forget_extraction_strength",
]
TABLE_COLUMNS = [
    "forget_quality",
    "model_utility",
    "forget_rouge",
    "retain_rouge",
    "forget_prob",
    "retain_prob",
    "forget_truth_ratio",
    "retain_truth_ratio",
    "ra_prob",
    "ra_rouge",
    "ra_truth_ratio",
    "wf_prob",
    "wf_rouge",
    "wf_truth_ratio",
]


def evaluation_rows(documents: list[dict[str, Any]], split: str, retain_eval_items: int) -> list[dict[str, Any]]:
    """Rows of one evaluation split; without eval_retain rows, the first retain rows that can be truth-ratioed."""
    rows = [r for r in documents if r["split"] == split]
    if split == "eval_retain" and not rows:
        usable = (r for r in documents if r["split"] == "retain" and r["paraphrased_answer"] and r["perturbed_answers"])
        rows = list(itertools.islice(usable, retain_eval_items))
    return rows


def evaluate_split(model, tokenizer, rows: list[dict[str, Any]], spec: SplitSpec, cfg: Config) -> dict[str, Any]:
    """Per-item prob, truth ratio, ROUGE-L recall and generation, and the split's aggregate metrics."""
    n = len(rows)
    k = max((len(r["perturbed_answers"] or []) for r in rows), default=0)
    pairs = [(r["question"], r["answer"]) for r in rows]
    correct_at = {}  # item -> index in pairs of its "correct" answer
    if spec.correct != "answer":
        for i, r in enumerate(rows):
            if r[spec.correct]:
                correct_at[i] = len(pairs)
                pairs.append((r["question"], r[spec.correct]))
    perturbed_at = []  # (item, slot, index in pairs)
    for i, r in enumerate(rows):
        for j, text in enumerate(r["perturbed_answers"] or []):
            perturbed_at.append((i, j, len(pairs)))
            pairs.append((r["question"], text))
    scores = score_answers(model, tokenizer, pairs, cfg.evaluate.batch_size)
    nll = scores.nll_avg

    nll_answer = nll[:n]
    if spec.correct == "answer":
        nll_correct = nll_answer
    else:
        nll_correct = np.full(n, np.nan)
        for i, at in correct_at.items():
            nll_correct[i] = nll[at]
    nll_perturbed = np.full((n, k), np.nan)
    for i, j, at in perturbed_at:
        nll_perturbed[i, j] = nll[at]

    if spec.prob == "normalised_probability":
        prob = M.METRIC_FUNCTIONS[spec.prob](nll_answer, nll_perturbed)
    else:
        prob = M.METRIC_FUNCTIONS[spec.prob](nll_answer)
    truth_ratio = M.truth_ratio(nll_correct, nll_perturbed)
    prompts = [prompt_ids(tokenizer, r["question"]) for r in rows]
    generations = generate_greedy(model, tokenizer, prompts, cfg.evaluate.max_new_tokens, cfg.evaluate.batch_size)
    rouge = M.rouge_l_recall(generations, [r["answer"] for r in rows])

    aggregates = {
        f"{spec.prefix}_prob": float(np.nanmean(prob)),
        f"{spec.prefix}_rouge": float(np.mean(rouge)),
        f"{spec.prefix}_truth_ratio": M.METRIC_FUNCTIONS[spec.truth_ratio](truth_ratio),
    }
    if spec.prefix == "forget":
        answer_hits = scores.argmax_correct[:n]
        aggregates["forget_exact_mem"] = float(np.nanmean(M.exact_memorisation(answer_hits)))
        aggregates["forget_extraction_strength"] = float(np.nanmean(M.extraction_strength(answer_hits)))
    return {
        "metrics": aggregates,
        "items": {
            "doc_id": [r["doc_id"] for r in rows],
            "prob": prob,
            "truth_ratio": truth_ratio,
            "rouge": rouge,
            "generation": generations,
        },
    }


def models_to_evaluate(cfg: Config, inputs: dict[str, Path]) -> list[tuple[str, Path]]:
    """(name, folder) in report order: target, retain (when trained), then each unlearning method."""
    target_dir = Path(inputs["target"])
    models = [("target", target_dir / "target")]
    if (target_dir / "retain").is_dir():
        models.append(("retain", target_dir / "retain"))
    else:
        log.warning("no retain model in %s: forget_quality will be NaN", target_dir)
    for method in cfg.unlearn.methods:
        path = Path(inputs["unlearn"]) / method
        if not path.is_dir():
            raise FileNotFoundError(f"unlearned model for method {method!r} not found at {path}")
        models.append((method, path))
    if not models[0][1].is_dir():
        raise FileNotFoundError(f"target model not found at {models[0][1]}")
    return models


def evaluate(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    documents = load_documents(inputs["prepare"]).drop_columns(["input_ids", "gold"]).to_pylist()
    tokenizer = load_tokenizer(inputs["prepare"])
    split_rows = {s.split: evaluation_rows(documents, s.split, cfg.evaluate.retain_eval_items) for s in SPLITS}
    for split, rows in split_rows.items():
        if not rows:
            log.warning("no %s items: its metrics and model_utility will be NaN", split)
    models = models_to_evaluate(cfg, inputs)

    values: dict[str, dict[str, float]] = {}
    forget_ratios: dict[str, np.ndarray] = {}
    items: list[pa.Table] = []
    bar = tqdm(total=len(models) * len(SPLITS), desc="evaluate", unit="split")
    for name, path in models:
        model_start = time.perf_counter()
        model = load_model(path)
        model.eval()
        values[name] = {}
        for spec in SPLITS:
            bar.set_postfix_str(f"{name}/{spec.prefix}")
            rows = split_rows[spec.split]
            if rows:
                result = evaluate_split(model, tokenizer, rows, spec, cfg)
                values[name].update(result["metrics"])
                n = len(rows)
                items.append(
                    pa.table({"model": [name] * n, "split": [spec.split] * n, **result["items"]}, schema=ITEM_SCORES)
                )
                if spec.prefix == "forget":
                    forget_ratios[name] = result["items"]["truth_ratio"]
            bar.update(1)
        values[name]["model_utility"] = M.model_utility([values[name].get(m, math.nan) for m in UTILITY_INPUTS])
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("evaluated %s in %.1fs", name, time.perf_counter() - model_start)
    bar.close()

    for name in values:
        if "retain" in forget_ratios and name in forget_ratios:
            values[name]["forget_quality"] = M.forget_quality(forget_ratios[name], forget_ratios["retain"])
        else:
            values[name]["forget_quality"] = math.nan

    rows = [(name, metric, values[name].get(metric, math.nan)) for name in values for metric in METRIC_NAMES]
    metrics = pa.table(
        {"model": [r[0] for r in rows], "metric": [r[1] for r in rows], "value": [r[2] for r in rows]},
        schema=METRICS,
    )
    write_table(metrics, out / "metrics.parquet")
    item_table = pa.concat_tables(items) if items else ITEM_SCORES.empty_table()
    write_table(item_table, out / "item_scores.parquet")
    log.info("evaluation summary\n%s", format_table(metrics))
    return {
        "models": list(values),
        "seconds": round(time.perf_counter() - start, 2),
        "summary": {
            name: {"forget_quality": v["forget_quality"], "model_utility": v["model_utility"]}
            for name, v in values.items()
        },
    }


def format_table(metrics: Any) -> str:
    """A wide text table of a metrics table (pyarrow or polars): models as rows, key metrics first as columns."""
    records = metrics.to_pylist() if isinstance(metrics, pa.Table) else metrics.to_dicts()
    wide: dict[str, dict[str, float]] = {}
    seen: list[str] = []
    for r in records:
        wide.setdefault(r["model"], {})[r["metric"]] = r["value"]
        if r["metric"] not in seen:
            seen.append(r["metric"])
    columns = [c for c in TABLE_COLUMNS if c in seen] + [c for c in seen if c not in TABLE_COLUMNS]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"

    grid = [["model", *columns]] + [[m, *(cell(v.get(c)) for c in columns)] for m, v in wide.items()]
    widths = [max(len(row[i]) for row in grid) for i in range(len(grid[0]))]
    lines = [
        "  ".join(
            text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in grid
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
