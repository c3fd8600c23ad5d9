"""The documents suite: metrics for a user's own data (the files source), which has no perturbed or paraphrased
answers. Definitions: docs/metrics.md.

- forget and retain NLL on every forget row and the first evaluate.retain_eval_items retain rows;
- VerbMem on prefixes of forget documents (doc_verbmem, built by stages.corpus);
- PrivLeak of the first window of each forget document against the holdout (doc_holdout), where one is given;
- QA probability, ROUGE-L recall and fact recall on forget, retain and utility QA pairs, where records are QA.

The suite runs on data without TOFU's or MUSE's evaluation splits.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from stages import metrics as M
from stages.evaluate import muse, tofu
from stages.evaluate.specs import HIGHER, LOWER, ZERO, Derived, ItemValue, Metric, mean, nanmean, privleak
from stages.scoring import AnswerScores, score_sequences

PRIVLEAK_SETS = ("doc_privleak_forget", "doc_holdout")
QA_SETS = (tofu.QASet("doc_forget_qa", "forget_qa", "answer"), tofu.QASet("doc_retain_qa", "retain_qa", "answer"),
           tofu.QASet("doc_utility", "utility", "answer"))
# words that carry no fact: a fact word is an answer word that is neither one of these nor a word of the question
STOP_WORDS = frozenset(M.words(
    "a an the and or but of to in on at by for with from as is are was were be been being it its this that these "
    "those he she they we you i his her their our your my who what when where which how why there here has have had "
    "do does did not no yes so than then also into about over under after before"))


def is_documents_data(splits: set[str]) -> bool:
    """Data without TOFU's or MUSE's evaluation splits: the files source."""
    return "forget" in splits and not splits & {"eval_retain", "real_authors", "world_facts", *muse.EVAL_SETS}


def run_nll(model, tokenizer, rows: list[dict[str, Any]], batch_size: int) -> AnswerScores:
    """Teacher-forced scores of every row's tokens from its answer start (a document window: from its 2nd token)."""
    return score_sequences(model, [(r["input_ids"], r["answer_start"]) for r in rows], tokenizer.pad_token_id,
                           batch_size)


def fact_words(row: dict[str, Any]) -> list[str]:
    """Distinct answer words that are neither stop words nor words of the question."""
    asked = set(M.words(row["question"] or ""))
    return list(dict.fromkeys(w for w in M.words(row["answer"]) if w not in asked and w not in STOP_WORDS))


def eval_sets(by_split: dict[str, list[dict[str, Any]]], retain_items: int, max_new_tokens: int,
              batch_size: int) -> dict[str, tuple[list[dict[str, Any]], Any]]:
    """Eval set name -> (rows, run) for every set whose rows are present."""
    forget, retain = by_split.get("forget", []), by_split.get("retain", [])[:retain_items]
    rows = {
        "doc_forget": forget,
        "doc_retain": retain,
        "doc_verbmem": by_split.get("doc_verbmem", []),
        # a forget document's first window, as long as a holdout text (both cut to MUSE_CHUNK_TOKENS by prepare)
        "doc_privleak_forget": [r for r in forget if r["question"] is None and r["doc_id"].endswith("-000")],
        "doc_holdout": by_split.get("doc_holdout", []),
        "doc_forget_qa": [r for r in forget if r["question"] is not None],
        "doc_retain_qa": [r for r in retain if r["question"] is not None],
        "doc_utility": by_split.get("doc_utility", []),
    }
    if not rows["doc_holdout"]:
        rows["doc_privleak_forget"] = []
    runs = {
        "doc_forget": partial(run_nll, batch_size=batch_size),
        "doc_retain": partial(run_nll, batch_size=batch_size),
        "doc_verbmem": partial(muse.run_verbmem, max_new_tokens=max_new_tokens, batch_size=batch_size),
        "doc_privleak_forget": partial(muse.run_privleak, batch_size=batch_size),
        "doc_holdout": partial(muse.run_privleak, batch_size=batch_size),
        **{qa.split: partial(tofu.run_qa, qa=qa, max_new_tokens=max_new_tokens, batch_size=batch_size)
           for qa in QA_SETS},
    }
    return {name: (r, partial(runs[name], rows=r)) for name, r in rows.items() if r}


NLL = ItemValue("nll", lambda p: p.nll_avg)
FACT_RECALL = ItemValue("fact_recall", lambda p: M.fact_recall(p.generations, [fact_words(r) for r in p.rows]))



def _qa_metrics(qa: tofu.QASet, better: str, what: str) -> list[Metric]:
    return [
        Metric(f"{qa.prefix}_prob", qa.split, tofu.PROB, nanmean, better, f"mean P(a|q) on {what}"),
        Metric(f"{qa.prefix}_rouge", qa.split, tofu.ROUGE, mean, better, f"ROUGE-L recall of greedy answers, {what}"),
        Metric(f"{qa.prefix}_fact_recall", qa.split, FACT_RECALL, nanmean, better,
               f"share of the answer's fact words the greedy answer reproduces, {what}"),
    ]


FORGET_QA, RETAIN_QA, UTILITY = QA_SETS
METRICS: list[Metric | Derived] = [
    Metric("forget_nll", "doc_forget", NLL, nanmean, HIGHER, "mean per-token NLL of the forget rows"),
    Metric("retain_nll", "doc_retain", NLL, nanmean, LOWER, "mean per-token NLL of the first retain rows"),
    Metric("doc_verbmem_f", "doc_verbmem", muse.ROUGE_F1, mean, LOWER,
           "ROUGE-L F1 of continuations of forget-document prefixes"),
    Derived("doc_privleak", PRIVLEAK_SETS, (muse.MIN_K,), privleak(*PRIVLEAK_SETS), ZERO,
            "Min-K% AUC of forget documents against the holdout, relative to the retain model's (0 is best)"),
    *_qa_metrics(FORGET_QA, LOWER, "forget QA pairs"),
    *_qa_metrics(RETAIN_QA, HIGHER, "retain QA pairs"),
    *_qa_metrics(UTILITY, HIGHER, "utility QA pairs"),
]
STORED = {name: (muse.GENERATION,) for name in ("doc_verbmem", *(qa.split for qa in QA_SETS))}
