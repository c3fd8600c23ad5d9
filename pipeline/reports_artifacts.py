"""Publish the evaluate stage's reports as Prefect artifacts, headline metrics first and rounded, so each table fits
the UI at 1400 px: `results` (markdown: headline table, pareto.png and curves.png inlined, a link to selection.html),
`results-table` (the headline metrics per model) and `metrics` (every metric, one row each)."""

from __future__ import annotations

import base64
import math
from pathlib import Path
from typing import Any

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from schemas import read_table
from stages.reports import wide

# TOFU's headline metrics, then MUSE's: a run shows the first group it has values for
HEADLINES = (("forget_quality", "model_utility", "forget_fact_recall", "retain_rouge"),
             ("verbmem_f", "knowmem_f", "knowmem_r", "privleak"))
DIGITS = 4  # significant digits in every artifact


def rounded(value: Any) -> Any:
    """A number to DIGITS significant digits (None for NaN); anything else as it is."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    if not math.isfinite(value):
        return None
    return float(f"{value:.{DIGITS}g}") if isinstance(value, float) else value


def headline_rows(metrics: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    seen = {m for values in metrics.values() for m in values}
    columns = next((group for group in HEADLINES if seen & set(group)), HEADLINES[0])
    return [{"model": model, **{c: rounded(values.get(c, math.nan)) for c in columns if c in seen}}
            for model, values in metrics.items()]


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0]) if rows else ["model"]
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    lines += ["| " + " | ".join("–" if r.get(c) is None else str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def publish_reports(evaluate_dir: Path) -> None:
    evaluate_dir = Path(evaluate_dir)
    metrics = read_table(evaluate_dir / "metrics.parquet")
    rows = headline_rows(wide(metrics))
    markdown = ["# Unlearning results", "", _markdown_table(rows), "",
                f"Every metric: the `metrics` artifact, and `{evaluate_dir / 'results.md'}`. Definitions: "
                "docs/metrics.md."]
    for name, title in (("pareto.png", "Pareto plot"), ("curves.png", "Unlearning curves")):
        png = evaluate_dir / name
        if png.is_file():
            markdown += ["", f"![{title}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode()})"]
    html = evaluate_dir / "selection.html"
    if html.is_file():
        markdown += ["", f"SU's token selection, scores on hover: [selection.html]({html.as_uri()}) (`{html}`)"]
    create_markdown_artifact(key="results", markdown="\n".join(markdown) + "\n",
                             description="sunlearn headline metrics and Pareto plot")
    create_table_artifact(key="results-table", table=rows, description="sunlearn headline metrics, one row per model")
    create_table_artifact(key="metrics", table=[{**r, "value": rounded(r["value"])} for r in metrics.to_pylist()],
                          description="sunlearn metrics (model, metric, value)")
