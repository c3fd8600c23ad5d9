"""Token sequences of one split and the padded batches the loop feeds the model.

Every per-token tensor is aligned with input positions: entry t is about token x_t (its log-prob given x_<t, whether
it is an answer token, whether SU selected it), exactly like `position` in masks.parquet.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from schemas import read_table
from stages.common import encode_qa

# Preferred answers of idkdpo; each forget question gets one, picked by a hash of its doc_id.
IDK_ANSWERS = [
    "I'm not sure about that.",
    "I don't know.",
    "I have no information on that.",
    "I'm afraid I can't answer that.",
    "That is something I don't know.",
    "I'm not able to say.",
    "I don't have that information.",
    "I can't recall that.",
    "Sorry, I don't know the answer to that.",
    "I have no idea.",
    "That's beyond what I know.",
    "I'm unable to answer that question.",
    "I don't have any details about that.",
    "I couldn't tell you.",
    "I'm not familiar with that.",
    "I lack the knowledge to answer that.",
    "That's not something I can answer.",
    "I'm uncertain about that.",
    "I have nothing to say on that.",
    "I really don't know.",
]


@dataclass
class Split:
    """The tokenised documents of one split; `selected` (forget only) is SU's per-position selection."""

    doc_ids: list[str]
    input_ids: list[np.ndarray]
    answer_start: np.ndarray
    selected: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.doc_ids)


@dataclass
class Batch:
    doc_ids: list[str]
    input_ids: Tensor  # (B, T), right-padded
    attention_mask: Tensor
    answer_mask: Tensor  # (B, T) bool: answer tokens (the label positions)
    selected: Tensor | None  # (B, T) bool, forget batches only

    def labels(self, selective: bool = False) -> Tensor:
        """Hugging Face labels: the token id where the loss counts, -100 elsewhere."""
        keep = self.answer_mask & self.selected if selective else self.answer_mask
        return torch.where(keep, self.input_ids, torch.full_like(self.input_ids, -100))


def load_split(documents: pa.Table, split: str) -> Split:
    rows = documents.filter(pa.compute.equal(documents["split"], split))
    return Split(
        doc_ids=rows["doc_id"].to_pylist(),
        input_ids=[np.asarray(ids, dtype=np.int64) for ids in rows["input_ids"].to_pylist()],
        answer_start=rows["answer_start"].to_numpy().astype(np.int64),
    )


def attach_selection(forget: Split, masks_path: Path) -> Split:
    """Per forget document, a bool per position from masks.parquet (positions it does not list stay False)."""
    table = read_table(masks_path, columns=["doc_id", "position", "selected"])
    doc = np.asarray(table["doc_id"].to_pylist(), dtype=object)
    pos = table["position"].to_numpy()
    sel = table["selected"].to_numpy(zero_copy_only=False)
    order = np.argsort(doc, kind="stable")
    doc, pos, sel = doc[order], pos[order], sel[order]
    keys, starts = np.unique(doc, return_index=True)
    bounds = dict(zip(keys, zip(starts, [*starts[1:], len(doc)], strict=True), strict=True))
    missing = [d for d in forget.doc_ids if d not in bounds]
    if missing:
        raise ValueError(f"{masks_path}: no rows for forget document {missing[0]!r}")
    forget.selected = []
    for doc_id, ids in zip(forget.doc_ids, forget.input_ids, strict=True):
        lo, hi = bounds[doc_id]
        row = np.zeros(len(ids), dtype=bool)
        row[pos[lo:hi]] = sel[lo:hi]
        forget.selected.append(row)
    return forget


def idk_split(documents: pa.Table, forget: Split, tokenizer) -> Split:
    """The forget questions answered with a refusal: idkdpo's preferred sequences."""
    rows = documents.filter(pa.compute.equal(documents["split"], "forget"))
    question = dict(zip(rows["doc_id"].to_pylist(), rows["question"].to_pylist(), strict=True))
    encoded = [
        encode_qa(tokenizer, question[d], IDK_ANSWERS[zlib.crc32(d.encode()) % len(IDK_ANSWERS)])
        for d in forget.doc_ids
    ]
    return Split(
        doc_ids=list(forget.doc_ids),
        input_ids=[np.asarray(ids, dtype=np.int64) for ids, _ in encoded],
        answer_start=np.asarray([start for _, start in encoded], dtype=np.int64),
    )


def collate(split: Split, rows: np.ndarray, pad_id: int) -> Batch:
    seqs = [split.input_ids[i] for i in rows]
    lengths = torch.tensor([len(s) for s in seqs])
    width = int(lengths.max())
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    selected = torch.zeros((len(seqs), width), dtype=torch.bool) if split.selected is not None else None
    for b, (i, seq) in enumerate(zip(rows, seqs, strict=True)):
        input_ids[b, : len(seq)] = torch.from_numpy(seq)
        if selected is not None:
            selected[b, : len(seq)] = torch.from_numpy(split.selected[i])
    positions = torch.arange(width)
    attention_mask = positions < lengths[:, None]
    starts = torch.from_numpy(split.answer_start[rows])
    answer_mask = (positions >= starts[:, None]) & attention_mask
    return Batch([split.doc_ids[i] for i in rows], input_ids, attention_mask.long(), answer_mask, selected)


def schedule(
    n_forget: int, n_retain: int, batch_size: int, epochs: int, seed: int, min_rows: int = 1
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """(epoch, forget rows, retain rows) per micro step: forget reshuffled per epoch, retain cycled in a fixed order.

    A last batch of an epoch with fewer than `min_rows` rows (one per process) is dropped.
    """
    rng = np.random.default_rng(seed)
    retain_order = rng.permutation(n_retain)
    plan, cursor = [], 0
    for epoch in range(epochs):
        order = rng.permutation(n_forget)
        for lo in range(0, n_forget, batch_size):
            forget_rows = order[lo : lo + batch_size]
            if len(forget_rows) < min_rows:
                continue
            retain_rows = retain_order[(cursor + np.arange(len(forget_rows))) % n_retain]
            cursor += len(forget_rows)
            plan.append((epoch, forget_rows, retain_rows))
    return plan
