"""Evaluation by suites: TOFU (tofu.py) and MUSE (muse.py) declare their metrics (specs.py), the stage (stage.py)
runs every model over every present eval set, and per-item results are cached per weights (cache.py).

Add a metric: write its per-item function and one Metric (or Derived) entry in the suite's METRICS, in that suite's
module. The per-item values, metrics.parquet, the summaries and the reports follow from the declaration.
"""

from stages.evaluate.stage import (
    ALL_METRICS,
    METRIC_NAMES,
    MUSE_METRICS,
    TOFU_METRICS,
    evaluate,
    final_metrics,
    item_values,
    summarise,
)

__all__ = ["ALL_METRICS", "METRIC_NAMES", "MUSE_METRICS", "TOFU_METRICS", "evaluate", "final_metrics",
           "item_values", "summarise"]
