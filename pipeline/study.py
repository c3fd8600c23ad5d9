"""`sunlearn study FILE`: a study kept as a file, run through the pipeline's cache, written as a results page.

A study file (studies/<name>.yaml) names a preset and its overrides, optional named variants (each a set of
overrides), a grid (any config key; the product is taken), the snapshot cadence and the forget axes. Every point
(variant × grid) is an ordinary pipeline run, so everything cached is reused. The page docs/results/<name>.md holds
the matched table, the curves (<name>-curves.png), each variant's final-model metrics, the selection's precision
and recall, the date, machine and commit, and the fingerprints of every run; <name>.json keeps those fingerprints
for `sunlearn study --check`, which recomputes them from the current code and config without running anything.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import platform
import subprocess
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pipeline.dag import ORDER, fingerprints
from schemas import write_json_atomic
from stages.config import ConfigError, load_config, suggest
from stages.curves import AXES, Curve, Matched, common_level, crossing, curves_from_metrics, matched, matched_table
from stages.environment import REPO

STUDIES_DIR = REPO / "studies"
RESULTS_DIR = REPO / "docs" / "results"
README = REPO / "README.md"  # its <!-- study:NAME --> blocks are rewritten from the page, never by hand
FIELDS = ("description", "preset", "overrides", "variants", "grid", "seeds_key", "snapshot_every", "axes")
BASELINES = ("graddiff", "npo_gd")  # the SU issue's bar: graddiff + MARGIN, and at least npo_gd
MARGIN = 0.05
HEADLINE = ("forget_quality", "model_utility", "forget_fact_recall", "forget_rouge", "retain_rouge", "forget_prob",
            "forget_truth_ratio", "verbmem_f", "knowmem_f", "knowmem_r", "privleak")


@dataclass
class Study:
    name: str
    path: Path
    description: str = ""
    preset: str = "embedded"
    overrides: list[str] = field(default_factory=list)
    variants: dict[str, list[str]] = field(default_factory=dict)  # label -> overrides; empty: one unnamed variant
    grid: dict[str, list[str]] = field(default_factory=dict)
    variant_grids: dict[str, dict[str, list[str]]] = field(default_factory=dict)  # a variant's own grid values

    def grid_of(self, variant: str) -> dict[str, list[str]]:
        """The grid a variant runs: the study's, with the variant's own values (its `grid:`) in their place."""
        return {**self.grid, **self.variant_grids.get(variant, {})}
    seeds_key: str | None = "unlearn.seed"
    snapshot_every: int | None = None  # None: the preset's own setting
    axes: list[str] = field(default_factory=lambda: list(AXES))


@dataclass(frozen=True)
class Point:
    variant: str
    values: dict[str, str]  # grid key -> value
    overrides: list[str]


def _pairs(tree: Any, where: str) -> list[str]:
    """`key=value` strings from a mapping or a list of such strings."""
    if tree is None:
        return []
    if isinstance(tree, dict):
        return [f"{k}={_text(v)}" for k, v in tree.items()]
    if isinstance(tree, list) and all(isinstance(v, str) and "=" in v for v in tree):
        return list(tree)
    raise ConfigError(f"{where}: expected a mapping of config keys or a list of key=value, got {tree!r}")


def _grid(tree: Any, where: str) -> dict[str, list[str]]:
    tree = tree or {}
    if not isinstance(tree, dict) or not all(isinstance(v, list) and v for v in tree.values()):
        raise ConfigError(f"{where} must map config keys to non-empty lists of values")
    return {str(k): [str(v) for v in values] for k, values in tree.items()}


def _text(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def load_study(path: str | Path) -> Study:
    """A study file, with every point's config loaded (so a bad key or value fails before anything runs)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping of {', '.join(FIELDS)}")
    for key in tree:
        if key not in FIELDS:
            raise ConfigError(f"{path}: unknown field {key!r}{suggest(key, FIELDS)}")
    grid = _grid(tree.get("grid"), f"{path}: grid")
    variants = tree.get("variants") or {}
    if not isinstance(variants, dict):
        raise ConfigError(f"{path}: variants must map a label to its overrides")
    variant_grids = {}
    for label, overrides in variants.items():
        if isinstance(overrides, dict) and "grid" in overrides:  # config keys are dotted, so `grid` is never one
            overrides = dict(overrides)
            variant_grids[str(label)] = _grid(overrides.pop("grid"), f"{path}: variant {label}: grid")
            variants[label] = overrides
    axes = list(tree.get("axes") or AXES)
    for axis in axes:
        if axis not in AXES:
            raise ConfigError(f"{path}: unknown forget axis {axis!r}{suggest(axis, AXES)} (axes: {', '.join(AXES)})")
    every = tree.get("snapshot_every")
    study = Study(
        name=path.stem,
        path=path,
        description=str(tree.get("description") or "").strip(),
        preset=str(tree.get("preset", "embedded")),
        overrides=_pairs(tree.get("overrides"), f"{path}: overrides"),
        variants={str(k): _pairs(v, f"{path}: variant {k}") for k, v in variants.items()},
        grid=grid,
        variant_grids=variant_grids,
        seeds_key=tree.get("seeds_key", "unlearn.seed"),
        snapshot_every=int(every) if every is not None else None,
        axes=axes,
    )
    for point in study_points(study):
        load_config(study.preset, overrides=point.overrides)
    return study


