"""Teacher-forced scores in batches: answer NLLs, per-token log-probs and argmax hits.

Items are sorted by length so a batch holds similar lengths, and results come back in the input order. Padding is on
the right: causal attention never looks ahead, so padding cannot change a score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stages.common import encode_qa


@dataclass
class AnswerScores:
    nll_sum: np.ndarray  # (n,) sum of answer-token cross-entropies (EOS included, as in training)
    n_tokens: np.ndarray  # (n,) answer tokens scored
    argmax_correct: list[np.ndarray]  # per item, per answer token: teacher-forced argmax == label
    token_logprobs: list[np.ndarray]  # per item, per answer token: log P(label | prefix)

    @property
    def nll_avg(self) -> np.ndarray:
        return self.nll_sum / np.maximum(self.n_tokens, 1)


def length_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Item indices in batches of at most `batch_size`, shortest first."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def score_answers(model, tokenizer, pairs: Sequence[tuple[str, str]], batch_size: int) -> AnswerScores:
    """Teacher-forced NLL of each (question, answer) pair over its answer tokens, tokenized by encode_qa."""
    return score_sequences(model, [encode_qa(tokenizer, q, a) for q, a in pairs], tokenizer.pad_token_id, batch_size)


@torch.inference_mode()
def score_sequences(model, encoded: Sequence[tuple[list[int], int]], pad: int, batch_size: int) -> AnswerScores:
    """Teacher-forced scores of token sequences over positions >= their start (start 0 scores from the second
    token, which is the first one with a context)."""
    n = len(encoded)
    nll_sum = np.zeros(n)
    n_tokens = np.zeros(n, dtype=np.int64)
    argmax_correct: list[np.ndarray] = [np.zeros(0, dtype=bool)] * n
    token_logprobs: list[np.ndarray] = [np.zeros(0)] * n
    device = model.device
    for idx in length_batches([len(ids) for ids, _ in encoded], batch_size):
        width = max(len(encoded[i][0]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attention = torch.zeros((len(idx), width), dtype=torch.long)
        labels = torch.full((len(idx), width), -100, dtype=torch.long)
        for row, i in enumerate(idx):
            ids, start = encoded[i]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
            labels[row, start : len(ids)] = input_ids[row, start : len(ids)]
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        logits, labels = logits[:, :-1].float(), labels[:, 1:].to(device)
        ce = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
        scored = labels != -100
        hits = (logits.argmax(-1) == labels) & scored
        nll_sum[idx] = ce.sum(1).double().cpu().numpy()
        n_tokens[idx] = scored.sum(1).cpu().numpy()
        scored, hits, logprobs = scored.cpu().numpy(), hits.cpu().numpy(), -ce.double().cpu().numpy()
        for row, i in enumerate(idx):
            argmax_correct[i] = hits[row][scored[row]]
            token_logprobs[i] = logprobs[row][scored[row]]
    return AnswerScores(nll_sum, n_tokens, argmax_correct, token_logprobs)
