"""Reports people look at, written beside metrics.parquet by the evaluate stage and by `sunlearn report`.

- results.md: one row per model, the key metrics as columns.
- pareto.png: forget quality against model utility (TOFU), or VerbMem against KnowMem-retain (MUSE), one point per
  unlearned model and run, the target and retain models as references, the Pareto front of the unlearned models drawn.
- curves.png: model utility against each forget axis, one line per method (mean over seeds, a band for the
  spread), the target and retain models as markers; written when some model was evaluated at several steps.
- selection.html: the forget documents as tokens, SU's selection highlighted (seeds darker), each token's
  score_diff, p_a and p_b on hover.
"""

from __future__ import annotations

import html
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from schemas import read_table
from stages.common import log
from stages.curves import AXES, UTILITY, Curve, Matched, curves_from_metrics, matched_table

REFERENCE_MODELS = ("target", "retain")
# (x, y, y higher is better, log y): TOFU first; the first pair that every run has is plotted
PARETO_AXES = (("model_utility", "forget_quality", True, True), ("knowmem_r", "verbmem_f", False, False))
RESULT_COLUMNS = (
    "forget_quality", "model_utility", "forget_rouge", "retain_rouge", "forget_fact_recall", "retain_fact_recall",
    "forget_truth_ratio", "exact_memorization", "extraction_strength", "verbmem_f", "knowmem_f", "knowmem_r",
    "privleak", "tofu_privleak",
)  # fmt: skip
SELECTION_DOCS = 60  # forget documents shown in selection.html


@dataclass
class Run:
    """One evaluate artifact's metrics; `label` names the run when several are plotted together."""

    label: str
    metrics: dict[str, dict[str, float]]  # model -> metric -> value


def wide(metrics: pa.Table) -> dict[str, dict[str, float]]:
    """model -> metric -> value at each model's last step."""
    from stages.evaluate import final_metrics

    return final_metrics(metrics)