def study_points(study: Study) -> list[Point]:
    """Every (variant, grid value) combination, with the overrides that configure it, in a stable order."""
    base = [*study.overrides]
    if study.snapshot_every is not None:
        base.append(f"unlearn.snapshot_every={study.snapshot_every}")
    points = []
    for variant, extra in (study.variants or {"": []}).items():
        grid = study.grid_of(variant)
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            values = dict(zip(keys, combo, strict=True))
            points.append(Point(variant, values, [*base, *extra, *(f"{k}={v}" for k, v in values.items())]))
    return points


def point_fingerprints(study: Study, point: Point) -> dict[str, str]:
    cfg = load_config(study.preset, overrides=point.overrides)
    return {stage: fp["fingerprint"] for stage, fp in fingerprints(cfg).items()}


def to_compute(study: Study, points: list[Point], artifacts: str) -> str:
    """Per stage, how many of the study's distinct artifacts the root lacks: what a run of it will compute."""
    from pipeline import storage

    cache = storage.local_cache(artifacts)
    wanted: dict[str, set[str]] = {stage: set() for stage in ORDER}
    for point in points:
        for stage, fp in point_fingerprints(study, point).items():
            wanted[stage].add(fp)
    missing = {stage: sum(not storage.is_cached(artifacts, cache.entry(stage, fp)) for fp in fps)
               for stage, fps in wanted.items()}
    if not any(missing.values()):
        return "every artifact is cached"
    return "to compute: " + ", ".join(f"{stage} {missing[stage]} of {len(wanted[stage])}" for stage in ORDER)


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def run_study(study: Study, artifacts: str, out_dir: Path = RESULTS_DIR, parallel: int = 1,
              via_deployment: bool | None = None) -> tuple[Path, list[str]]:
    """Run every point through the cached pipeline (a Prefect flow) and write the results page; returns its path
    and the runs that failed."""
    from pipeline.sweep import study_flow

    result = study_flow(file=str(study.path), artifacts=artifacts, out_dir=str(out_dir), parallel=parallel,
                        via_deployment=via_deployment)
    return Path(result["page"]), result["failed"]


def point_label(point: Point, method: str, n_methods: int) -> str:
    """The curve's name in the page: the variant when it runs one method, else the method (prefixed by a variant)."""
    if point.variant and n_methods == 1:
        return point.variant
    return f"{point.variant}/{method}" if point.variant else method


def gather(study: Study, results: list[dict[str, Any]]) -> tuple[list[Curve], dict[str, dict[str, float]]]:
    """Every point's curves, named by variant (or method), and the reference models' mean metrics."""
    curves: list[Curve] = []
    references: dict[str, list[dict[str, float]]] = {}
    for result in results:
        point = result["point"]
        seed = point.values.get(study.seeds_key or "", "")
        own, refs = curves_from_metrics(result["metrics"], run=f"{study.seeds_key}={seed}" if seed else "")
        for curve in own:
            curve.method = point_label(point, curve.method, len(own))
        curves += own
        for name, values in refs.items():
            references.setdefault(name, []).append(values)
    return curves, {name: _mean_dicts(values) for name, values in references.items()}


