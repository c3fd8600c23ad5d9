"""The matched comparison on hand-made curves: first crossings, interpolation, log axes, levels never reached."""

from __future__ import annotations

import math

import pytest

from stages.curves import AXES, Curve, common_level, crossing, curves_from_metrics, matched, matched_table


def _curve(method: str, run: str, points: list[tuple[int, float, float, float]]) -> Curve:
    """(step, forget_fact_recall, forget_quality, model_utility) per point."""
    return Curve(method, run, [p[0] for p in points],
                 [{"forget_fact_recall": p[1], "forget_quality": p[2], "model_utility": p[3]} for p in points])


SU = [_curve("su", "0", [(0, 1.0, 1e-6, 0.8), (5, 0.6, 1e-4, 0.7), (10, 0.2, 1e-2, 0.6)]),
      _curve("su", "1", [(0, 1.0, 1e-6, 0.8), (5, 0.4, 1e-3, 0.6), (10, 0.1, 1e-1, 0.5)])]
GD = [_curve("graddiff", "0", [(0, 1.0, 1e-6, 0.8), (5, 0.7, 1e-5, 0.5), (10, 0.5, 1e-4, 0.3)])]


def test_crossing_interpolates_between_the_bracketing_snapshots():
    # recall falls 0.6 -> 0.2 between steps 5 and 10; 0.4 is halfway, so utility is halfway between 0.7 and 0.6
    utility, step = crossing(SU[0], AXES["forget_fact_recall"], 0.4)
    assert utility == pytest.approx(0.65) and step == pytest.approx(7.5)


def test_log_axis_interpolates_in_log_space():
    # forget quality 1e-4 -> 1e-2: 1e-3 is halfway on a log scale (not at 0.1 of the way, as on a linear one)
    utility, step = crossing(SU[0], AXES["forget_quality"], 1e-3)
    assert utility == pytest.approx(0.65) and step == pytest.approx(7.5)


def test_a_curve_that_never_reaches_the_level_is_not_reached():
    assert crossing(GD[0], AXES["forget_fact_recall"], 0.2) is None
    rows = {r.method: r for r in matched(SU + GD, AXES["forget_fact_recall"], 0.2, "x")}
    assert rows["graddiff"].n == 0 and rows["graddiff"].total == 1 and math.isnan(rows["graddiff"].mean)
    assert rows["su"].n == 2  # seed 1 passes 0.2 between 0.4 and 0.1: 1/3 of the way from 0.6 to 0.5
    assert rows["su"].mean == pytest.approx((0.6 + (0.6 - (0.2 / 0.3) * 0.1)) / 2)


def test_the_first_crossing_counts_when_a_curve_crosses_twice():
    back = _curve("npo", "0", [(0, 1.0, 1e-6, 0.9), (5, 0.3, 1e-3, 0.7), (10, 0.8, 1e-5, 0.8), (15, 0.1, 1e-2, 0.2)])
    utility, step = crossing(back, AXES["forget_fact_recall"], 0.3)
    assert step == 5 and utility == pytest.approx(0.7)


def test_common_level_is_the_strongest_forgetting_every_curve_reaches():
    assert common_level(SU + GD, AXES["forget_fact_recall"]) == pytest.approx(0.5)  # graddiff gets no lower
    assert common_level(SU + GD, AXES["forget_quality"]) == pytest.approx(1e-4)
    rows = matched_table(SU + GD, ["forget_fact_recall"], {"forget_fact_recall": 0.15})
    assert [(r.level_name, r.method, r.n) for r in rows] == [
        ("common", "su", 2), ("common", "graddiff", 1), ("retain", "su", 1), ("retain", "graddiff", 0)]
    assert next(r for r in rows if r.method == "graddiff").mean == pytest.approx(0.3)


def test_curves_from_metrics_start_at_the_target():
    records = [{"model": m, "step": s, "metric": "model_utility", "value": v}
               for m, s, v in [("target", 0, 0.9), ("retain", 0, 0.85), ("su", 5, 0.7), ("su", 10, 0.6)]]
    curves, references = curves_from_metrics(records, run="seed=0")
    assert [(c.method, c.steps) for c in curves] == [("su", [0, 5, 10])]
    assert curves[0].values("model_utility").tolist() == [0.9, 0.7, 0.6]
    assert set(references) == {"target", "retain"}
