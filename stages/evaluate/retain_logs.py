"""A retain model's evaluation log in open-unlearning's format, standing in for a retain model we do not have."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def read_retain_logs(path: str | Path) -> dict[str, Any]:
    """TOFU_EVAL.json / MUSE_EVAL.json: the per-item forget truth ratios (forget_truth_ratio.value_by_index) and the
    Min-K AUC (mia_min_k.agg_value), when present."""
    logs = json.loads(Path(path).read_text())
    out: dict[str, Any] = {}
    by_index = logs.get("forget_truth_ratio", {}).get("value_by_index")
    if by_index:
        out["forget_truth_ratio"] = np.array([v["score"] for v in by_index.values()], dtype=np.float64)
    if logs.get("mia_min_k", {}).get("agg_value") is not None:
        out["privleak_auc"] = float(logs["mia_min_k"]["agg_value"])
    return out
