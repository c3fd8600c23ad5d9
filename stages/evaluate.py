"""Evaluate stage: the TOFU and MUSE suites for the target, the retain model and every unlearned model.

Reads prepare/documents.parquet + tokenizer, target/{target,retain} and unlearn/<method>; writes metrics.parquet
(model, metric, value), item_scores.parquet (per model, eval set and item) and the reports of stages.reports
(results.md, pareto.png, selection.html). Each suite runs when its splits are in documents.parquet and is skipped
otherwise: TOFU needs forget (QA rows) and eval_retain / real_authors / world_facts; MUSE needs verbmem,
knowmem_* and privleak_*. Definitions: docs/metrics.md.

Per-item results are cached per (model weights, eval set) under <artifact root>/eval_cache/, keyed by the weights'
checksum, the eval set's rows, the tokenizer, the generation length and the source of the evaluation modules; a
model whose weights did not change (the target, the retain model, an unchanged method) is not evaluated again.
To add a metric: write a pure function in stages/metrics.py, compute its per-item values in `evaluate_items` and
aggregate them in `tofu_metrics` or `muse_metrics`.
"""

from __future__ import annotations

import gc
import hashlib
import itertools
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm import tqdm

from schemas import ITEM_SCORES, METRICS, read_table, write_table
from stages import metrics as M
from stages.common import TOKENIZER_DIR, load_documents, load_model, load_tokenizer, prompt_text
from stages.config import Config
from stages.scoring import generate_greedy, prompt_ids, score_answers, score_sequences, text_ids

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
FACT_RECALL_SPLITS = ("forget", "eval_retain")
UTILITY_INPUTS = [f"{p}_{m}" for p in ("retain", "ra", "wf") for m in ("prob", "rouge", "truth_ratio")]
TOFU_METRICS = [
    *(f"{s.prefix}_{m}" for s in SPLITS for m in ("prob", "rouge", "truth_ratio")),
    "forget_quality",
    "model_utility",
    "forget_fact_recall",
    "retain_fact_recall",
    "exact_memorization",
    "extraction_strength",
]
MUSE_METRICS = ["verbmem_f", "knowmem_f", "knowmem_r", "privleak"]
METRIC_NAMES = TOFU_METRICS + MUSE_METRICS

# MUSE: (eval set, ICL split); generation lengths and stop strings as muse_bench, capped by evaluate.max_new_tokens
VERBMEM_NEW_TOKENS = 128
KNOWMEM_NEW_TOKENS = 32
KNOWMEM_STOP = ("\n\n", "Question")
KNOWMEM_SETS = {"knowmem_forget": "knowmem_forget_icl", "knowmem_retain": "knowmem_retain_icl"}
PRIVLEAK_SETS = ("privleak_forget", "privleak_holdout")
MUSE_SETS = ("verbmem", *KNOWMEM_SETS, *PRIVLEAK_SETS)

TABLE_COLUMNS = [
    "forget_quality",
    "model_utility",
    "forget_rouge",
    "retain_rouge",
    "forget_fact_recall",
    "retain_fact_recall",
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
    "exact_memorization",
    "extraction_strength",
    *MUSE_METRICS,
]
CODE_FILES = ("stages/evaluate.py", "stages/metrics.py", "stages/scoring.py", "stages/common.py")


def evaluation_rows(documents: list[dict[str, Any]], split: str, retain_eval_items: int) -> list[dict[str, Any]]:
    """Rows of one evaluation split; without eval_retain rows, the first retain rows that can be truth-ratioed."""
    rows = [r for r in documents if r["split"] == split]
    if split == "eval_retain" and not rows:
        usable = (r for r in documents if r["split"] == "retain" and r["paraphrased_answer"] and r["perturbed_answers"])
        rows = list(itertools.islice(usable, retain_eval_items))
    return rows


