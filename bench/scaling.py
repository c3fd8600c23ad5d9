"""Scaling: the assistants, scores and masks stages at growing corpus sizes, and whether their time grows linearly.

The exponent between two sizes is log(t2 / t1) / log(n2 / n1): 1.0 is linear, above 1 grows faster than the data.
"""

from __future__ import annotations

import math

from bench.report import Result, markdown_table, tokens_label
from bench.sized import SizedRuns

STAGES = ("assistants", "scores", "masks")


def run(runs: SizedRuns, sizes: list[int]) -> Result:
    sizes = sorted(sizes)
    pairs = list(zip(sizes[:-1], sizes[1:], strict=True))
    seconds = {n: runs.get(n).seconds for n in sizes}
    exponents = {
        stage: [math.log(seconds[b][stage] / seconds[a][stage]) / math.log(b / a) for a, b in pairs]
        for stage in STAGES
    }
    header = ["stage", *[f"{tokens_label(n)} tokens" for n in sizes],
              *[f"exponent {tokens_label(a)}→{tokens_label(b)}" for a, b in pairs]]
    rows = [[stage, *[f"{seconds[n][stage]:.2f} s" for n in sizes], *[f"{e:.2f}" for e in exponents[stage]]]
            for stage in STAGES]
    result = Result("scaling")
    result.extra_tables = [markdown_table(header, rows)]
    result.details = {"seconds": {str(n): {s: seconds[n][s] for s in STAGES} for n in sizes},
                      "exponents": exponents}
    return result
