"""Score every token of every forget document with both assistants.

Writes `token_scores.parquet`: one row per token, with P(token | context) under each assistant and their
absolute difference, the signal SU thresholds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from schemas import write_table
from stages.common import kenlm_sentences, load_documents
from stages.config import Config
from stages.progress import track


def flat_token_table(docs: pa.Table) -> dict[str, np.ndarray]:
    """Per token of `docs`: doc index, position, token id, whether it is an answer token, gold flag."""
    lengths = pa.compute.list_value_length(docs["input_ids"]).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    doc_index = np.repeat(np.arange(len(lengths)), lengths)
    position = np.arange(lengths.sum()) - np.repeat(offsets, lengths)
    answer_start = np.repeat(docs["answer_start"].to_numpy(), lengths)
    gold_lists = docs["gold"]
    gold = np.full(len(position), np.nan)
    has_gold = np.repeat(gold_lists.is_valid().to_numpy(zero_copy_only=False), lengths)
    if has_gold.any():
        gold[has_gold] = pa.compute.list_flatten(gold_lists).to_numpy(zero_copy_only=False).astype(float)
    return {
        "doc_index": doc_index,
        "position": position.astype(np.int32),
        "token_id": pa.compute.list_flatten(docs["input_ids"]).to_numpy().astype(np.int32),
        "in_answer": position >= answer_start,
        "gold": gold,  # nan where unknown
    }


class KenLMScorer:
    """P(token | context) for every token of a sentence, from a KenLM binary (BOS on, EOS off)."""

    def __init__(self, path: Path):
        import kenlm

        self.model = kenlm.Model(str(path))

    def probabilities(self, sentence: str, n_tokens: int) -> np.ndarray:
        log10 = np.fromiter((s[0] for s in self.model.full_scores(sentence, bos=True, eos=False)), float, n_tokens)
        return np.power(10.0, log10)


def score_tokens(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    docs = load_documents(inputs["prepare"], ("forget",))
    flat = flat_token_table(docs)
    if cfg.assistants.kind == "llm":
        from stages.llm_assistants import score_with_llms

        p_a, p_b = score_with_llms(inputs["assistants"], docs)
    else:
        scorers = [KenLMScorer(inputs["assistants"] / f"{name}.binary") for name in ("a", "b")]
        lengths = pa.compute.list_value_length(docs["input_ids"]).to_numpy()
        columns: list[list[np.ndarray]] = [[], []]
        for sentence, n in track(zip(kenlm_sentences(docs), lengths, strict=True), "scores", len(lengths), "docs",
                                 model="kenlm a, b"):
            for column, scorer in zip(columns, scorers, strict=True):
                column.append(scorer.probabilities(sentence, int(n)))
        p_a, p_b = (np.concatenate(c) if c else np.zeros(0) for c in columns)
    gold = flat["gold"]
    table = pa.table({
        "doc_id": docs["doc_id"].take(pa.array(flat["doc_index"])),
        "position": flat["position"],
        "token_id": flat["token_id"],
        "p_a": p_a,
        "p_b": p_b,
        "score_diff": np.abs(p_a - p_b),
        "in_answer": flat["in_answer"],
        "gold": pa.array(gold == 1.0, mask=np.isnan(gold)),
    })
    write_table(table, out / "token_scores.parquet")
    answer = flat["in_answer"]
    diff = np.abs(p_a - p_b)[answer]
    return {
        "documents": len(docs),
        "tokens": len(table),
        "answer_tokens": int(answer.sum()),
        "score_diff_mean": float(diff.mean()) if diff.size else 0.0,
        "score_diff_p90": float(np.quantile(diff, 0.9)) if diff.size else 0.0,
    }