def fact_words(row: dict[str, Any]) -> list[str]:
    """Gold-span words minus question words where the data set has gold spans, else TOFU's perturbation rule."""
    if row["gold_spans"]:
        return M.fact_words_from_spans(row["answer"], row["gold_spans"], row["question"])
    if row["paraphrased_answer"] and row["perturbed_answers"]:
        return M.fact_words_from_perturbed(row["answer"], row["paraphrased_answer"], row["perturbed_answers"])
    return []


def evaluate_split(model, tokenizer, rows: list[dict[str, Any]], cfg: Config, spec: SplitSpec) -> dict[str, Any]:
    """Per item: prob, truth ratio, ROUGE-L recall and generation; fact recall (forget, retain); exact memorization
    and extraction strength (forget)."""
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
    prompts = [prompt_ids(tokenizer, r["question"]) for r in rows]
    generations = generate_greedy(model, tokenizer, prompts, cfg.evaluate.max_new_tokens, cfg.evaluate.batch_size)
    items = {
        "prob": prob,
        "truth_ratio": M.truth_ratio(nll_correct, nll_perturbed),
        "rouge": M.rouge_l_recall(generations, [r["answer"] for r in rows]),
        "generation": generations,
    }
    if spec.split in FACT_RECALL_SPLITS:
        items["fact_recall"] = M.fact_recall(generations, [fact_words(r) for r in rows])
    if spec.split == "forget":
        answer_hits = scores.argmax_correct[:n]
        items["exact_memorization"] = M.exact_memorization(answer_hits)
        items["extraction_strength"] = M.extraction_strength(answer_hits)
    return items


