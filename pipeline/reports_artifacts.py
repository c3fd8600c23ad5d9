"""Publish the evaluate stage's reports as Prefect artifacts: results.md, pareto.png and curves.png (inlined) as
markdown, the wide results as a table, and where selection.html lives."""

from __future__ import annotations

import base64
from pathlib import Path

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from schemas import read_table
from stages.reports import wide


def publish_reports(evaluate_dir: Path) -> None:
    evaluate_dir = Path(evaluate_dir)
    markdown = (evaluate_dir / "results.md").read_text() if (evaluate_dir / "results.md").is_file() else ""
    for name, title in (("pareto.png", "Pareto plot"), ("curves.png", "Unlearning curves")):
        png = evaluate_dir / name
        if png.is_file():
            markdown += f"\n![{title}]({'data:image/png;base64,' + base64.b64encode(png.read_bytes()).decode()})\n"
    html = evaluate_dir / "selection.html"
    if html.is_file():
        markdown += f"\nSU's token selection, with score_diff on hover: `{html}`\n"
    if markdown:
        create_markdown_artifact(key="results", markdown=markdown, description="sunlearn results and Pareto plot")
    table = [{"model": model, **values} for model, values in wide(read_table(evaluate_dir / "metrics.parquet")).items()]
    create_table_artifact(key="results-table", table=table, description="sunlearn metrics, one row per model")