def _mean_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = dict.fromkeys(k for r in rows for k in r)
    return {k: float(np.mean([r.get(k, math.nan) for r in rows])) for k in keys}


def write_results(study: Study, results: list[dict[str, Any]], seconds: float, out_dir: Path = RESULTS_DIR,
                  failed: list[str] | None = None, diverged: list[dict[str, Any]] | None = None) -> Path:
    """docs/results/<name>.md, its curves PNG and its fingerprint record. `diverged` holds the runs that stopped
    with UnlearnDiverged ({point, fingerprints, error}): results of the method at its seed, recorded with the rest."""
    from stages.reports import matched_markdown, plot_curves

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    at = commit()  # before this page's own files are rewritten, which would mark the tree dirty
    curves, references = gather(study, results)
    png = out_dir / f"{study.name}-curves.png"
    has_png = plot_curves(curves, references, png)
    diverged = diverged or []
    lost = lost_runs(study, diverged)
    rows = with_lost(matched_table(curves, study.axes, references.get("retain")), lost)
    order = {tuple(p.overrides): i for i, p in enumerate(study_points(study))}
    recorded = sorted([*results, *diverged], key=lambda r: order[tuple(r["point"].overrides)])
    points = [r["point"] for r in recorded]
    record = {
        "study": study.name,
        "file": str(study.path.resolve().relative_to(REPO)) if study.path.resolve().is_relative_to(REPO) else
        str(study.path),
        "file_sha256": file_digest(study.path),
        "cpu": cpu_model(),
        "libraries": libraries(),
        "points": [{"variant": r["point"].variant, "overrides": r["point"].overrides,
                    "fingerprints": r["fingerprints"], **({"diverged": r["error"]} if "error" in r else {})}
                   for r in recorded],
    }
    page = [
        f"# Study `{study.name}`",
        "",
        *([study.description, ""] if study.description else []),
        f"Generated by `sunlearn study {record['file']}` on {time.strftime('%Y-%m-%d')}, {machine()}, at commit "
        f"{at}, in {seconds / 60:.1f} min (the artifacts its runs read took {compute_seconds(results) / 60:.1f} "
        "min to compute). `sunlearn study --check` says whether the code or config has "
        "changed since; this page is never edited by hand.",
        "",
        f"CPU {record['cpu']}; " + ", ".join(f"{k} {v}" for k, v in record["libraries"].items()) + ". The "
        "fingerprints do not cover these: another CPU or library version can give other numbers for the same runs.",
        "",
        "## Set-up",
        "",
        f"- preset `{study.preset}`" + (f", overrides `{' '.join(study.overrides)}`" if study.overrides else ""),
        *(f"- variant `{name}`: `{' '.join(extra) or '(preset as is)'}`"
          + "".join(f"; its own grid `{k}`: {', '.join(v)}" for k, v in study.variant_grids.get(name, {}).items())
          for name, extra in study.variants.items()),
        *(f"- grid `{key}`: {', '.join(values)}" for key, values in study.grid.items()),
        f"- snapshots every {study.snapshot_every} optimizer steps" if study.snapshot_every else
        "- no snapshots: each curve runs from the target (step 0) to the final model",
        f"- {len(points)} runs; mean ± std over `{study.seeds_key}`" if study.seeds_key in study.grid else
        f"- {len(points)} runs, one seed each",
        "",
        matched_markdown(rows).rstrip() or "No matched comparison: no curve has a forget axis value.",
        "",
    ]
    versus = head_to_head(curves, selective_labels(study, recorded), study.axes[0], lost)
    versus_md = versus_markdown(versus, study.axes[0]) if versus else ""
    if versus_md:
        page += [versus_md, "", matched_parts_markdown(curves, versus, study.axes[0]), ""]
    if has_png:
        page += ["## Curves", "", f"![model utility against each forget axis]({png.name})", ""]
    final = final_markdown(curves, references)
    page += [final, "", utility_markdown(curves, references), "", retain_losses_markdown(results), "",
             selection_markdown(study, results), "", runs_markdown(recorded)]
    if diverged:
        page += ["", "## Diverged runs", "",
                 "These runs stopped with UnlearnDiverged. The same code, config and seed diverge again, so each is a "
                 "result of its method at this budget: it counts in n as a run that reached no level, and `--check` "
                 "holds the page current.", "",
                 *(f"- `{' '.join(r['point'].overrides)}`: {r['error']}" for r in diverged)]
    if failed:
        page += ["", "## Failed runs", "",
                 "These runs failed, so the page leaves them out and `--check` calls it stale:", "",
                 *(f"- `{f}`" for f in failed)]
    md = out_dir / f"{study.name}.md"
    md.write_text("\n".join(page).rstrip() + "\n")
    headline = [r for r in rows if r.axis == study.axes[0] and r.level_name == "common"]
    record["excerpt"] = readme_excerpt(study, final, headline, versus_md)
    write_json_atomic(out_dir / f"{study.name}.json", record)
    if out_dir.resolve() == RESULTS_DIR.resolve():
        update_readme(study.name, record["excerpt"])
    return md


