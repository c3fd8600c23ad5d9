"""Turn token scores into SU's selection mask.

A forget-document answer token is a seed when |p_a − p_b| > γ. Each seed is widened symmetrically by ±window
positions (the paper's 5-gram window for window = 2), clipped to the document's answer tokens. Everything else
keeps label -100 during unlearning.

`masks.gamma = auto` picks γ by Otsu's method on the answer tokens' score_diff: the threshold that best splits
them into two groups (largest between-group variance). Most tokens are explained equally well by both assistants
(score_diff near 0) and forget-specific tokens form a second mode, so the valley between the modes is where a
sweep's best γ tends to sit; Otsu finds it from one histogram with no training run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.config import Config
from schemas import read_table, write_table
from stages.common import log


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Threshold on [0, 1] that maximises the between-class variance of `values`."""
    if values.size == 0:
        return 1.0
    counts, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    weights = counts / counts.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(weights)
    mu = np.cumsum(weights * centres)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def widen(seed: np.ndarray, segment_start: np.ndarray, segment_end: np.ndarray, window: int) -> np.ndarray:
    """True where some seed lies within ±window positions, inside the same [start, end) row segment.

    Rows are flat over documents; segment_start/end give, per row, the bounds of the span the window may not leave.
    """
    counts = np.concatenate([[0], np.cumsum(seed, dtype=np.int64)])
    rows = np.arange(len(seed))
    lo = np.maximum(rows - window, segment_start)
    hi = np.minimum(rows + window, segment_end - 1)
    inside = (rows >= segment_start) & (rows < segment_end)
    return inside & (counts[np.maximum(hi, lo) + 1] - counts[lo] > 0)


def answer_segments(doc_rows: np.ndarray, in_answer: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the [first, last + 1) row indices of its document's answer tokens (rows sorted by doc, position)."""
    n = len(doc_rows)
    starts = np.flatnonzero(np.concatenate([[True], doc_rows[1:] != doc_rows[:-1]]))
    ends = np.concatenate([starts[1:], [n]])
    doc_of_row = np.repeat(np.arange(len(starts)), ends - starts)
    answer_rows = np.flatnonzero(in_answer)
    first = np.full(len(starts), n)
    np.minimum.at(first, doc_of_row[answer_rows], answer_rows)
    return first[doc_of_row], ends[doc_of_row]


def precision_recall(selected: np.ndarray, gold: np.ndarray) -> tuple[float, float]:
    hits = float((selected & gold).sum())
    precision = hits / selected.sum() if selected.any() else 0.0
    recall = hits / gold.sum() if gold.any() else 0.0
    return precision, recall


def build_masks(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    scores = read_table(inputs["scores"] / "token_scores.parquet")
    doc_ids = scores["doc_id"].to_numpy(zero_copy_only=False)
    diff = scores["score_diff"].to_numpy()
    in_answer = scores["in_answer"].to_numpy(zero_copy_only=False)
    doc_rows = pa.compute.dictionary_encode(scores["doc_id"]).combine_chunks().indices.to_numpy()
    gamma = otsu_threshold(diff[in_answer]) if cfg.masks.gamma == "auto" else float(cfg.masks.gamma)

    seed = (diff > gamma) & in_answer
    segment_start, segment_end = answer_segments(doc_rows, in_answer)
    selected = widen(seed, segment_start, segment_end, cfg.masks.window)

    gold_col = scores["gold"]
    write_table(
        pa.table({"doc_id": scores["doc_id"], "position": scores["position"], "selected": selected, "seed": seed,
                  "in_answer": in_answer, "gold": gold_col}),
        out / "masks.parquet",
    )
    unique_docs, first_row = np.unique(doc_rows, return_index=True)
    answer_tokens = np.bincount(doc_rows, weights=in_answer, minlength=len(unique_docs))
    selected_tokens = np.bincount(doc_rows, weights=selected, minlength=len(unique_docs))
    fraction = np.divide(selected_tokens, answer_tokens, out=np.zeros_like(selected_tokens), where=answer_tokens > 0)
    write_table(
        pa.table({"doc_id": doc_ids[first_row], "answer_tokens": answer_tokens.astype(np.int64),
                  "selected_tokens": selected_tokens.astype(np.int64), "selected_fraction": fraction}),
        out / "mask_doc_stats.parquet",
    )
    stats: dict[str, Any] = {
        "gamma": gamma,
        "gamma_rule": "otsu" if cfg.masks.gamma == "auto" else "fixed",
        "window": cfg.masks.window,
        "answer_tokens": int(in_answer.sum()),
        "seed_tokens": int(seed.sum()),
        "tokens_selected": int(selected.sum()),
        "fraction_selected": float(selected.sum() / max(in_answer.sum(), 1)),
        "doc_fraction_mean": float(fraction.mean()) if fraction.size else 0.0,
        "doc_fraction_min": float(fraction.min()) if fraction.size else 0.0,
        "doc_fraction_max": float(fraction.max()) if fraction.size else 0.0,
        "docs_without_selection": int((selected_tokens == 0).sum()),
    }
    known = gold_col.is_valid().to_numpy(zero_copy_only=False) & in_answer
    if known.any():
        gold = gold_col.fill_null(False).to_numpy(zero_copy_only=False)
        precision, recall = precision_recall(selected[known], gold[known])
        stats.update(precision=precision, recall=recall, gold_tokens=int(gold[known].sum()))
    if stats["tokens_selected"] == 0:
        log.warning("masks: gamma=%.3g selects no tokens; SU will not change the model (lower masks.gamma)", gamma)
        stats["warning"] = "no tokens selected"
    return stats