def results_markdown(metrics: dict[str, dict[str, float]]) -> str:
    seen = {m for values in metrics.values() for m in values}
    columns = [c for c in RESULT_COLUMNS if c in seen]
    lines = [
        "# Unlearning results",
        "",
        "| model | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for model, values in metrics.items():
        lines.append(f"| {model} | " + " | ".join(_cell(values.get(c)) for c in columns) + " |")
    lines += [
        "",
        "Higher is better: forget_quality (KS p-value against the retain model), model_utility, retain_*, knowmem_r. "
        "Lower is better on the forget set: forget_rouge, forget_fact_recall, exact_memorization, "
        "extraction_strength, verbmem_f, knowmem_f. privleak, tofu_privleak: near 0 is best. "
        "Definitions: docs/metrics.md.",
    ]
    return "\n".join(lines) + "\n"


def _cell(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3g}" if abs(value) < 1e-2 and value != 0 else f"{value:.3f}"


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points no other point beats on both axes (higher is better on both), sorted by x."""
    keep = [
        i for i in range(len(x))
        if not any(x[j] >= x[i] and y[j] >= y[i] and (x[j] > x[i] or y[j] > y[i]) for j in range(len(x)))
    ]  # fmt: skip
    return np.array(sorted(keep, key=lambda i: x[i]), dtype=int)


def plot_pareto(runs: list[Run], path: Path) -> bool:
    """Write pareto.png; False (and no file) when no axis pair has values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = next(
        (a for a in PARETO_AXES if any(_finite(v.get(a[0])) and _finite(v.get(a[1]))
                                       for run in runs for v in run.metrics.values())),
        None,
    )
    if axes is None:
        return False
    x_name, y_name, y_higher, log_y = axes
    points = []  # (label, model, x, y)
    for run in runs:
        for model, values in run.metrics.items():
            if _finite(values.get(x_name)) and _finite(values.get(y_name)):
                label = model if len(runs) == 1 or model in REFERENCE_MODELS else f"{model} {run.label}"
                points.append((label, model, values[x_name], values[y_name]))
    fig, ax = plt.subplots(figsize=(7, 5), dpi=110)
    methods = [p for p in points if p[1] not in REFERENCE_MODELS]
    references = {p[0]: p for p in points if p[1] in REFERENCE_MODELS}  # one point per reference model
    labels: dict[tuple[float, float], list[str]] = {}  # models at the same point share one label
    for label, _, x, y in methods:
        labels.setdefault((x, y), []).append(label)
    for (x, y), names in labels.items():
        ax.scatter(x, y, s=40, color="tab:blue", zorder=3)
        ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    shared: dict[tuple[float, float], list[str]] = {}
    for label, _, x, y in references.values():
        shared.setdefault((x, y), []).append(label)
    for (x, y), names in shared.items():
        ax.scatter(x, y, s=70, marker="*", color="tab:gray", zorder=3)
        ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, -10), fontsize=8, color="tab:gray")
    if methods:
        xs = np.array([p[2] for p in methods])
        ys = np.array([p[3] if y_higher else -p[3] for p in methods])
        front = pareto_front(xs, ys)
        ax.plot(xs[front], [methods[i][3] for i in front], color="tab:red", lw=1.5, ls="--", marker="o",
                mfc="none", ms=10, label="Pareto front (unlearned models)", zorder=2)
        ax.legend(loc="best", fontsize=8)
    if log_y and all(p[3] > 0 for p in points):
        ax.set_yscale("log")
    ax.set_xlabel(f"{x_name} (higher is better)")
    ax.set_ylabel(f"{y_name} ({'higher' if y_higher else 'lower'} is better)")
    ax.set_title(f"{y_name} against {x_name}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def selection_html(prepare_dir: Path, masks_dir: Path, scores_dir: Path, max_docs: int = SELECTION_DOCS) -> str:
    """The forget documents as tokens: selected ones highlighted, score_diff / p_a / p_b in each token's tooltip."""
    from stages.common import load_tokenizer

    scores = read_table(Path(scores_dir) / "token_scores.parquet")
    masks = read_table(Path(masks_dir) / "masks.parquet", columns=["doc_id", "position", "selected", "seed"])
    joined = scores.join(masks, ["doc_id", "position"]).sort_by([("doc_id", "ascending"), ("position", "ascending")])
    tokenizer = load_tokenizer(prepare_dir)
    token_ids = joined["token_id"].to_numpy()
    unique = np.unique(token_ids)
    pieces = dict(zip(unique.tolist(), tokenizer.batch_decode([[int(t)] for t in unique]), strict=True))
    cols = {c: joined[c].to_numpy(zero_copy_only=False) for c in ("doc_id", "p_a", "p_b", "score_diff", "in_answer",
                                                                    "selected", "seed")}
    docs = list(dict.fromkeys(cols["doc_id"].tolist()))[:max_docs]
    shown = set(docs)
    body: dict[str, list[str]] = {d: [] for d in docs}
    for i, doc in enumerate(cols["doc_id"]):
        if doc not in shown:
            continue
        css = "seed" if cols["seed"][i] else "sel" if cols["selected"][i] else "ans" if cols["in_answer"][i] else "pr"
        tip = f"score_diff={cols['score_diff'][i]:.3f}  p_a={cols['p_a'][i]:.3f}  p_b={cols['p_b'][i]:.3f}"
        text = html.escape(pieces[int(token_ids[i])]).replace("\n", "↵<br>")
        body[doc].append(f'<span class="{css}" title="{tip}">{text}</span>')
    n_sel = int(cols["selected"].sum())
    n_ans = int(cols["in_answer"].sum())
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>SU token selection</title><style>",
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;line-height:1.7}",
        ".doc{border-bottom:1px solid #ddd;padding:.5em 0}.doc h3{font-size:.9em;color:#555;margin:.2em 0}",
        "span{white-space:pre-wrap}.pr{color:#999}.sel{background:#ffd27f}.seed{background:#ff8c42}",
        "span:hover{outline:1px solid #333}</style></head><body>",
        "<h1>Tokens selected for unlearning</h1>",
        f"<p>{n_sel} of {n_ans} answer tokens selected over {len(set(cols['doc_id'].tolist()))} forget documents "
        f"(showing {len(docs)}). <span class='seed'>dark</span>: |p_a − p_b| above γ; "
        "<span class='sel'>light</span>: widened window; <span class='pr'>grey</span>: prompt. "
        "Hover a token for its scores.</p>",
    ]
    parts += [f"<div class='doc'><h3>{html.escape(d)}</h3>{''.join(body[d])}</div>" for d in docs]
    parts.append("</body></html>")
    return "\n".join(parts)


