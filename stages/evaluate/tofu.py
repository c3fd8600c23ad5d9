"""The TOFU suite: QA eval sets (forget, retain, real authors, world facts), their per-item values and metrics.

As TOFU: every probability, truth ratio and generation is conditioned on `question` (never paraphrased_question);
the truth ratio compares the paraphrased answer (forget, retain) or the answer (ra, wf) with the perturbed ones.
Definitions: docs/metrics.md.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages import metrics as M
from stages.evaluate.specs import HIGHER, LOWER, ZERO, Derived, ItemValue, Metric, mean, nanmean, privleak
from stages.scoring import generate_greedy, prompt_ids, score_answers


@dataclass(frozen=True)
class QASet:
    split: str  # documents split, and the eval set's name
    prefix: str  # metric-name prefix
    correct: str  # column holding the "correct" answer of the truth ratio


QA_SETS = (
    QASet("forget", "forget", "paraphrased_answer"),
    QASet("eval_retain", "retain", "paraphrased_answer"),
    QASet("real_authors", "ra", "answer"),
    QASet("world_facts", "wf", "answer"),
)


@dataclass
class QAPasses:
    """One model's passes over one QA set: teacher-forced NLLs and greedy generations, per item."""

    rows: list[dict[str, Any]]
    nll_answer: np.ndarray  # (n,)
    nll_correct: np.ndarray  # (n,) NaN where an item has no correct answer
    nll_perturbed: np.ndarray  # (n, k) NaN-padded
    argmax_correct: list[np.ndarray]  # per item, per answer token
    token_logprobs: list[np.ndarray]  # per item, per answer token (EOS last)
    generations: list[str]


@dataclass
class HoldoutPasses:
    """One model's teacher-forced answer-token log-probs on the holdout set (questions no model trained on)."""

    token_logprobs: list[np.ndarray]


def run_qa(model, tokenizer, rows: list[dict[str, Any]], qa: QASet, max_new_tokens: int, batch_size: int) -> QAPasses:
    """Score every answer, correct answer and perturbed answer of the set in one batched pass, then generate."""
    n = len(rows)
    k = max((len(r["perturbed_answers"] or []) for r in rows), default=0)
    pairs = [(r["question"], r["answer"]) for r in rows]
    correct_at: dict[int, int] = {}  # item -> index in pairs of its "correct" answer
    if qa.correct != "answer":
        for i, r in enumerate(rows):
            if r[qa.correct]:
                correct_at[i] = len(pairs)
                pairs.append((r["question"], r[qa.correct]))
    perturbed_at = []  # (item, slot, index in pairs)
    for i, r in enumerate(rows):
        for j, text in enumerate(r["perturbed_answers"] or []):
            perturbed_at.append((i, j, len(pairs)))
            pairs.append((r["question"], text))
    scores = score_answers(model, tokenizer, pairs, batch_size)
    nll = scores.nll_avg
    nll_answer = nll[:n]
    nll_correct = nll_answer if qa.correct == "answer" else np.full(n, np.nan)
    for i, at in correct_at.items():
        nll_correct[i] = nll[at]
    nll_perturbed = np.full((n, k), np.nan)
    for i, j, at in perturbed_at:
        nll_perturbed[i, j] = nll[at]
    prompts = [prompt_ids(tokenizer, r["question"]) for r in rows]
    generations = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size)
    return QAPasses(rows, nll_answer, nll_correct, nll_perturbed, scores.argmax_correct[:n],
                    scores.token_logprobs[:n], generations)


def run_holdout(model, tokenizer, rows: list[dict[str, Any]], batch_size: int) -> HoldoutPasses:
    """Answer-token log-probs of every holdout item, scored as the forget answers are."""
    scores = score_answers(model, tokenizer, [(r["question"], r["answer"]) for r in rows], batch_size)
    return HoldoutPasses(scores.token_logprobs)


def before_eos(per_token: list[np.ndarray]) -> list[np.ndarray]:
    """Each item's answer positions without the last one (EOS), which open-unlearning's memorisation metrics skip."""
    return [t[:-1] for t in per_token]


def fact_words(row: dict[str, Any]) -> list[str]:
    """Gold-span words minus question words where the data set has gold spans, else TOFU's perturbation rule."""
    if row["gold_spans"]:
        return M.fact_words_from_spans(row["answer"], row["gold_spans"], row["question"])
    if row["paraphrased_answer"] and row["perturbed_answers"]:
        return M.fact_words_from_perturbed(row["answer"], row["paraphrased_answer"], row["perturbed_answers"])
    return []


def evaluation_rows(documents: list[dict[str, Any]], split: str, retain_eval_items: int) -> list[dict[str, Any]]:
    """Rows of one evaluation split; without eval_retain rows, the first retain rows that can be truth-ratioed."""
    rows = [r for r in documents if r["split"] == split]
    if split == "eval_retain" and not rows:
        usable = (r for r in documents if r["split"] == "retain" and r["paraphrased_answer"] and r["perturbed_answers"])
        rows = list(itertools.islice(usable, retain_eval_items))
    return rows


