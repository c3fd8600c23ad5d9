"""TOFU metrics as pure functions over per-item NLLs and generations, found by name in METRIC_FUNCTIONS.

Definitions follow docs/METRICS.md and open-unlearning (src/evals/metrics): the same 1e-10 guards, the same
libraries (rouge_score for ROUGE-L, scipy.stats.ks_2samp for forget quality, scipy.stats.hmean for utility).
Per-item functions take arrays of average answer NLLs: `correct` of shape (n,) and `perturbed` of shape (n, k),
NaN-padded where an item has fewer than k perturbed answers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np
from rouge_score import rouge_scorer
from scipy.stats import hmean, ks_2samp

log = logging.getLogger("sunlearn")

EPS = 1e-10  # open-unlearning's guard against a probability that underflows to 0

METRIC_FUNCTIONS: dict[str, Callable[..., np.ndarray | float]] = {}


def register(name: str) -> Callable[[Callable], Callable]:
    def wrap(fn: Callable) -> Callable:
        if name in METRIC_FUNCTIONS:
            raise ValueError(f"metric {name!r} registered twice")
        METRIC_FUNCTIONS[name] = fn
        return fn

    return wrap


@register("probability")
def probability(nll_avg: np.ndarray) -> np.ndarray:
    """Per item P(a|q) = exp(-NLLavg(a))."""
    return np.exp(-np.asarray(nll_avg, dtype=np.float64))


@register("normalised_probability")
def normalised_probability(correct: np.ndarray, perturbed: np.ndarray) -> np.ndarray:
    """Per item P(a) / (P(a) + sum_j P(perturbed_j)), for real_authors and world_facts."""
    p_correct = probability(correct)
    p_wrong = np.nansum(probability(perturbed), axis=1)
    return p_correct / (p_correct + p_wrong + EPS)


@register("truth_ratio")
def truth_ratio(correct: np.ndarray, perturbed: np.ndarray) -> np.ndarray:
    """Per item P̄_perturbed / P_correct, P̄ the geometric mean exp(-mean_j NLLavg(perturbed_j))."""
    p_correct = probability(correct)
    p_wrong = probability(np.nanmean(np.asarray(perturbed, dtype=np.float64), axis=1))
    return p_wrong / (p_correct + EPS)


@register("truth_ratio_closer_to_1")
def truth_ratio_closer_to_1(ratios: np.ndarray) -> float:
    """Forget aggregate: mean of min(TR, 1/TR); 1 when true and false answers are equally likely."""
    ratios = _finite(ratios)
    return float(np.mean(np.minimum(ratios, 1.0 / (ratios + EPS)))) if ratios.size else float("nan")


@register("truth_ratio_true_better")
def truth_ratio_true_better(ratios: np.ndarray) -> float:
    """Retain, real_authors and world_facts aggregate: mean of max(0, 1 - TR)."""
    ratios = _finite(ratios)
    return float(np.mean(np.maximum(0.0, 1.0 - ratios))) if ratios.size else float("nan")


_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


@register("rouge_l_recall")
def rouge_l_recall(generations: Sequence[str], references: Sequence[str]) -> np.ndarray:
    """Per item ROUGE-L recall of a generation against its reference (target first, as rouge_score expects)."""
    if len(generations) != len(references):
        raise ValueError(f"{len(generations)} generations for {len(references)} references")
    return np.array([_ROUGE.score(ref, gen)["rougeL"].recall for gen, ref in zip(generations, references, strict=True)])


@register("forget_quality")
def forget_quality(model_ratios: np.ndarray, retain_ratios: np.ndarray) -> float:
    """p-value of the two-sample KS test between forget-set truth ratios of a model and of the retain model."""
    a, b = _finite(model_ratios), _finite(retain_ratios)
    if not a.size or not b.size:
        return float("nan")
    return float(ks_2samp(a, b).pvalue)


@register("model_utility")
def model_utility(values: Sequence[float]) -> float:
    """Harmonic mean of the nine retain/ra/wf numbers; 0 if any is 0, NaN if any is missing."""
    values = np.asarray(values, dtype=np.float64)
    if np.isnan(values).any():
        return float("nan")
    if (values <= 0).any():  # scipy >= 1.9 also returns 0 here; older versions raised, so say it ourselves
        return 0.0
    return float(hmean(values))


@register("exact_memorisation")
def exact_memorisation(correct: Sequence[np.ndarray]) -> np.ndarray:
    """Per item: fraction of answer positions where the teacher-forced argmax equals the label."""
    return np.array([float(np.mean(c)) if len(c) else float("nan") for c in correct])


@register("extraction_strength")
def extraction_strength(correct: Sequence[np.ndarray]) -> np.ndarray:
    """Per item 1 - k*/|y|, k* the smallest k with argmax == label at every position from k on.

    If even the last position is wrong, k* = |y| and the score is 0, as METRICS.md defines it (open-unlearning's
    loop stops at k = |y| - 1 and reports 1/|y| there).
    """
    out = []
    for c in correct:
        c = np.asarray(c, dtype=bool)
        matched_suffix = int(np.cumprod(c[::-1]).sum()) if c.size else 0
        out.append(matched_suffix / c.size if c.size else float("nan"))
    return np.array(out)


def _finite(values: np.ndarray) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    return values[np.isfinite(values)]
