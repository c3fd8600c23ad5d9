"""Turn token scores into SU's selection mask.

A forget-document answer token is a seed when its score is above γ: `masks.score = prob_diff` scores |p_a − p_b|
(the paper's), `log_ratio` scores |log p_a − log p_b|, which also sees a fact token both assistants find unlikely.
Both are absolute, so either assistant split works: a (full, retain) pair puts facts at p_a > p_b, (full, forget) at
p_a < p_b. Each seed is widened symmetrically by ±window positions (the paper's 5-gram window for window = 2), clipped
to the document's answer tokens. Everything else keeps label -100 during unlearning.

`masks.gamma = auto` picks γ by Otsu's method on the answer tokens' scores: the threshold that best splits them into
two groups (largest between-group variance). Most tokens are explained equally well by both assistants (score near 0)
and forget-specific tokens form a second mode; Otsu finds the valley from one histogram with no training run. On a
linear axis (`masks.auto_scale = linear`) that valley lies between near-0 and near-1 differences, and most fact tokens,
which a 5-gram separates by only a few hundredths, fall below it. `auto_scale = log` runs Otsu on log10 of the score
(floored at MIN_SCORE), where "no difference" and "some difference" are the two modes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from schemas import read_table, write_table
from stages.common import log
from stages.config import Config

MIN_SCORE = 1e-4  # the log axis's floor: 10x below the smallest γ bench.selection measures (0.001)


def token_score(p_a: np.ndarray, p_b: np.ndarray, score: str) -> np.ndarray:
    """Per token, the value γ thresholds (masks.score)."""
    if score == "log_ratio":
        tiny = np.finfo(np.float64).tiny  # an LLM assistant's probability can underflow to 0
        return np.abs(np.log(np.maximum(p_a, tiny)) - np.log(np.maximum(p_b, tiny)))
    return np.abs(p_a - p_b)


def auto_threshold(values: np.ndarray, score: str, scale: str) -> float:
    """masks.gamma=auto: Otsu's threshold on `values` on a linear or a log10 axis."""
    upper = 1.0 if score == "prob_diff" else max(float(values.max(initial=0.0)), MIN_SCORE)
    if scale == "log":
        logs = np.log10(np.maximum(values, MIN_SCORE))
        return float(10 ** otsu_threshold(logs, low=np.log10(MIN_SCORE), high=np.log10(max(upper, MIN_SCORE * 10))))
    return otsu_threshold(values, high=upper)


def otsu_threshold(values: np.ndarray, bins: int = 256, low: float = 0.0, high: float = 1.0) -> float:
    """Threshold on [low, high] that maximises the between-class variance of `values`."""
    if values.size == 0:
        return high
    counts, edges = np.histogram(values, bins=bins, range=(low, high))
    weights = counts / counts.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(weights)
    mu = np.cumsum(weights * centres)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def widen(seed: np.ndarray, segment: np.ndarray, window: int) -> np.ndarray:
    """True where some seed lies within ±window rows in the same segment (segment < 0: outside every segment).

    2·window shifted ORs of the boolean seeds: no per-token loop, and no wide integer temporaries.
    """
    selected = seed & (segment >= 0)
    for k in range(1, window + 1):
        same = segment[k:] == segment[:-k]
        selected[k:] |= seed[:-k] & same
        selected[:-k] |= seed[k:] & same
    return selected


def document_starts(position: np.ndarray) -> np.ndarray:
    """Row index of each document's first token (rows are sorted by document, then position from 0)."""
    starts = np.flatnonzero(position == 0)
    if len(position) and (starts.size == 0 or starts[0] != 0 or np.any(np.diff(position)[position[1:] != 0] != 1)):
        raise ValueError("token_scores.parquet: rows are not sorted by document and position")
    return starts


def answer_segments(starts: np.ndarray, in_answer: np.ndarray) -> np.ndarray:
    """Per row, the index of its document when it is an answer token, else -1: windows stay inside an answer."""
    lengths = np.diff(np.append(starts, len(in_answer)))
    doc = np.repeat(np.arange(len(starts), dtype=np.int32), lengths)
    return np.where(in_answer, doc, np.int32(-1))


def precision_recall(selected: np.ndarray, gold: np.ndarray) -> tuple[float, float]:
    hits = float((selected & gold).sum())
    precision = hits / selected.sum() if selected.any() else 0.0
    recall = hits / gold.sum() if gold.any() else 0.0
    return precision, recall


def build_masks(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    m = cfg.masks
    scores = read_table(inputs["scores"] / "token_scores.parquet",
                        columns=["doc_id", "position", "p_a", "p_b", "in_answer", "gold"])
    position = scores["position"].to_numpy()
    score = token_score(scores["p_a"].to_numpy(), scores["p_b"].to_numpy(), m.score)
    in_answer = scores["in_answer"].to_numpy(zero_copy_only=False)
    starts = document_starts(position)
    gamma = auto_threshold(score[in_answer], m.score, m.auto_scale) if m.gamma == "auto" else float(m.gamma)

    seed = (score > gamma) & in_answer
    selected = widen(seed, answer_segments(starts, in_answer), m.window)

    gold_col = scores["gold"]
    write_table(
        pa.table({"doc_id": scores["doc_id"], "position": scores["position"], "selected": selected, "seed": seed,
                  "in_answer": in_answer, "gold": gold_col}),
        out / "masks.parquet",
    )
    if len(starts):
        answer_tokens = np.add.reduceat(in_answer, starts, dtype=np.int64)
        selected_tokens = np.add.reduceat(selected, starts, dtype=np.int64)
    else:
        answer_tokens = selected_tokens = np.zeros(0, np.int64)
    fraction = np.divide(selected_tokens, answer_tokens, out=np.zeros(len(starts)), where=answer_tokens > 0)
    write_table(
        pa.table({"doc_id": scores["doc_id"].take(pa.array(starts)), "answer_tokens": answer_tokens,
                  "selected_tokens": selected_tokens, "selected_fraction": fraction}),
        out / "mask_doc_stats.parquet",
    )
    stats: dict[str, Any] = {
        "gamma": gamma,
        "gamma_rule": ("otsu" if m.auto_scale == "linear" else "otsu_log") if m.gamma == "auto" else "fixed",
        "score": m.score,
        "window": m.window,
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
