"""The MUSE suite: VerbMem, KnowMem (forget, retain) and PrivLeak, as muse_bench runs them. Definitions:
docs/metrics.md."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from stages import metrics as M
from stages.common import prompt_text
from stages.evaluate.specs import HIGHER, LOWER, ZERO, Derived, ItemValue, Metric, mean, privleak
from stages.scoring import generate_greedy, score_sequences, text_ids

# generation lengths and stop strings as muse_bench, capped by evaluate.max_new_tokens
VERBMEM_NEW_TOKENS = 128
KNOWMEM_NEW_TOKENS = 32
KNOWMEM_STOP = ("\n\n", "Question")
KNOWMEM_SETS = {"knowmem_forget": "knowmem_forget_icl", "knowmem_retain": "knowmem_retain_icl"}  # set -> ICL split
PRIVLEAK_SETS = ("privleak_forget", "privleak_holdout")
EVAL_SETS = ("verbmem", *KNOWMEM_SETS, *PRIVLEAK_SETS)


@dataclass
class Generations:
    generations: list[str]
    references: list[str]


@dataclass
class Likelihoods:
    token_logprobs: list[np.ndarray]


def run_verbmem(model, tokenizer, rows: list[dict[str, Any]], max_new_tokens: int, batch_size: int) -> Generations:
    """Greedy continuation of each prompt, against gt cut to its first VERBMEM_NEW_TOKENS tokens."""
    prompts = [text_ids(tokenizer, r["question"]) for r in rows]
    generations = generate_greedy(model, tokenizer, prompts, min(VERBMEM_NEW_TOKENS, max_new_tokens), batch_size)
    gt_ids = tokenizer([r["answer"] for r in rows], add_special_tokens=False)["input_ids"]
    references = [tokenizer.decode(ids[:VERBMEM_NEW_TOKENS], skip_special_tokens=True) for ids in gt_ids]
    return Generations(generations, references)


def knowmem_prompt(icl: list[dict[str, Any]], question: str) -> str:
    """MUSE's few-shot prompt: every ICL pair as "Question: …\\nAnswer: …\\n\\n", then the question."""
    shots = "".join(f"{prompt_text(r['question'])} {r['answer']}\n\n" for r in icl)
    return shots + prompt_text(question)


def run_knowmem(model, tokenizer, rows: list[dict[str, Any]], icl: list[dict[str, Any]], max_new_tokens: int,
                batch_size: int) -> Generations:
    """Greedy answers after the ICL prompt, cut at "\\n\\n" or "Question"."""
    prompts = [text_ids(tokenizer, knowmem_prompt(icl, r["question"])) for r in rows]
    new_tokens = min(KNOWMEM_NEW_TOKENS, max_new_tokens)
    generations = generate_greedy(model, tokenizer, prompts, new_tokens, batch_size, KNOWMEM_STOP)
    return Generations(generations, [r["answer"] for r in rows])


def run_privleak(model, tokenizer, rows: list[dict[str, Any]], batch_size: int) -> Likelihoods:
    """Every text's token log-probs, teacher-forced."""
    encoded = [(r["input_ids"], 0) for r in rows]
    return Likelihoods(score_sequences(model, encoded, tokenizer.pad_token_id, batch_size).token_logprobs)


ROUGE_F1 = ItemValue("rouge", lambda p: M.rouge_l_f1(p.generations, p.references))
GENERATION = ItemValue("generation", lambda p: p.generations, text=True)
MIN_K = ItemValue("min_k", lambda p: M.min_k_percent(p.token_logprobs))



METRICS: list[Metric | Derived] = [
    Metric("verbmem_f", "verbmem", ROUGE_F1, mean, LOWER, "ROUGE-L F1 of continuations of forget-article prefixes"),
    Metric("knowmem_f", "knowmem_forget", ROUGE_F1, mean, LOWER, "ROUGE-L F1 of answers to forget-set questions"),
    Metric("knowmem_r", "knowmem_retain", ROUGE_F1, mean, HIGHER, "ROUGE-L F1 of answers to retain-set questions"),
    Derived("privleak", PRIVLEAK_SETS, (MIN_K,), privleak(*PRIVLEAK_SETS), ZERO,
            "Min-K% AUC of forget against holdout texts, relative to the retain model's (0 is best)"),
]
STORED = {name: (GENERATION,) for name in ("verbmem", *KNOWMEM_SETS)}