def evaluate_verbmem(model, tokenizer, rows: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Greedy continuation of each prompt; ROUGE-L F1 against gt cut to its first VERBMEM_NEW_TOKENS tokens."""
    new_tokens = min(VERBMEM_NEW_TOKENS, cfg.evaluate.max_new_tokens)
    prompts = [text_ids(tokenizer, r["question"]) for r in rows]
    generations = generate_greedy(model, tokenizer, prompts, new_tokens, cfg.evaluate.batch_size)
    gt_ids = tokenizer([r["answer"] for r in rows], add_special_tokens=False)["input_ids"]
    references = [tokenizer.decode(ids[:VERBMEM_NEW_TOKENS], skip_special_tokens=True) for ids in gt_ids]
    return {"rouge": M.rouge_l_f1(generations, references), "generation": generations}


def knowmem_prompt(icl: list[dict[str, Any]], question: str) -> str:
    """MUSE's few-shot prompt: every ICL pair as "Question: …\\nAnswer: …\\n\\n", then the question."""
    shots = "".join(f"{prompt_text(r['question'])} {r['answer']}\n\n" for r in icl)
    return shots + prompt_text(question)


def evaluate_knowmem(model, tokenizer, rows: list[dict[str, Any]], cfg: Config, icl: list[dict[str, Any]]) -> dict:
    """Greedy answers after the ICL prompt, cut at "\\n\\n" or "Question"; ROUGE-L F1 against the answer."""
    new_tokens = min(KNOWMEM_NEW_TOKENS, cfg.evaluate.max_new_tokens)
    prompts = [text_ids(tokenizer, knowmem_prompt(icl, r["question"])) for r in rows]
    generations = generate_greedy(model, tokenizer, prompts, new_tokens, cfg.evaluate.batch_size, KNOWMEM_STOP)
    return {"rouge": M.rouge_l_f1(generations, [r["answer"] for r in rows]), "generation": generations}


def evaluate_privleak(model, tokenizer, rows: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Min-K% (k = 0.4) score of each text's tokens, teacher-forced."""
    encoded = [(r["input_ids"], 0) for r in rows]
    scores = score_sequences(model, encoded, tokenizer.pad_token_id, cfg.evaluate.batch_size)
    return {"min_k": M.min_k_percent(scores.token_logprobs)}


@dataclass
class EvalSet:
    """One eval set: its items, the rows its results depend on (the items, plus KnowMem's ICL examples), and the
    function that computes its per-item columns for one model."""

    rows: list[dict[str, Any]]
    run: Callable[[Any, Any], dict[str, Any]]
    context_rows: list[dict[str, Any]]


def eval_sets(documents: list[dict[str, Any]], cfg: Config) -> dict[str, EvalSet]:
    """Every eval set whose splits are present, by name (the `split` column of item_scores.parquet)."""
    by_split: dict[str, list[dict[str, Any]]] = {}
    for r in documents:
        by_split.setdefault(r["split"], []).append(r)
    sets: dict[str, EvalSet] = {}

    def add(name: str, rows: list[dict[str, Any]], fn: Callable, extra: list | None = None, **kwargs: Any) -> None:
        run = lambda model, tokenizer: fn(model, tokenizer, rows=rows, cfg=cfg, **kwargs)  # noqa: E731
        sets[name] = EvalSet(rows, run, rows + (extra or []))

    if any(r["question"] is not None for r in by_split.get("forget", [])):  # MUSE's forget rows are plain text
        for spec in SPLITS:
            rows = evaluation_rows(documents, spec.split, cfg.evaluate.retain_eval_items)
            if rows:
                add(spec.split, rows, evaluate_split, spec=spec)
            else:
                log.warning("no %s items: its metrics and model_utility will be NaN", spec.split)
    if by_split.get("verbmem"):
        add("verbmem", by_split["verbmem"], evaluate_verbmem)
    for name, icl_split in KNOWMEM_SETS.items():
        if by_split.get(name):
            icl = by_split.get(icl_split, [])
            add(name, by_split[name], evaluate_knowmem, extra=icl, icl=icl)
    for name in PRIVLEAK_SETS:
        if by_split.get(name):
            add(name, by_split[name], evaluate_privleak)
    return sets


def tofu_metrics(items: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    """One model's TOFU aggregates from its per-item columns (per eval set); model_utility NaN if a part is missing."""
    out: dict[str, float] = {}
    for spec in SPLITS:
        cols = items.get(spec.split)
        if cols is None:
            continue
        out[f"{spec.prefix}_prob"] = float(np.nanmean(cols["prob"]))
        out[f"{spec.prefix}_rouge"] = float(np.mean(cols["rouge"]))
        out[f"{spec.prefix}_truth_ratio"] = M.METRIC_FUNCTIONS[spec.truth_ratio](cols["truth_ratio"])
        if spec.split in FACT_RECALL_SPLITS:
            out[f"{spec.prefix}_fact_recall"] = _nanmean(cols["fact_recall"])
    if "forget" in items:
        out["exact_memorization"] = _nanmean(items["forget"]["exact_memorization"])
        out["extraction_strength"] = _nanmean(items["forget"]["extraction_strength"])
    out["model_utility"] = M.model_utility([out.get(m, math.nan) for m in UTILITY_INPUTS])
    return out


def muse_metrics(items: dict[str, dict[str, np.ndarray]]) -> dict[str, float]:
    """One model's VerbMem and KnowMem means and its forget-vs-holdout AUC (PrivLeak needs the retain model's)."""
    out: dict[str, float] = {}
    for name, metric in (("verbmem", "verbmem_f"), ("knowmem_forget", "knowmem_f"), ("knowmem_retain", "knowmem_r")):
        if name in items:
            out[metric] = float(np.mean(items[name]["rouge"]))
    if all(name in items for name in PRIVLEAK_SETS):
        out["privleak_auc"] = M.forget_holdout_auc(*(items[name]["min_k"] for name in PRIVLEAK_SETS))
    return out


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


def models_to_evaluate(cfg: Config, inputs: dict[str, Path]) -> list[tuple[str, Path]]:
    """(name, folder) in report order: target, retain (when trained), then each unlearning method."""
    target_dir = Path(inputs["target"])
    models = [("target", target_dir / "target")]
    if (target_dir / "retain").is_dir():
        models.append(("retain", target_dir / "retain"))
    else:
        log.warning("no retain model in %s: forget_quality and privleak need a reference log", target_dir)
    for method in cfg.unlearn.methods:
        path = Path(inputs["unlearn"]) / method
        if not path.is_dir():
            raise FileNotFoundError(f"unlearned model for method {method!r} not found at {path}")
        models.append((method, path))
    if not models[0][1].is_dir():
        raise FileNotFoundError(f"target model not found at {models[0][1]}")
    return models


def weights_checksum(model_dir: Path) -> str:
    """The model folder's file checksums from its artifact manifest one level up, else hashed here."""
    model_dir = Path(model_dir)
    manifest = model_dir.parent / "manifest.json"
    files: dict[str, str] = {}
    if manifest.is_file() and not model_dir.is_symlink():
        recorded = json.loads(manifest.read_text()).get("files", {})
        files = {rel: digest for rel, digest in recorded.items() if rel.startswith(f"{model_dir.name}/")}
    if not files:
        files = {p.name: _sha256(p) for p in sorted(model_dir.resolve().iterdir()) if p.is_file()}
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def context_key(prepare_dir: Path, cfg: Config) -> dict[str, Any]:
    """What, besides the weights and the rows, decides an eval set's per-item results."""
    root = Path(__file__).resolve().parent.parent
    tokenizer = {p.name: _sha256(p) for p in sorted((Path(prepare_dir) / TOKENIZER_DIR).iterdir()) if p.is_file()}
    return {
        "tokenizer": tokenizer,
        "max_new_tokens": cfg.evaluate.max_new_tokens,
        "retain_eval_items": cfg.evaluate.retain_eval_items,
        "code": {f: _sha256(root / f) for f in CODE_FILES},
    }


def cache_path(root: Path, checksum: str, name: str, rows: list[dict[str, Any]], context: dict[str, Any]) -> Path:
    payload = {"set": name, "rows": [{k: v for k, v in r.items() if k != "gold"} for r in rows], "context": context}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return root / checksum / f"{name}-{key}" / "item_scores.parquet"


def items_table(model: str, split: str, doc_ids: list[str], columns: dict[str, Any]) -> pa.Table:
    n = len(doc_ids)
    data = {"model": [model] * n, "split": [split] * n, "doc_id": doc_ids}
    for field in ITEM_SCORES:
        if field.name not in data:
            data[field.name] = columns.get(field.name, [None] * n)
    return pa.table(data, schema=ITEM_SCORES)


def numeric_columns(table: pa.Table) -> dict[str, np.ndarray]:
    """The per-item numbers of an item_scores table, nulls as NaN."""
    return {
        f.name: np.asarray(table[f.name].to_numpy(zero_copy_only=False), dtype=np.float64)
        for f in ITEM_SCORES
        if pa.types.is_floating(f.type)
    }


def read_retain_logs(path: str | Path) -> dict[str, Any]:
    """A retain model's evaluation log in open-unlearning's format (TOFU_EVAL.json / MUSE_EVAL.json): the per-item
    forget truth ratios (forget_truth_ratio.value_by_index) and the Min-K AUC (mia_min_k.agg_value), when present."""
    logs = json.loads(Path(path).read_text())
    out: dict[str, Any] = {}
    by_index = logs.get("forget_truth_ratio", {}).get("value_by_index")
    if by_index:
        out["forget_truth_ratio"] = np.array([v["score"] for v in by_index.values()], dtype=np.float64)
    if logs.get("mia_min_k", {}).get("agg_value") is not None:
        out["privleak_auc"] = float(logs["mia_min_k"]["agg_value"])
    return out


def evaluate(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    documents = load_documents(inputs["prepare"]).drop_columns(["gold"]).to_pylist()
    tokenizer = load_tokenizer(inputs["prepare"])
    sets = eval_sets(documents, cfg)
    models = models_to_evaluate(cfg, inputs)
    cache_root = Path(inputs["prepare"]).resolve().parent.parent / "eval_cache"
    context = context_key(inputs["prepare"], cfg)

    per_model: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    tables: list[pa.Table] = []
    hits = 0
    bar = tqdm(total=len(models) * len(sets), desc="evaluate", unit="set")
    for name, path in models:
        model_start = time.perf_counter()
        checksum, model = weights_checksum(path), None
        per_model[name] = {}
        for set_name, spec in sets.items():
            bar.set_postfix_str(f"{name}/{set_name}")
            cached = cache_path(cache_root, checksum, set_name, spec.context_rows, context)
            if cached.is_file():
                table = read_table(cached)
                hits += 1
            else:
                if model is None:
                    model = load_model(path).eval()
                table = items_table(name, set_name, [r["doc_id"] for r in spec.rows], spec.run(model, tokenizer))
                cached.parent.mkdir(parents=True, exist_ok=True)
                write_table(table, cached)
            table = table.set_column(0, "model", pa.array([name] * len(table), pa.string()))
            tables.append(table)
            per_model[name][set_name] = numeric_columns(table)
            bar.update(1)
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("evaluated %s in %.1fs", name, time.perf_counter() - model_start)
    bar.close()

    values = summarise(per_model, sets, cfg.evaluate.retain_logs)
    rows = [(name, metric, value) for name, v in values.items() for metric, value in v.items()]
    metrics = pa.table(
        {"model": [r[0] for r in rows], "metric": [r[1] for r in rows], "value": [r[2] for r in rows]},
        schema=METRICS,
    )
    write_table(metrics, out / "metrics.parquet")
    write_table(pa.concat_tables(tables) if tables else ITEM_SCORES.empty_table(), out / "item_scores.parquet")
    log.info("evaluation summary\n%s", format_table(metrics))

    from stages.reports import write_reports

    write_reports(out, inputs, metrics)
    return {
        "models": list(values),
        "eval_sets": list(sets),
        "cache_hits": hits,
        "seconds": round(time.perf_counter() - start, 2),
        "summary": {name: {m: v[m] for m in ("forget_quality", "model_utility", "privleak") if m in v}
                    for name, v in values.items()},
    }


def summarise(per_model: dict[str, dict[str, dict[str, np.ndarray]]], sets: dict[str, EvalSet],
              retain_logs: str | None = None) -> dict[str, dict[str, float]]:
    """Every model's metrics, in METRIC_NAMES order; forget_quality and privleak against the retain model, or
    against a retain model's log when there is no retain model."""
    reference = read_retain_logs(retain_logs) if retain_logs else {}
    tofu, muse = "forget" in sets, any(s in sets for s in MUSE_SETS)
    retain_ratios = reference.get("forget_truth_ratio")
    if "retain" in per_model and "forget" in per_model["retain"]:
        retain_ratios = per_model["retain"]["forget"]["truth_ratio"]
    retain_muse = muse_metrics(per_model["retain"]) if "retain" in per_model else {}
    retain_auc = retain_muse.get("privleak_auc", reference.get("privleak_auc", math.nan))
    values: dict[str, dict[str, float]] = {}
    for name, items in per_model.items():
        found = tofu_metrics(items) if tofu else {}
        if tofu:
            found["forget_quality"] = (
                M.forget_quality(items["forget"]["truth_ratio"], retain_ratios) if retain_ratios is not None
                else math.nan
            )
        if muse:
            found.update(muse_metrics(items))
            found["privleak"] = M.privleak(found.pop("privleak_auc", math.nan), retain_auc)
        names = (TOFU_METRICS if tofu else []) + ([m for m in MUSE_METRICS if m in found] if muse else [])
        values[name] = {m: found.get(m, math.nan) for m in names}
    return values


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
