"""The evaluate stage: every declared metric for the target, the retain model, each unlearned model and each of
its snapshots.

Reads prepare/documents.parquet + tokenizer, target/{target,retain}, unlearn/<method> and
unlearn/snapshots/<method>/step-<k>; writes metrics.parquet (model, step, metric, value: a snapshot's rows carry its
step, a final model's rows its last step, the target and retain models step 0), item_scores.parquet (long: one row
per model, step, eval set, item and value name) and the reports of stages.reports. A suite's eval sets run when
their splits are in documents.parquet.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from tqdm import tqdm

from schemas import ITEM_SCORES, METRICS, read_table, write_table
from stages.common import load_documents, load_model, load_tokenizer
from stages.config import Config
from stages.evaluate import muse, tofu
from stages.evaluate.cache import cache_path, context_key, weights_checksum
from stages.evaluate.retain_logs import read_retain_logs
from stages.evaluate.specs import Derived, ItemValue, Metric

log = logging.getLogger("sunlearn")

SUITES = (tofu, muse)
ALL_METRICS: list[Metric | Derived] = [m for suite in SUITES for m in suite.METRICS]
METRIC_NAMES = [m.name for m in ALL_METRICS]
TOFU_METRICS = [m.name for m in tofu.METRICS]
MUSE_METRICS = [m.name for m in muse.METRICS]
REFERENCE_MODELS = ("target", "retain")

Items = dict[str, dict[str, np.ndarray]]  # eval set -> value name -> per-item values


@dataclass
class EvalSet:
    """One eval set: its items, the rows its results depend on (the items, plus KnowMem's ICL examples), the
    function that runs the model over it, and the per-item values computed from that run."""

    name: str
    rows: list[dict[str, Any]]
    context_rows: list[dict[str, Any]]
    run: Callable[[Any, Any], Any]
    items: list[ItemValue]


@dataclass(frozen=True)
class ModelRef:
    name: str
    step: int
    path: Path


def _items_for(name: str) -> list[ItemValue]:
    """Every per-item value some metric reads on this eval set, plus those kept for reading; once each."""
    found: dict[str, ItemValue] = {}
    for m in ALL_METRICS:
        if isinstance(m, Metric) and m.eval_set == name:
            found.setdefault(m.item.name, m.item)
        if isinstance(m, Derived) and name in m.needs:
            for item in m.items:
                found.setdefault(item.name, item)
    for suite in SUITES:
        for item in suite.STORED.get(name, ()):
            found.setdefault(item.name, item)
    return list(found.values())


def eval_sets(documents: list[dict[str, Any]], cfg: Config) -> dict[str, EvalSet]:
    """Every eval set whose splits are present, by name (the `split` column of item_scores.parquet)."""
    by_split: dict[str, list[dict[str, Any]]] = {}
    for r in documents:
        by_split.setdefault(r["split"], []).append(r)
    new_tokens, batch = cfg.evaluate.max_new_tokens, cfg.evaluate.batch_size
    sets: dict[str, EvalSet] = {}

    def add(name: str, rows: list[dict[str, Any]], run: Callable, extra: list | None = None) -> None:
        sets[name] = EvalSet(name, rows, rows + (extra or []), run, _items_for(name))

    if any(r["question"] is not None for r in by_split.get("forget", [])):  # MUSE's forget rows are plain text
        for qa in tofu.QA_SETS:
            rows = tofu.evaluation_rows(documents, qa.split, cfg.evaluate.retain_eval_items)
            if rows:
                add(qa.split, rows, partial(tofu.run_qa, rows=rows, qa=qa, max_new_tokens=new_tokens,
                                            batch_size=batch))
            else:
                log.warning("no %s items: its metrics and model_utility will be NaN", qa.split)
        if rows := by_split.get(tofu.HOLDOUT):
            add(tofu.HOLDOUT, rows, partial(tofu.run_holdout, rows=rows, batch_size=batch))
    if rows := by_split.get("verbmem"):
        add("verbmem", rows, partial(muse.run_verbmem, rows=rows, max_new_tokens=new_tokens, batch_size=batch))
    for name, icl_split in muse.KNOWMEM_SETS.items():
        if rows := by_split.get(name):
            icl = by_split.get(icl_split, [])
            add(name, rows, partial(muse.run_knowmem, rows=rows, icl=icl, max_new_tokens=new_tokens,
                                    batch_size=batch), extra=icl)
    for name in muse.PRIVLEAK_SETS:
        if rows := by_split.get(name):
            add(name, rows, partial(muse.run_privleak, rows=rows, batch_size=batch))
    return sets


def item_table(ref: ModelRef, eval_set: EvalSet, passes: Any) -> pa.Table:
    """The eval set's per-item values for one model, long: one row per (item, value name)."""
    doc_ids = [r["doc_id"] for r in eval_set.rows]
    parts = []
    for item in eval_set.items:
        values = item.fn(passes)
        n = len(doc_ids)
        parts.append(pa.table({
            "model": [ref.name] * n, "step": [ref.step] * n, "split": [eval_set.name] * n, "doc_id": doc_ids,
            "item": [item.name] * n,
            "value": pa.nulls(n, pa.float64()) if item.text else pa.array(np.asarray(values, np.float64)),
            "text": pa.array(list(values), pa.string()) if item.text else pa.nulls(n, pa.string()),
        }, schema=ITEM_SCORES))
    return pa.concat_tables(parts)


def item_values(table: pa.Table) -> Items:
    """Per eval set and value name, the numeric per-item values of a long item table (one model), nulls as NaN."""
    numeric = table.filter(pc.is_null(table["text"]))
    keys = np.asarray(pc.binary_join_element_wise(numeric["split"], numeric["item"], "/").to_pylist())
    values = numeric["value"].to_numpy(zero_copy_only=False).astype(np.float64)  # nulls become NaN
    out: Items = {}
    for key in dict.fromkeys(keys.tolist()):
        split, item = key.rsplit("/", 1)
        out.setdefault(split, {})[item] = values[keys == key]
    return out


def models_to_evaluate(cfg: Config, inputs: dict[str, Path]) -> list[ModelRef]:
    """Target, retain (when trained), then each method's snapshots in step order and its final model."""
    target_dir = Path(inputs["target"])
    if not (target_dir / "target").is_dir():
        raise FileNotFoundError(f"target model not found at {target_dir / 'target'}")
    models = [ModelRef("target", 0, target_dir / "target")]
    if (target_dir / "retain").is_dir():
        models.append(ModelRef("retain", 0, target_dir / "retain"))
    else:
        log.warning("no retain model in %s: forget_quality and privleak need a reference log", target_dir)
    unlearn = Path(inputs["unlearn"])
    manifest = unlearn / "manifest.json"
    stats = json.loads(manifest.read_text()).get("stats", {}) if manifest.is_file() else {}
    for method in cfg.unlearn.methods:
        path = unlearn / method
        if not path.is_dir():
            raise FileNotFoundError(f"unlearned model for method {method!r} not found at {path}")
        snapshots = sorted((int(p.name.removeprefix("step-")), p) for p in (unlearn / "snapshots" / method).glob(
            "step-*") if p.is_dir())
        models += [ModelRef(method, step, p) for step, p in snapshots]
        last = stats.get(method, {}).get("last_step", stats.get(method, {}).get("steps"))
        models.append(ModelRef(method, int(last) if last is not None else 0, path))
    return models


def evaluate(cfg: Config, inputs: dict[str, Path], out: Path, eval_cache: Path | None = None) -> dict[str, Any]:
    """Evaluate every model on every eval set, reusing per-item results from `eval_cache` for unchanged weights."""
    start = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    documents = load_documents(inputs["prepare"]).to_pylist()
    tokenizer = load_tokenizer(inputs["prepare"])
    sets = eval_sets(documents, cfg)
    models = models_to_evaluate(cfg, inputs)
    context = context_key(inputs["prepare"], cfg)

    per_model: dict[tuple[str, int], Items] = {}
    tables: list[pa.Table] = []
    hits = 0
    bar = tqdm(total=len(models) * len(sets), desc="evaluate", unit="set")
    for ref in models:
        model_start = time.perf_counter()
        checksum, model, parts = weights_checksum(ref.path), None, []
        for eval_set in sets.values():
            bar.set_postfix_str(f"{ref.name}@{ref.step}/{eval_set.name}")
            cached = cache_path(eval_cache, checksum, eval_set.name, eval_set.context_rows, context) \
                if eval_cache is not None else None
            if cached is not None and cached.is_file():
                table = read_table(cached)
                hits += 1
            else:
                if model is None:
                    model = load_model(ref.path).eval()
                table = item_table(ref, eval_set, eval_set.run(model, tokenizer))
                if cached is not None:
                    cached.parent.mkdir(parents=True, exist_ok=True)
                    write_table(table, cached)
            n = len(table)
            table = table.set_column(0, "model", pa.array([ref.name] * n, pa.string()))
            table = table.set_column(1, "step", pa.array([ref.step] * n, pa.int64()))
            parts.append(table)
            bar.update(1)
        tables += parts
        per_model[(ref.name, ref.step)] = item_values(pa.concat_tables(parts)) if parts else {}
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.info("evaluated %s at step %d in %.1fs", ref.name, ref.step, time.perf_counter() - model_start)
    bar.close()

    values = summarise(per_model, sets, cfg.evaluate.retain_logs)
    metrics = metrics_table(values)
    write_table(metrics, out / "metrics.parquet")
    write_table(pa.concat_tables(tables) if tables else ITEM_SCORES.empty_table(), out / "item_scores.parquet")

    from stages.reports import format_table, write_reports

    log.info("evaluation summary\n%s", format_table(metrics))
    write_reports(out, inputs, metrics)
    final = final_metrics(metrics)
    return {
        "models": list(final),
        "eval_sets": list(sets),
        "evaluated": len(models),
        "cache_hits": hits,
        "seconds": round(time.perf_counter() - start, 2),
        "summary": {name: {m: v[m] for m in ("forget_quality", "model_utility", "privleak", "tofu_privleak") if m in v}
                    for name, v in final.items()},
    }


def summarise(per_model: dict[tuple[str, int], Items], sets: dict[str, Any],
              retain_logs: str | None = None) -> dict[tuple[str, int], dict[str, float]]:
    """Every model's metrics in declaration order; those derived against the retain model use its step-0 items,
    or a retain model's log when there is no retain model."""
    reference = read_retain_logs(retain_logs) if retain_logs else {}
    retain_items = per_model.get(("retain", 0))
    values: dict[tuple[str, int], dict[str, float]] = {}
    for key, items in per_model.items():
        found: dict[str, float] = {}
        for m in ALL_METRICS:
            if isinstance(m, Metric) and m.eval_set in sets:
                found[m.name] = m.aggregate(items[m.eval_set][m.item.name])
        for m in ALL_METRICS:
            if isinstance(m, Derived) and all(s in sets for s in m.needs):
                found[m.name] = m.fn(found, items, retain_items, reference)
        values[key] = {name: found[name] for name in METRIC_NAMES if name in found}
    return values


def metrics_table(values: dict[tuple[str, int], dict[str, float]]) -> pa.Table:
    rows = [(name, step, metric, value) for (name, step), v in values.items() for metric, value in v.items()]
    return pa.table({"model": [r[0] for r in rows], "step": [r[1] for r in rows], "metric": [r[2] for r in rows],
                     "value": [r[3] for r in rows]}, schema=METRICS)


def final_metrics(metrics: pa.Table | list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """model -> metric -> value at each model's last step: what a run without snapshots reports."""
    records = metrics.to_pylist() if isinstance(metrics, pa.Table) else metrics
    last: dict[str, int] = {}
    for r in records:
        last[r["model"]] = max(last.get(r["model"], r.get("step", 0)), r.get("step", 0))
    out: dict[str, dict[str, float]] = {}
    for r in records:
        if r.get("step", 0) == last[r["model"]]:
            out.setdefault(r["model"], {})[r["metric"]] = r["value"]
    return out
