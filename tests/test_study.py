"""`sunlearn study` on a micro study: the page, its curves and fingerprints, and `--check` finding it stale after
an edit to code a stage imports (in a copy of the repository) or to the study file."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.study import (
    check_study,
    head_to_head,
    load_study,
    matched_parts_markdown,
    parts_at,
    readme_excerpt,
    run_study,
    study_points,
    to_compute,
    versus_markdown,
)
from stages.code_version import REPO
from stages.config import ConfigError
from stages.curves import Curve

MICRO = {"preset": "micro", "overrides": {"evaluate.max_new_tokens": 4}, "grid": {"unlearn.seed": [0, 1]}}


def _write(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def micro_study(tmp_path_factory, prefect_harness):
    root = tmp_path_factory.mktemp("study")
    path = _write(root / "micro.yaml", MICRO)
    out = root / "results"
    page, failed = run_study(load_study(path), str(root / "artifacts"), out, parallel=2)  # two local processes
    assert failed == []
    return path, out, page


def test_page_holds_the_matched_table_final_metrics_selection_and_runs(micro_study):
    path, out, page = micro_study
    text = page.read_text()
    for heading in ("## Model utility at matched forgetting", "## Final models", "## Selection", "## Runs"):
        assert heading in text
    assert "| su | 2 |" in text and "| graddiff | 2 |" in text  # two seeds each
    computed = re.search(r"the artifacts its runs read took ([0-9.]+) min to compute", text)
    assert computed and float(computed.group(1)) > 0  # the stage time from the manifests, not this call's
    assert (out / "micro-curves.png").stat().st_size > 10_000
    record = json.loads((out / "micro.json").read_text())
    assert [p["overrides"] for p in record["points"]] == [p.overrides for p in study_points(load_study(path))]
    for point in record["points"]:
        assert point["fingerprints"]["evaluate"] in text
    import torch
    import transformers

    assert record["libraries"]["torch"] == torch.__version__ and record["cpu"]  # what no fingerprint covers
    assert f"torch {torch.__version__}, transformers {transformers.__version__}," in text


def test_check_is_clean_on_fresh_results(micro_study):
    path, out, _ = micro_study
    assert check_study(path, out) == []


def test_check_finds_the_page_stale_after_a_stage_module_changes(micro_study, tmp_path):
    path, out, _ = micro_study
    copy = tmp_path / "repo"
    for name in ("stages", "schemas", "data", "pipeline"):
        shutil.copytree(REPO / name, copy / name, ignore=shutil.ignore_patterns("__pycache__"))
    script = f"from pipeline.study import check_study; print(check_study({str(path)!r}, {str(out)!r}))"
    env = {**os.environ, "PYTHONPATH": str(copy)}

    def check() -> str:
        run = subprocess.run([sys.executable, "-c", script], cwd=copy, env=env, capture_output=True, text=True,
                             check=True, timeout=300)
        return run.stdout.strip().splitlines()[-1]

    assert check() == "[]"
    with open(copy / "stages" / "masks.py", "a") as fh:
        fh.write("\n# an edit\n")
    stale = check()
    assert "micro: masks" in stale and stale.count("micro:") == 2  # both runs


def test_check_finds_the_page_stale_after_the_study_file_changes(micro_study, tmp_path):
    path, out, _ = micro_study
    edited = tmp_path / "micro.yaml"
    _write(edited, {**MICRO, "grid": {"unlearn.seed": [0, 1, 2]}})
    assert "changed since" in check_study(edited, out)[0]
    assert "no results page" in check_study(_write(tmp_path / "other.yaml", MICRO), out)[0]


@pytest.mark.parametrize(("tree", "message"), [
    ({"presett": "micro"}, "did you mean 'preset'"),
    ({"preset": "micro", "axes": ["forget_qualty"]}, "did you mean 'forget_quality'"),
    ({"preset": "micro", "grid": {"masks.gama": [0.3]}}, "unknown config key 'masks.gama'"),
    ({"preset": "micro", "variants": {"su": {"grid": {"unlearn.seed": 3}}}}, "variant su: grid must map"),
])
def test_a_bad_study_file_is_one_clear_line(tree, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        load_study(_write(tmp_path / "bad.yaml", tree))


def test_a_variant_grid_replaces_the_study_grid_for_that_variant_only(tmp_path):
    tree = {"preset": "micro", "grid": {"unlearn.seed": [0, 1, 2]},
            "variants": {"su": {"unlearn.methods": "su"},
                         "wga": {"unlearn.methods": "wga", "grid": {"unlearn.seed": [0]}}}}
    points = study_points(load_study(_write(tmp_path / "grids.yaml", tree)))
    assert [(p.variant, p.values) for p in points] == [
        ("su", {"unlearn.seed": "0"}), ("su", {"unlearn.seed": "1"}), ("su", {"unlearn.seed": "2"}),
        ("wga", {"unlearn.seed": "0"})]
    assert points[-1].overrides[-2:] == ["unlearn.methods=wga", "unlearn.seed=0"]


def _curve(method: str, quality: list[float], utility: list[float]) -> Curve:
    metrics = [{"forget_quality": q, "model_utility": u} for q, u in zip(quality, utility, strict=True)]
    return Curve(method, "", [0, 10], metrics)


def test_head_to_head_reads_each_variant_at_the_forgetting_both_baselines_reach(tmp_path):
    curves = [_curve("graddiff", [0.01, 0.5], [0.8, 0.4]), _curve("npo_gd", [0.01, 1.0], [0.8, 0.6]),
              _curve("su", [0.01, 0.5], [0.8, 0.7]), _curve("su_weak", [0.01, 0.5], [0.8, 0.42]),
              _curve("su_short", [0.01, 0.1], [0.8, 0.79])]
    rows = {r["variant"]: r for r in head_to_head(curves, ["su", "su_weak", "su_short"], "forget_quality")}
    assert [r["level"] for r in rows.values()] == pytest.approx([0.5] * 3)  # graddiff's best; npo_gd goes further
    # npo_gd interpolated on the log axis: 0.8 - 0.2 * (log10(0.5) + 2) / 2
    assert rows["su"]["npo_gd"].mean == pytest.approx(0.8 - 0.2 * (math.log10(0.5) + 2) / 2)
    assert rows["su"]["vs_graddiff"] == pytest.approx(0.3) and rows["su"]["met"]
    assert not rows["su_weak"]["met"]  # +0.02 over graddiff is under the bar
    assert rows["su_short"]["mine"].n == 0 and not rows["su_short"]["met"]  # forgetting less is not keeping more
    page = versus_markdown(list(rows.values()), "forget_quality")
    assert "Bar met by su." in page and "| su_short | 0.500 | 0/1 | not reached |" in page
    excerpt = readme_excerpt(load_study(_write(tmp_path / "x.yaml", MICRO)), "", [], page)
    assert excerpt.splitlines()[2].startswith("| variant |") and excerpt.endswith("Bar met by su.")
    assert "Closest: su_weak" in versus_markdown([rows["su_weak"], rows["su_short"]], "forget_quality")
    assert head_to_head([c for c in curves if c.method != "npo_gd"], ["su"], "forget_quality") == []


def test_a_diverged_seed_counts_as_a_run_that_reaches_nothing():
    curves = [_curve("graddiff", [0.01, 0.5], [0.8, 0.4]), _curve("npo_gd", [0.01, 1.0], [0.8, 0.6]),
              _curve("su", [0.01, 0.5], [0.8, 0.7])]
    (row,) = head_to_head(curves, ["su"], "forget_quality", lost={"su": 1})
    assert (row["mine"].n, row["mine"].total) == (1, 2) and not row["met"]  # met with its one other seed alone
    assert "| su | 0.500 | 1/2 |" in versus_markdown([row], "forget_quality")


def test_the_utility_parts_are_read_at_the_matched_crossing_and_name_where_the_closest_variant_loses():
    def curve(method, quality, utility, retain_prob, ra_prob):
        metrics = [{"forget_quality": q, "model_utility": u, "retain_prob": r, "ra_prob": a}
                   for q, u, r, a in zip(quality, utility, retain_prob, ra_prob, strict=True)]
        return Curve(method, "", [0, 10], metrics)

    curves = [curve("graddiff", [0.01, 0.5], [0.8, 0.4], [1.0, 0.2], [0.9, 0.7]),
              curve("npo_gd", [0.01, 1.0], [0.8, 0.6], [1.0, 0.5], [0.9, 0.8]),
              curve("su", [0.01, 1.0], [0.8, 0.6], [1.0, 0.6], [0.9, 0.3])]
    versus = head_to_head(curves, ["su"], "forget_quality")
    w = (math.log10(0.5) + 2) / 2  # su crosses graddiff's best forget quality between its snapshots
    assert parts_at([curves[2]], "forget_quality", 0.5)["retain_prob"] == pytest.approx(1.0 - 0.4 * w)
    page = matched_parts_markdown(curves, versus, "forget_quality")
    assert f"| su | {1.0 - 0.4 * w:.3f} | {0.9 - 0.6 * w:.3f} |" in page, page
    assert f"su (the closest variant) loses most in ra_prob ({0.9 - 0.6 * w - 0.7:+.3f}) and keeps most in " \
           f"retain_prob ({1.0 - 0.4 * w - 0.2:+.3f})." in page, page


def test_a_run_that_diverges_is_a_result_on_the_page_and_keeps_it_current(micro_study, tmp_path):
    path, _, _ = micro_study
    tree = {**MICRO, "grid": {"unlearn.seed": [0]},
            "variants": {"su": {"unlearn.methods": "su"},
                         "su_diverging": {"unlearn.methods": "su", "unlearn.max_forget_loss": 0.001}}}
    study_path = _write(tmp_path / "diverging.yaml", tree)
    study, out, root = load_study(study_path), tmp_path / "results", str(path.parent / "artifacts")
    before = to_compute(study, study_points(study), root)  # the fixture's cache has every stage up to masks
    assert "prepare 0 of 1, target 0 of 1" in before and "unlearn 2 of 2, evaluate 2 of 2" in before, before
    page, failed = run_study(study, root, out)
    assert failed == []
    assert to_compute(study, study_points(study), root).endswith("unlearn 1 of 2, evaluate 1 of 2")  # the diverged
    section = page.read_text().split("## Diverged runs", 1)[1]
    assert "unlearn.max_forget_loss=0.001" in section and "UnlearnDiverged: su: forget NLL" in section
    record = json.loads((out / "diverging.json").read_text())
    assert [p["variant"] for p in record["points"]] == ["su", "su_diverging"]
    assert "diverged" not in record["points"][0] and "max_forget_loss" in record["points"][1]["diverged"]
    assert check_study(study_path, out) == []


def test_a_micro_run_with_snapshots_has_every_method_at_several_steps_and_curves(tmp_path, prefect_harness):
    from pipeline.flows import pipeline_flow

    summary = pipeline_flow(preset="micro", overrides=["unlearn.snapshot_every=1"], artifacts=str(tmp_path))
    steps: dict[str, set[int]] = {}
    for row in summary["metrics"]:
        steps.setdefault(row["model"], set()).add(row["step"])
    assert steps["target"] == steps["retain"] == {0}
    for method in ("su", "graddiff"):
        assert len(steps[method]) > 1, steps
    evaluate = next(s for s in summary["stages"] if s["name"] == "evaluate")
    assert (Path(evaluate["path"]) / "curves.png").stat().st_size > 10_000
    assert "## Model utility at matched forgetting" in (Path(evaluate["path"]) / "results.md").read_text()
