"""Synthetic token corpora of any size, written as a prepare folder (`documents.parquet`) the real stages read.

Documents are strings of phrases: a pool of short token sequences drawn from a Zipf-like law over the vocabulary,
picked again by a Zipf-like law, with a little noise between them, so n-grams repeat the way they do in templated
QA text. Forget documents also draw from a pool of forget-only phrases, so the two assistants disagree on them; the
tokens of those phrases are the gold tokens. Built with numpy and pyarrow: 10M tokens never pass through a Python list.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from schemas import DOCUMENTS, write_table

VOCAB = 4096  # the tofu/muse presets' tokenizer size
PHRASES = 20_000  # shared pool; forget-only phrases are PHRASES // 10 more
FORGET_PHRASE_RATE = 0.15  # share of a forget document's phrases taken from the forget-only pool
NOISE_RATE = 0.01  # tokens replaced by a random one
DOC_LENGTHS = (50, 200)


def zipf_probabilities(n: int, exponent: float = 1.1, shift: float = 2.7) -> np.ndarray:
    """Zipf–Mandelbrot weights over ranks 0..n-1."""
    weights = 1.0 / (np.arange(n) + shift) ** exponent
    return weights / weights.sum()


def _phrase_pool(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(3, 13, n)
    tokens = rng.choice(VOCAB, lengths.sum(), p=zipf_probabilities(VOCAB)).astype(np.int32)
    return tokens, np.concatenate([[0], np.cumsum(lengths)])


def _stream(rng: np.random.Generator, n_tokens: int, pool: tuple[np.ndarray, np.ndarray], forget_from: int | None
            ) -> tuple[np.ndarray, np.ndarray]:
    """n_tokens of concatenated phrases, and per token whether it came from a forget-only phrase."""
    tokens, offsets = pool
    n_pool = len(offsets) - 1
    n_shared = forget_from if forget_from is not None else n_pool
    picks = rng.choice(n_shared, n_tokens // 5 + 16, p=zipf_probabilities(n_shared))
    if forget_from is not None:
        forget = rng.random(len(picks)) < FORGET_PHRASE_RATE
        picks[forget] = forget_from + rng.choice(n_pool - forget_from, forget.sum(),
                                                 p=zipf_probabilities(n_pool - forget_from))
    lengths = offsets[picks + 1] - offsets[picks]
    while lengths.sum() < n_tokens:  # short draw: add more phrases
        extra = rng.choice(n_shared, len(picks) // 4 + 16, p=zipf_probabilities(n_shared))
        picks, lengths = np.concatenate([picks, extra]), np.concatenate([lengths, offsets[extra + 1] - offsets[extra]])
    starts = np.repeat(offsets[picks], lengths)
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    stream = tokens[(starts + within)[:n_tokens]].copy()
    noise = rng.random(n_tokens) < NOISE_RATE
    stream[noise] = rng.integers(0, VOCAB, noise.sum())
    from_forget = np.repeat(picks >= n_shared, lengths)[:n_tokens] & ~noise
    return stream, from_forget


def _documents(rng: np.random.Generator, split: str, stream: np.ndarray, gold: np.ndarray | None) -> pa.Table:
    lengths = rng.integers(DOC_LENGTHS[0], DOC_LENGTHS[1] + 1, len(stream) // DOC_LENGTHS[0] + 1)
    ends = np.cumsum(lengths)
    lengths = lengths[: np.searchsorted(ends, len(stream)) + 1]
    lengths[-1] -= lengths.sum() - len(stream)
    lengths = lengths[lengths > 0]
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    n = len(lengths)
    answer_start = np.minimum(rng.integers(5, 30, n), lengths - 1).astype(np.int32)  # a short prompt, then the answer
    empty = pa.array([""] * n)
    gold_lists = pa.nulls(n, pa.list_(pa.bool_())) if gold is None else pa.ListArray.from_arrays(offsets, gold)
    return pa.table({
        "doc_id": pa.array([f"{split}-{i}" for i in range(n)]),
        "split": pa.array([split] * n),
        "author": empty,
        "question": empty,
        "answer": empty,
        "paraphrased_question": empty,
        "paraphrased_answer": empty,
        "perturbed_answers": pa.nulls(n, pa.list_(pa.string())),
        "gold_spans": pa.nulls(n, DOCUMENTS.field("gold_spans").type),
        "input_ids": pa.ListArray.from_arrays(offsets, pa.array(stream, pa.int32())),
        "answer_start": answer_start,
        "gold": gold_lists,
    })


def write_documents(prepare_dir: Path, n_tokens: int, seed: int = 0) -> dict[str, int]:
    """A prepare folder whose forget split has n_tokens tokens; the retain split has as many."""
    rng = np.random.default_rng(seed)
    pool = _phrase_pool(rng, PHRASES + PHRASES // 10)
    forget, gold = _stream(rng, n_tokens, pool, forget_from=PHRASES)
    retain, _ = _stream(rng, n_tokens, (pool[0], pool[1][: PHRASES + 1]), forget_from=None)
    table = pa.concat_tables([_documents(rng, "forget", forget, gold), _documents(rng, "retain", retain, None)])
    prepare_dir.mkdir(parents=True, exist_ok=True)
    write_table(table, prepare_dir / "documents.parquet")
    split = table["split"].to_numpy(zero_copy_only=False)
    return {"forget_documents": int((split == "forget").sum()), "retain_documents": int((split == "retain").sum()),
            "forget_tokens": n_tokens, "retain_tokens": n_tokens}