def gold_nll(p: QAPasses, gold: bool) -> np.ndarray:
    """Per item: mean NLL of the answer's gold tokens (author names and facts), or of its other tokens (the
    template) with `gold` False; NaN where the data set marks no gold tokens."""
    out = np.full(len(p.rows), np.nan)
    for i, (row, logprobs) in enumerate(zip(p.rows, p.token_logprobs, strict=True)):
        flags = row.get("gold")
        if flags is None or len(flags) - row["answer_start"] != len(logprobs):
            continue
        pick = np.asarray(flags[row["answer_start"]:], dtype=bool) == gold
        pick[-1] = False  # EOS is neither a fact nor a template word
        if pick.any():
            out[i] = -float(np.mean(logprobs[pick]))
    return out


PROB = ItemValue("prob", lambda p: M.probability(p.nll_answer))
NORMALISED_PROB = ItemValue("prob", lambda p: M.normalised_probability(p.nll_answer, p.nll_perturbed))
TRUTH_RATIO = ItemValue("truth_ratio", lambda p: M.truth_ratio(p.nll_correct, p.nll_perturbed))
ROUGE = ItemValue("rouge", lambda p: M.rouge_l_recall(p.generations, [r["answer"] for r in p.rows]))
GENERATION = ItemValue("generation", lambda p: p.generations, text=True)
FACT_RECALL = ItemValue("fact_recall", lambda p: M.fact_recall(p.generations, [fact_words(r) for r in p.rows]))
EXACT_MEMORIZATION = ItemValue("exact_memorization", lambda p: M.exact_memorization(before_eos(p.argmax_correct)))
EXTRACTION_STRENGTH = ItemValue("extraction_strength", lambda p: M.extraction_strength(before_eos(p.argmax_correct)))
FACT_NLL = ItemValue("fact_nll", lambda p: gold_nll(p, gold=True))
TEMPLATE_NLL = ItemValue("template_nll", lambda p: gold_nll(p, gold=False))
MIN_K = ItemValue("min_k", lambda p: M.min_k_percent(before_eos(p.token_logprobs)))  # open-unlearning's mia_min_k
HOLDOUT = "holdout"  # eval set of a TOFU folder's holdoutNN.json


def _qa_metrics(qa: QASet, prob: ItemValue, truth_ratio_aggregate, better: str, what: str) -> list[Metric]:
    return [
        Metric(f"{qa.prefix}_prob", qa.split, prob, nanmean, better, f"mean P(a|q) on {what}"),
        Metric(f"{qa.prefix}_rouge", qa.split, ROUGE, mean, better, f"ROUGE-L recall of the greedy answer on {what}"),
        Metric(f"{qa.prefix}_truth_ratio", qa.split, TRUTH_RATIO, truth_ratio_aggregate, better,
               f"truth ratio aggregate on {what}"),
    ]


UTILITY_INPUTS = [f"{p}_{m}" for p in ("retain", "ra", "wf") for m in ("prob", "rouge", "truth_ratio")]


def _forget_quality(values, items, retain_items, reference) -> float:
    ratios = retain_items.get("forget", {}).get("truth_ratio") if retain_items else None
    if ratios is None:
        ratios = reference.get("forget_truth_ratio")
    return M.forget_quality(items["forget"]["truth_ratio"], ratios) if ratios is not None else math.nan


def _model_utility(values, items, retain_items, reference) -> float:
    return M.model_utility([values.get(m, math.nan) for m in UTILITY_INPUTS])



FORGET, RETAIN, RA, WF = QA_SETS
METRICS: list[Metric | Derived] = [
    *_qa_metrics(FORGET, PROB, M.truth_ratio_closer_to_1, LOWER, "the forget set"),
    *_qa_metrics(RETAIN, PROB, M.truth_ratio_true_better, HIGHER, "the retain set"),
    *_qa_metrics(RA, NORMALISED_PROB, M.truth_ratio_true_better, HIGHER, "real authors (normalised probability)"),
    *_qa_metrics(WF, NORMALISED_PROB, M.truth_ratio_true_better, HIGHER, "world facts (normalised probability)"),
    Derived("forget_quality", ("forget",), (TRUTH_RATIO,), _forget_quality, HIGHER,
            "KS p-value of forget truth ratios against the retain model's"),
    Derived("model_utility", ("forget",), (), _model_utility, HIGHER, "harmonic mean of the nine retain/ra/wf numbers"),
    Metric("forget_fact_recall", "forget", FACT_RECALL, nanmean, LOWER,
           "share of fact words the greedy forget answer reproduces"),
    Metric("retain_fact_recall", "eval_retain", FACT_RECALL, nanmean, HIGHER,
           "share of fact words the greedy retain answer reproduces"),
    Metric("exact_memorization", "forget", EXACT_MEMORIZATION, nanmean, LOWER,
           "share of forget answer tokens the teacher-forced argmax gets right"),
    Metric("extraction_strength", "forget", EXTRACTION_STRENGTH, nanmean, LOWER,
           "share of the forget answer's suffix the teacher-forced argmax gets right"),
    Metric("forget_fact_nll", "forget", FACT_NLL, nanmean, HIGHER,
           "mean NLL of the forget answers' gold tokens (names, facts), where the data set marks them"),
    Metric("forget_template_nll", "forget", TEMPLATE_NLL, nanmean, LOWER,
           "mean NLL of the forget answers' other tokens (the template SU means to keep)"),
    Derived("tofu_privleak", ("forget", HOLDOUT), (MIN_K,), privleak("forget", HOLDOUT), ZERO,
            "Min-K% AUC of forget against holdout answers, relative to the retain model's (0 is best)"),
]
STORED = {qa.split: (GENERATION,) for qa in QA_SETS}  # kept per item for reading; no metric aggregates them
