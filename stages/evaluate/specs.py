"""Metric declarations: each metric names its eval set, its per-item function and its aggregate, once.

Everything else derives from these lists: the per-item values the evaluate stage computes (item_scores.parquet is
long, one row per model, step, eval set, item and value name, so a new metric needs no schema change), the metric
names and their order in metrics.parquet, and the columns of every report. A suite module (tofu.py, muse.py) declares
its metrics next to the per-item functions they use.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages import metrics as M

HIGHER, LOWER, ZERO = "higher", "lower", "zero"  # which value is better


@dataclass(frozen=True)
class ItemValue:
    """A per-item value of an eval set: `fn(passes) -> (n,) array` (or a list of strings for text)."""

    name: str
    fn: Callable[[Any], Any]
    text: bool = False


@dataclass(frozen=True)
class Metric:
    """A summary metric: the aggregate of one per-item value over one eval set."""

    name: str
    eval_set: str
    item: ItemValue
    aggregate: Callable[[np.ndarray], float]
    better: str
    doc: str


@dataclass(frozen=True)
class Derived:
    """A metric computed from a model's other metrics and per-item values, and those of the retain model.

    `fn(values, items, retain_items, reference) -> float`: `values` this model's aggregates so far, `items` and
    `retain_items` per eval set and value name, `reference` a retain model's open-unlearning log (or {}).
    """

    name: str
    needs: tuple[str, ...]  # eval sets that must be present
    items: tuple[ItemValue, ...]  # per-item values it reads on each of those sets
    fn: Callable[..., float]
    better: str
    doc: str


def nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


def mean(values: np.ndarray) -> float:
    return float(np.mean(np.asarray(values, dtype=np.float64)))


def privleak(forget_set: str, holdout_set: str) -> Callable[..., float]:
    """MUSE's PrivLeak as a Derived function: the Min-K% AUC of `forget_set` against `holdout_set`, relative to the
    retain model's AUC (or, without the retain model's items, a retain log's `privleak_auc`)."""
    def derive(values, items, retain_items, reference) -> float:
        def auc(of: dict) -> float:
            return M.forget_holdout_auc(of[forget_set]["min_k"], of[holdout_set]["min_k"])

        have_retain = retain_items and forget_set in retain_items and holdout_set in retain_items
        return M.privleak(auc(items), auc(retain_items) if have_retain else reference.get("privleak_auc", math.nan))
    return derive