def compute_seconds(results: list[dict[str, Any]]) -> float:
    """The stage time behind every artifact the runs read, each counted once (a page regenerated from the cache
    still says what the study cost); artifacts of a remote root that were not fetched count 0."""
    paths = {path for r in results for path in r.get("paths", {}).values()}
    manifests = [Path(p) / "manifest.json" for p in paths]
    return sum(float(json.loads(m.read_text()).get("seconds", 0.0)) for m in manifests if m.is_file())


def lost_runs(study: Study, diverged: list[dict[str, Any]]) -> dict[str, int]:
    """Per curve label, how many of its runs diverged (each method of a diverged point lost its curve)."""
    lost: dict[str, int] = {}
    for run in diverged:
        methods = load_config(study.preset, overrides=run["point"].overrides).unlearn.methods
        for method in methods:
            label = point_label(run["point"], method, len(methods))
            lost[label] = lost.get(label, 0) + 1
    return lost


def selective_labels(study: Study, results: list[dict[str, Any]]) -> list[str]:
    """The curve labels (variants) whose method trains on SU's selection, in the page's order."""
    from stages.unlearn import METHODS

    labels = {}
    for result in results:
        point = result["point"]
        methods = load_config(study.preset, overrides=point.overrides).unlearn.methods
        for method in methods:
            if METHODS[method].selective:
                labels[point_label(point, method, len(methods))] = None
    return list(labels)


def head_to_head(curves: list[Curve], selective: list[str], axis_name: str,
                 lost: dict[str, int] | None = None) -> list[dict[str, Any]]:
    """Per selective variant, its model utility at the strongest forgetting that every seed of both baselines
    reaches, beside theirs; empty without both baselines. A variant that does not reach the level cannot meet the
    bar: forgetting less is not keeping more. `lost` counts each label's diverged runs, seeds that reach nothing."""
    axis = AXES[axis_name]
    own = {label: [c for c in curves if c.method == label] for label in dict.fromkeys(c.method for c in curves)}
    if not all(own.get(b) for b in BASELINES):
        return []
    level = common_level([c for b in BASELINES for c in own[b]], axis)
    if not math.isfinite(level):
        return []
    gd, npo = with_lost(matched([c for b in BASELINES for c in own[b]], axis, level, "baselines"), lost)
    rows = []
    for label in selective:
        if not own.get(label):
            continue
        (mine,) = with_lost(matched(own[label], axis, level, "baselines"), lost)
        reached = mine.n == mine.total
        rows.append({"variant": label, "level": level, "mine": mine, "graddiff": gd, "npo_gd": npo,
                     "vs_graddiff": mine.mean - gd.mean, "vs_npo_gd": mine.mean - npo.mean,
                     "met": reached and mine.mean >= gd.mean + MARGIN and mine.mean >= npo.mean})
    return rows


def with_lost(rows: list[Matched], lost: dict[str, int] | None) -> list[Matched]:
    """The matched rows with each method's diverged runs in its total: a run that diverged reached no level."""
    return [replace(r, total=r.total + (lost or {}).get(r.method, 0)) for r in rows]