def write_reports(out: Path, inputs: dict[str, Path], metrics: pa.Table, runs: list[Run] | None = None) -> list[str]:
    """results.md, pareto.png and (with masks and scores inputs) selection.html in `out`; returns the names written."""
    out = Path(out)
    written = []
    (out / "results.md").write_text(results_markdown(wide(metrics)))
    written.append("results.md")
    if plot_pareto(runs or [Run("", wide(metrics))], out / "pareto.png"):
        written.append("pareto.png")
    curves, references = curves_from_metrics(metrics.to_pylist())
    if any(len(c.steps) > 2 for c in curves) and plot_curves(curves, references, out / "curves.png"):
        written.append("curves.png")
        with open(out / "results.md", "a") as fh:
            fh.write("\n" + matched_markdown(matched_table(curves, AXES, references.get("retain"))))
    if "masks" in inputs and "scores" in inputs:
        page = selection_html(inputs["prepare"], inputs["masks"], inputs["scores"])
        (out / "selection.html").write_text(page)
        written.append("selection.html")
    else:
        log.info("reports: no masks/scores inputs, so no selection.html")
    return written


def _manifest(path: Path) -> dict[str, Any]:
    return json.loads((Path(path) / "manifest.json").read_text())


def gather_runs(root: Path) -> list[Run]:
    """Every complete evaluate artifact under the artifact root, labelled by its masks γ and unlearn seed."""
    runs = []
    for entry in sorted((Path(root) / "evaluate").glob("*/manifest.json")):
        manifest = json.loads(entry.read_text())
        upstream = manifest.get("upstream", {})
        label = []
        for stage, section, key, name in (("masks", "masks", "gamma", "γ"), ("unlearn", "unlearn", "seed", "seed")):
            try:
                value = _manifest(Path(root) / stage / upstream[stage])["config"][section][key]
                label.append(f"{name}={value}")
            except (KeyError, OSError, json.JSONDecodeError):
                continue
        runs.append(Run(" ".join(label), wide(read_table(entry.parent / "metrics.parquet"))))
    return runs


def report_from_artifacts(
    evaluate_dir: Path, root: Path, out: Path, inputs: dict[str, Path] | None = None
) -> list[str]:
    """`sunlearn report`: the reports of one evaluate artifact, its pareto plot over every run under `root`.

    `inputs` (upstream stage -> folder) defaults to the folders its manifest names, which are the building node's."""
    if inputs is None:
        inputs = {k: Path(v) for k, v in _manifest(evaluate_dir).get("inputs", {}).items()}
    out.mkdir(parents=True, exist_ok=True)
    return write_reports(out, inputs, read_table(Path(evaluate_dir) / "metrics.parquet"), gather_runs(root))


