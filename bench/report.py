"""What every benchmark returns, the markdown table they share, and results.json written atomically."""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Row:
    bench: str
    measure: str
    project: str  # the project's figure
    other: str  # the other side's figure
    ratio: str
    target: str = ""


@dataclass
class Result:
    name: str
    rows: list[Row] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    extra_tables: list[str] = field(default_factory=list)  # markdown, printed after the main table


def rate(tokens: float, seconds: float) -> str:
    per_second = tokens / max(seconds, 1e-9)
    if per_second >= 1e6:
        return f"{per_second / 1e6:.2f}M tok/s"
    return f"{per_second / 1e3:.1f}k tok/s"


def tokens_label(n: int) -> str:
    return f"{n / 1e6:.3g}M" if n >= 100_000 else f"{n / 1e3:.3g}k"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main_table(results: list[Result]) -> str:
    rows = [[r.bench, r.measure, r.project, r.other, r.ratio, r.target] for res in results for r in res.rows]
    return markdown_table(["benchmark", "measure", "sunlearn", "other side", "ratio", "target"], rows)


def machine() -> dict[str, Any]:
    import psutil

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cores": cores, "cpu": cpu, "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


def write_results(path: Path, payload: dict[str, Any]) -> None:
    """Temp file, then rename: a reader never sees half a results.json."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=float) + "\n")
    os.replace(tmp, path)