def versus_markdown(rows: list[dict[str, Any]], axis: str) -> str:
    from stages.reports import _cell

    def cell(m) -> str:
        return f"{_cell(m.mean)} ± {_cell(m.std)}" if math.isfinite(m.std) else _cell(m.mean)

    lines = [
        "## Selective variants against the baselines",
        "",
        f"Each selective variant's model utility where its curve first reaches the strongest {axis} that every seed "
        f"of {BASELINES[0]} and {BASELINES[1]} reaches, beside theirs (mean ± std over seeds; n = seeds that reach "
        f"it). The bar: every seed reaches it, at least {BASELINES[0]} + {MARGIN} and at least {BASELINES[1]}.",
        "",
        f"| variant | {axis} | n | variant's model_utility | {BASELINES[0]} | {BASELINES[1]} | vs {BASELINES[0]} | "
        f"vs {BASELINES[1]} | bar met |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        mine = r["mine"]
        if mine.n == 0:
            lines.append(f"| {r['variant']} | {_cell(r['level'])} | 0/{mine.total} | not reached | "
                         f"{cell(r['graddiff'])} | {cell(r['npo_gd'])} | – | – | no |")
            continue
        lines.append(f"| {r['variant']} | {_cell(r['level'])} | {mine.n}/{mine.total} | {cell(mine)} | "
                     f"{cell(r['graddiff'])} | {cell(r['npo_gd'])} | {r['vs_graddiff']:+.3f} | {r['vs_npo_gd']:+.3f} | "
                     f"{'yes' if r['met'] else 'no'} |")
    met = [r for r in rows if r["met"]]
    reached = [r for r in rows if r["mine"].n == r["mine"].total]
    if met:
        lines += ["", f"Bar met by {', '.join(r['variant'] for r in met)}."]
    elif reached:
        best = closest(reached)
        lines += ["", f"No variant meets the bar. Closest: {best['variant']}, {best['vs_graddiff']:+.3f} against "
                  f"{BASELINES[0]} and {best['vs_npo_gd']:+.3f} against {BASELINES[1]}."]
    else:
        lines += ["", "No variant meets the bar: none reaches the level on every seed."]
    return "\n".join(lines)


def readme_excerpt(study: Study, final: str, headline: list, versus: str = "") -> str:
    """What the README shows of a page, with the link: the selective variants against the baselines where the page
    has them, else its final-model table and the headline matched row."""
    from stages.reports import _cell

    source = f"From [docs/results/{study.name}.md](docs/results/{study.name}.md) (generated by `sunlearn study " \
             f"studies/{study.name}.yaml`"
    if versus:  # its heading and description are left to the page
        return "\n".join([f"{source}; each selective variant at the forgetting both baselines reach):", "",
                          *versus.splitlines()[4:]])
    table = [line for line in final.splitlines() if line.startswith("|")]
    lines = [f"{source}; final models, mean ± std over seeds where there are several):", "", *table]
    if headline:
        level = headline[0]
        cells = [f"{r.method} {'not reached' if r.n == 0 else _cell(r.mean)}" for r in headline]
        lines += ["", f"Model utility where each curve first reaches {level.axis} = {_cell(level.level)} (the "
                  f"strongest forgetting every run reaches): {', '.join(cells)}."]
    return "\n".join(lines)


def _block(name: str) -> tuple[str, str]:
    return f"<!-- study:{name} -->", f"<!-- /study:{name} -->"


def readme_block(name: str, readme: Path = README) -> str | None:
    """The README's block for a study, None when it has none."""
    text = readme.read_text() if readme.is_file() else ""
    start, end = _block(name)
    if start not in text or end not in text:
        return None
    return text.split(start, 1)[1].split(end, 1)[0].strip("\n")


def update_readme(name: str, excerpt: str, readme: Path = README) -> None:
    if readme_block(name, readme) is None:
        return
    text = readme.read_text()
    start, end = _block(name)
    head, rest = text.split(start, 1)
    readme.write_text(f"{head}{start}\n{excerpt}\n{end}{rest.split(end, 1)[1]}")


def final_markdown(curves: list[Curve], references: dict[str, dict[str, float]]) -> str:
    from stages.reports import _cell

    seen = {k for c in curves for k in c.metrics[-1]} | {k for r in references.values() for k in r}
    columns = [c for c in HEADLINE if c in seen]
    lines = ["## Final models", "", "Each run's last step; mean ± std over seeds (n runs).", "",
             "| model | n | " + " | ".join(columns) + " |", "|---|---:|" + "---:|" * len(columns)]
    for name, values in references.items():
        lines.append(f"| {name} | – | " + " | ".join(_cell(values.get(c)) for c in columns) + " |")
    for method in dict.fromkeys(c.method for c in curves):
        finals = [c.metrics[-1] for c in curves if c.method == method]
        cells = []
        for column in columns:
            v = np.array([f.get(column, math.nan) for f in finals], dtype=np.float64)
            cells.append(f"{_cell(float(v.mean()))} ± {_cell(float(v.std(ddof=1)))}" if len(v) > 1 else _cell(v[0]))
        lines.append(f"| {method} | {len(finals)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


UTILITY_PARTS = [f"{p}_{m}" for p in ("retain", "ra", "wf") for m in ("prob", "rouge", "truth_ratio")]
FORGET_TOKENS = ("forget_fact_nll", "forget_template_nll")


def utility_markdown(curves: list[Curve], references: dict[str, dict[str, float]]) -> str:
    """Where each final model loses utility (the nine numbers it is the harmonic mean of), and how its forget
    answers' fact and template tokens moved."""
    from stages.reports import _cell

    seen = {name for c in curves for name in c.metrics[-1]}
    columns = [c for c in (*UTILITY_PARTS, *FORGET_TOKENS) if c in seen]
    if not columns:
        return ""
    lines = ["## Where the utility goes", "",
             "The nine numbers model utility is the harmonic mean of (retain set, real authors, world facts), and the "
             "NLL of the forget answers' gold tokens (names, facts: unlearning should raise it) and of their other "
             "tokens (the template: SU means to keep it), per final model, mean over seeds.", "",
             "| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    rows = [(name, [values]) for name, values in references.items()]
    rows += [(m, [c.metrics[-1] for c in curves if c.method == m]) for m in dict.fromkeys(c.method for c in curves)]
    for name, finals in rows:
        cells = [_cell(_nanmean([f.get(col, math.nan) for f in finals])) for col in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _nanmean(values: list[float]) -> float:
    """The mean of the values that are not NaN; NaN, without numpy's warning, where none is (no gold tokens)."""
    kept = [v for v in values if not math.isnan(v)]
    return float(np.mean(kept)) if kept else math.nan


def parts_at(curves: list[Curve], axis_name: str, level: float) -> dict[str, float]:
    """Each utility part and forget-token NLL where each curve first reaches the level, read at the crossing's
    interpolated step as the utility is, then averaged over the curves that reach it (NaN where none has it)."""
    at: dict[str, list[float]] = {}
    for curve in curves:
        hit = crossing(curve, AXES[axis_name], level)
        if hit is None:
            continue
        steps = np.asarray(curve.steps, dtype=np.float64)
        for column in (*UTILITY_PARTS, *FORGET_TOKENS):
            values = curve.values(column)
            ok = np.isfinite(values)
            if ok.any():
                at.setdefault(column, []).append(float(np.interp(hit[1], steps[ok], values[ok])))
    return {column: _nanmean(at.get(column, [])) for column in (*UTILITY_PARTS, *FORGET_TOKENS)}


def matched_parts_markdown(curves: list[Curve], versus: list[dict[str, Any]], axis_name: str) -> str:
    """Where each selective variant and baseline keeps or loses utility at the forgetting the comparison is made
    at, and for the closest variant the parts that differ most from graddiff's."""
    from stages.reports import _cell

    level = versus[0]["level"]
    labels = [*BASELINES, *(r["variant"] for r in versus if r["mine"].n)]
    parts = {label: parts_at([c for c in curves if c.method == label], axis_name, level) for label in labels}
    columns = [c for c in (*UTILITY_PARTS, *FORGET_TOKENS) if any(math.isfinite(p[c]) for p in parts.values())]
    if not columns:
        return ""
    lines = ["## Where the utility goes at the matched forgetting", "",
             f"The same parts as at the final models below, read where each curve first reaches {axis_name} = "
             f"{_cell(level)} (the comparison's level, interpolated between snapshots as the utility is), mean over "
             "the seeds that reach it.", "",
             "| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {label} | " + " | ".join(_cell(parts[label][c]) for c in columns) + " |" for label in labels]
    reached = [r for r in versus if r["mine"].n == r["mine"].total]  # as the comparison's "Closest" reads them
    best = closest(reached)["variant"] if reached else None
    gd = parts[BASELINES[0]]
    delta = {c: parts[best][c] - gd[c] for c in columns if c in UTILITY_PARTS} if best else {}
    delta = {c: d for c, d in delta.items() if math.isfinite(d)}
    if delta:
        low, high = min(delta, key=delta.get), max(delta, key=delta.get)
        tokens = [f"{c} {_cell(parts[best][c])} against {_cell(gd[c])}" for c in FORGET_TOKENS if c in columns]
        lines += ["", f"Against {BASELINES[0]} at this level, {best} (the closest variant) loses most in {low} "
                  f"({delta[low]:+.3f}) and keeps most in {high} ({delta[high]:+.3f})"
                  + (f"; {', '.join(tokens)}." if tokens else ".")]
    return "\n".join(lines)


def closest(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The variant nearest the bar: the largest min(lead over graddiff - MARGIN, lead over npo_gd)."""
    return max(rows, key=lambda r: min(r["vs_graddiff"] - MARGIN, r["vs_npo_gd"]))


def retain_losses_markdown(results: list[dict[str, Any]], top: int = 5) -> str:
    """The retain items whose answer probability each variant's final model lowers most from the target's."""
    from schemas import read_table

    drops: dict[str, dict[str, list[tuple[float, float]]]] = {}  # label -> doc -> [(target, model)] over seeds
    for result in results:
        point = result["point"]
        path = Path(result.get("paths", {}).get("evaluate", "")) / "item_scores.parquet"
        if not path.is_file():
            continue
        rows = [r for r in read_table(path, columns=["model", "step", "split", "doc_id", "item", "value"]).to_pylist()
                if r["split"] == "eval_retain" and r["item"] == "prob"]
        last = {}
        for r in rows:
            last[r["model"]] = max(last.get(r["model"], r["step"]), r["step"])
        final = {(r["model"], r["doc_id"]): r["value"] for r in rows if r["step"] == last[r["model"]]}
        methods = [m for m in last if m not in ("target", "retain")]
        for (model, doc), value in final.items():
            if model in methods and ("target", doc) in final:
                label = point_label(point, model, len(methods))
                drops.setdefault(label, {}).setdefault(doc, []).append((final[("target", doc)], value))
    if not drops:
        return ""
    questions = _questions(results[0].get("paths", {}).get("prepare"))
    lines = ["## Retain items lost most", "",
             f"Per model, the {top} retain items whose answer probability falls most from the target's (mean over "
             "seeds).", "",
             "| model | item | question | answer probability, target → model |", "|---|---|---|---:|"]
    for label, docs in drops.items():
        means = {doc: np.mean(pairs, axis=0) for doc, pairs in docs.items()}
        for doc in sorted(means, key=lambda d: means[d][1] - means[d][0])[:top]:
            before, after = means[doc]
            question = questions.get(doc, "").replace("|", "/")
            lines.append(f"| {label} | {doc} | {question} | {before:.3f} → {after:.3f} |")
    return "\n".join(lines)


def _questions(prepare_dir: str | None) -> dict[str, str]:
    if not prepare_dir or not (Path(prepare_dir) / "documents.parquet").is_file():
        return {}
    from schemas import read_table

    table = read_table(Path(prepare_dir) / "documents.parquet", columns=["doc_id", "question"])
    return {d: q or "" for d, q in zip(table["doc_id"].to_pylist(), table["question"].to_pylist(), strict=True)}


def selection_markdown(study: Study, results: list[dict[str, Any]]) -> str:
    """Precision and recall of each distinct selection against the data set's gold tokens, where it has them."""
    from stages.reports import _cell

    seen: dict[str, list[str]] = {}
    for result in results:
        point = result["point"]
        masks = result.get("masks") or {}
        if not math.isfinite(masks.get("precision", math.nan)):
            continue
        cfg = load_config(study.preset, overrides=point.overrides)
        key = result["fingerprints"]["masks"]
        seen.setdefault(key, [point.variant or "–", f"{cfg.assistants.kind} ({cfg.assistants.splits})",
                              str(cfg.masks.gamma), _cell(masks.get("gamma")), str(cfg.masks.window),
                              _cell(masks.get("fraction_selected")), _cell(masks.get("precision")),
                              _cell(masks.get("recall"))])
    if not seen:
        return "## Selection\n\nThe data set has no gold tokens, so the selection's precision is not measured."
    lines = ["## Selection", "", "Selected forget answer tokens against the data set's gold tokens (author names and "
             "facts).", "", "| variant | assistants | γ | γ used | window | selected | precision | recall |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    lines += ["| " + " | ".join(row) + " |" for row in seen.values()]
    return "\n".join(lines)


def runs_markdown(results: list[dict[str, Any]]) -> str:
    lines = ["## Runs", "", "Every run this page summarises, with its stage fingerprints (artifacts/<stage>/<fp>).", "",
             "| variant | grid | " + " | ".join(ORDER) + " |", "|---|---|" + "---|" * len(ORDER)]
    for result in results:
        point = result["point"]
        grid = " ".join(f"{k}={v}" for k, v in point.values.items()) or "–"
        fps = " | ".join(f"`{result['fingerprints'][s]}`" for s in ORDER)
        mark = " (diverged)" if "error" in result else ""
        lines.append(f"| {point.variant or '–'}{mark} | {grid} | {fps} |")
    return "\n".join(lines)


def check_study(path: str | Path, out_dir: Path = RESULTS_DIR) -> list[str]:
    """Why a study's page is stale (empty when it is current): missing, the file changed, or a run's fingerprint
    differs from the one the page recorded."""
    study = load_study(path)
    record_path = Path(out_dir) / f"{study.name}.json"
    if not record_path.is_file() or not (Path(out_dir) / f"{study.name}.md").is_file():
        return [f"{study.name}: no results page yet (run `sunlearn study {path}`)"]
    record = json.loads(record_path.read_text())
    if record.get("file_sha256") != file_digest(study.path):
        return [f"{study.name}: {path} changed since its page was generated"]
    points = study_points(study)
    recorded = record.get("points", [])
    if [p.overrides for p in points] != [r["overrides"] for r in recorded]:
        return [f"{study.name}: its runs differ from those on the page"]
    problems = []
    block = readme_block(study.name) if Path(out_dir).resolve() == RESULTS_DIR.resolve() else None
    if block is not None and block != record.get("excerpt"):
        problems.append(f"{study.name}: the README's block differs from the page (run `sunlearn study {path}`)")
    for point, old in zip(points, recorded, strict=True):
        now = point_fingerprints(study, point)
        changed = [s for s in ORDER if now[s] != old["fingerprints"].get(s)]
        if changed:
            what = " ".join(point.overrides[-3:]) or "the default run"
            problems.append(f"{study.name}: {changed[0]} (and {len(changed) - 1} more stages) changed for {what}")
    return problems


def study_files(paths: list[str]) -> list[Path]:
    return [Path(p) for p in paths] if paths else sorted(STUDIES_DIR.glob("*.yaml"))


def commit() -> str:
    """The checkout's commit, marked when the working tree has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"`{sha}`" + (" (with uncommitted changes)" if dirty else "")


def machine() -> str:
    import os

    import psutil

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    memory = psutil.virtual_memory().total / 2**30
    return f"{platform.machine()} {cores} cores {memory:.0f} GiB, no GPU" if not _cuda() else \
        f"{platform.machine()} {cores} cores {memory:.0f} GiB, {_cuda()}"


LIBRARIES = ("torch", "transformers", "tokenizers", "numpy", "deepspeed", "peft", "kenlm")  # what the numbers rest on


def libraries() -> dict[str, str]:
    """The installed versions of the libraries the stages compute with: no fingerprint covers them."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in LIBRARIES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it (float results may differ between CPUs)."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def _cuda() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else ""