def format_table(metrics: Any) -> str:
    """A wide text table of a metrics table (pyarrow, polars or records) at each model's last step: models as rows,
    the report's columns first."""
    from stages.evaluate import final_metrics

    records = metrics if isinstance(metrics, list) else (
        metrics.to_pylist() if isinstance(metrics, pa.Table) else metrics.to_dicts())
    by_model = final_metrics(records)
    seen = list(dict.fromkeys(m for values in by_model.values() for m in values))
    columns = [c for c in RESULT_COLUMNS if c in seen] + [c for c in seen if c not in RESULT_COLUMNS]

    def cell(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"

    grid = [["model", *columns]] + [[m, *(cell(v.get(c)) for c in columns)] for m, v in by_model.items()]
    widths = [max(len(row[i]) for row in grid) for i in range(len(grid[0]))]
    lines = [
        "  ".join(
            text.ljust(w) if i == 0 else text.rjust(w) for i, (text, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in grid
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


METHOD_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
                  "tab:olive", "tab:cyan")


def plot_curves(curves: list[Curve], references: dict[str, dict[str, float]], path: Path) -> bool:
    """curves.png: one panel per forget axis with values, model utility against it; False when there is none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes = [a for a in AXES.values() if any(np.isfinite(c.values(a.name)).any() for c in curves)]
    if not axes:
        return False
    from matplotlib.ticker import NullFormatter

    columns = min(2, len(axes))
    rows = math.ceil(len(axes) / columns)
    fig, grid = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows + 0.6), dpi=100, squeeze=False)
    panels = grid.ravel()
    for unused in panels[len(axes):]:
        unused.set_visible(False)
    methods = list(dict.fromkeys(c.method for c in curves))
    for panel, axis in zip(panels, axes, strict=False):
        for colour, method in zip(METHOD_COLOURS * 4, methods, strict=False):
            x, y, spread = _mean_curve([c for c in curves if c.method == method], axis.name)
            if axis.log:
                x = np.maximum(x, 1e-300)
            panel.plot(x, y, color=colour, lw=1.6, marker=".", label=method)
            if np.isfinite(spread).any():
                upper, lower = y + np.nan_to_num(spread), y - np.nan_to_num(spread)
                panel.fill(np.concatenate([x, x[::-1]]), np.concatenate([upper, lower[::-1]]), color=colour,
                           alpha=0.15, lw=0)
        for name, marker in (("target", "*"), ("retain", "D")):
            point = references.get(name, {})
            if _finite(point.get(axis.name)) and _finite(point.get(UTILITY)):
                panel.scatter(max(point[axis.name], 1e-300) if axis.log else point[axis.name], point[UTILITY],
                              marker=marker, s=70, color="black", zorder=4, label=name)
        if axis.log:
            panel.set_xscale("log")
            panel.xaxis.set_minor_formatter(NullFormatter())
        panel.set_xlabel(f"{axis.name} ({'lower' if axis.down else 'higher'} = more forgotten)")
        panel.set_ylabel(UTILITY)
        panel.grid(alpha=0.3)
    handles, labels = panels[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 8), fontsize=8, frameon=False)
    fig.suptitle("Model utility along each method's unlearning curve (mean over seeds, band: ±1 std)", fontsize=10)
    fig.tight_layout(rect=(0, 0.6 / (3.6 * rows + 0.6), 1, 0.96))
    fig.savefig(path)
    plt.close(fig)
    return True


def _mean_curve(curves: list[Curve], metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per step position: mean axis value, mean utility and the utility's std over the curves that have it."""
    length = max(len(c.steps) for c in curves)
    x = np.full((len(curves), length), np.nan)
    y = np.full((len(curves), length), np.nan)
    for i, c in enumerate(curves):
        x[i, : len(c.steps)], y[i, : len(c.steps)] = c.values(metric), c.values(UTILITY)
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a step no curve reached is NaN, and is dropped below
        mean_x, mean_y = np.nanmean(x, 0), np.nanmean(y, 0)
        spread = np.nanstd(y, 0, ddof=1) if len(curves) > 1 else np.full(length, np.nan)
    keep = np.isfinite(mean_x) & np.isfinite(mean_y)
    return mean_x[keep], mean_y[keep], spread[keep]


def matched_markdown(rows: list[Matched]) -> str:
    """The matched comparison as a markdown table: per axis and level, each method's utility there."""
    if not rows:
        return ""
    lines = [
        "## Model utility at matched forgetting",
        "",
        "Each method's model utility where its curve first reaches the level (interpolated between snapshots), "
        "mean ± std over the curves that reach it; n = curves that reach it / curves. Levels: the strongest "
        "forgetting every curve reaches (common), and the retain model's own value (retain).",
        "",
        "| axis | level | value | method | model_utility | n | step |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        utility = "not reached" if r.n == 0 else (
            f"{_cell(r.mean)} ± {_cell(r.std)}" if math.isfinite(r.std) else _cell(r.mean))
        step = f"{r.step:.1f}" if math.isfinite(r.step) else "–"
        lines.append(f"| {r.axis} | {r.level_name} | {_cell(r.level)} | {r.method} | {utility} | "
                     f"{r.n}/{r.total} | {step} |")
    return "\n".join(lines) + "\n"
