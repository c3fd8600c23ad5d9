"""Unlearning curves and the comparison read off them: model utility at a matched level of forgetting.

A curve is one run of one method (one seed): its metrics at step 0 (the target it starts from), at every snapshot
and at its final step. At a level of a forget axis, a method's utility is read off each curve at the first crossing
of that level (the one reached with the least training), interpolated between the two points that bracket it (on a
log scale for the log axes), and summarised over seeds; a curve that never reaches the level counts as not reached.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

UTILITY = "model_utility"


@dataclass(frozen=True)
class Axis:
    name: str
    down: bool  # forgetting lowers it (fact recall, probability); else raises it (forget quality, truth ratio)
    log: bool


AXES = {
    a.name: a
    for a in (
        Axis("forget_quality", down=False, log=True),
        Axis("forget_fact_recall", down=True, log=False),
        Axis("forget_prob", down=True, log=True),
        Axis("forget_truth_ratio", down=False, log=False),
    )
}
LOG_FLOOR = 1e-300  # a p-value or probability that underflowed to 0 still has a place on a log axis


@dataclass
class Curve:
    method: str
    run: str  # what tells this curve from the method's others, e.g. its seed
    steps: list[int]
    metrics: list[dict[str, float]] = field(default_factory=list)  # one per step

    def values(self, name: str) -> np.ndarray:
        return np.array([m.get(name, math.nan) for m in self.metrics], dtype=np.float64)


@dataclass(frozen=True)
class Matched:
    """One method's utility at one level of one axis, over its curves (seeds)."""

    axis: str
    level: float
    level_name: str
    method: str
    n: int  # curves that reach the level
    total: int
    mean: float
    std: float
    step: float  # mean (interpolated) step of the crossing


def _scale(axis: Axis, values: np.ndarray) -> np.ndarray:
    """The axis in its plotting units, oriented so that forgetting increases it."""
    v = np.log10(np.maximum(values, LOG_FLOOR)) if axis.log else np.asarray(values, dtype=np.float64)
    return -v if axis.down else v


def crossing(curve: Curve, axis: Axis, level: float) -> tuple[float, float] | None:
    """(utility, step) where the curve first reaches `level` of `axis`, interpolated; None if it never does."""
    x = _scale(axis, curve.values(axis.name))
    y = curve.values(UTILITY)
    target = _scale(axis, np.array([level]))[0]
    steps = np.asarray(curve.steps, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y, steps = x[ok], y[ok], steps[ok]
    reached = np.flatnonzero(x >= target)
    if not reached.size:
        return None
    i = int(reached[0])
    if i == 0 or x[i] == target:
        return float(y[i]), float(steps[i])
    w = (target - x[i - 1]) / (x[i] - x[i - 1])
    return float(y[i - 1] + w * (y[i] - y[i - 1])), float(steps[i - 1] + w * (steps[i] - steps[i - 1]))


def common_level(curves: Sequence[Curve], axis: Axis) -> float:
    """The strongest forgetting that every curve reaches: the least forgotten of the curves' most-forgotten values."""
    best = []
    for c in curves:
        x = _scale(axis, c.values(axis.name))
        if np.isfinite(x).any():
            best.append(np.nanmax(x))
    if not best:
        return math.nan
    edge = min(best)
    value = -edge if axis.down else edge
    return float(10.0 ** value) if axis.log else float(value)


def matched(curves: Sequence[Curve], axis: Axis, level: float, level_name: str) -> list[Matched]:
    """Per method (in first-seen order): utility at `level` over its curves that reach it."""
    out = []
    for method in dict.fromkeys(c.method for c in curves):
        own = [c for c in curves if c.method == method]
        hits = [h for h in (crossing(c, axis, level) for c in own) if h is not None]
        utility = np.array([h[0] for h in hits])
        out.append(Matched(axis.name, level, level_name, method, len(hits), len(own),
                           float(utility.mean()) if hits else math.nan,
                           float(utility.std(ddof=1)) if len(hits) > 1 else math.nan,
                           float(np.mean([h[1] for h in hits])) if hits else math.nan))
    return out


def matched_table(
    curves: Sequence[Curve], axes: Iterable[str], retain: dict[str, float] | None = None
) -> list[Matched]:
    """For each axis, the default levels: the strongest forgetting every curve reaches, and the retain model's
    own value (where a retain model was evaluated)."""
    rows: list[Matched] = []
    for name in axes:
        axis = AXES[name]
        levels = [("common", common_level(curves, axis))]
        if retain and math.isfinite(retain.get(name, math.nan)):
            levels.append(("retain", float(retain[name])))
        for level_name, level in levels:
            if math.isfinite(level):
                rows += matched(curves, axis, level, level_name)
    return rows


def curves_from_metrics(records: Iterable[dict], run: str = "") -> tuple[list[Curve], dict[str, dict[str, float]]]:
    """Curves of every unlearned model in a metrics table (model, step, metric, value), each starting at the
    target's step-0 metrics, and the reference models' metrics (target, retain)."""
    by_model: dict[str, dict[int, dict[str, float]]] = {}
    for r in records:
        by_model.setdefault(r["model"], {}).setdefault(int(r.get("step", 0)), {})[r["metric"]] = r["value"]
    references = {m: by_model[m][0] for m in ("target", "retain") if m in by_model and 0 in by_model[m]}
    curves = []
    for model, points in by_model.items():
        if model in references:
            continue
        steps = sorted(points)
        if "target" in references and 0 not in points:
            steps, start = [0, *steps], {0: references["target"]}
        else:
            start = {}
        merged = {**start, **points}
        curves.append(Curve(model, run, steps, [merged[s] for s in steps]))
    return curves, references
