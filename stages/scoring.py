"""Batched model passes for evaluation: teacher-forced answer NLLs and greedy generations.

Both sort items by length so a batch holds similar lengths, and return results in the input order.
Scoring pads on the right (causal attention never looks ahead, so padding cannot change a score);
generation pads on the left so every row's next token sits in the last column, and drops a row from its batch once it
has emitted EOS or a stop string (KnowMem's "\n\n" and "Question"), cutting the text before the stop string.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from stages.common import encode_prompts, encode_qa


@dataclass
class AnswerScores:
    nll_sum: np.ndarray  # (n,) sum of answer-token cross-entropies (EOS included, as in training)
    n_tokens: np.ndarray  # (n,) answer tokens scored
    argmax_correct: list[np.ndarray]  # per item, per answer token: teacher-forced argmax == label
    token_logprobs: list[np.ndarray]  # per item, per answer token: log P(label | prefix)

    @property
    def nll_avg(self) -> np.ndarray:
        return self.nll_sum / np.maximum(self.n_tokens, 1)


def prompt_ids(tokenizer, question: str) -> list[int]:
    """The prompt exactly as encode_qa tokenizes it for training, in the tokenizer's prompt format."""
    return encode_prompts(tokenizer, [question])[0]


def text_ids(tokenizer, text: str) -> list[int]:
    """Plain text as the model reads it (no QA template): BOS when the tokenizer adds one, then the text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


def _batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
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
    for idx in _batches([len(ids) for ids, _ in encoded], batch_size):
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


@torch.inference_mode()
def generate_greedy(
    model,
    tokenizer,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
    stop_strings: Sequence[str] = (),
) -> list[str]:
    """Greedy continuation of each prompt (token ids), cut at EOS or before the first stop string, decoded without
    special tokens."""
    eos = tokenizer.eos_token_id

    def stopped(tokens: list[int]) -> bool:
        return any(s in tokenizer.decode(tokens, skip_special_tokens=True) for s in stop_strings)

    texts = [""] * len(prompts)
    for idx in _batches([len(p) for p in prompts], batch_size):
        new = greedy_tokens(model, [prompts[i] for i in idx], max_new_tokens, eos, tokenizer.pad_token_id,
                            stopped if stop_strings else None)
        for row, i in enumerate(idx):
            texts[i] = cut_at(tokenizer.decode(new[row], skip_special_tokens=True), stop_strings)
    return texts


def greedy_tokens(model, prompts: Sequence[list[int]], max_new_tokens: int, eos: int, pad: int, stopped=None
                  ) -> list[list[int]]:
    """Each prompt's greedy new tokens before its EOS, as generate() computes them (left padding, positions from the
    attention mask, a KV cache, float32 argmax of the last position), except that a row leaves the batch once it has
    emitted EOS, or once `stopped(tokens)` holds: the rows left compute what they would have, and cost only theirs."""
    from transformers import DynamicCache

    device = model.device
    n, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention[row, width - len(prompt) :] = 1
    ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 0)
    cache = DynamicCache(config=model.config)
    out = torch.full((n, max_new_tokens), eos, dtype=torch.long)  # a row's text ends at its first EOS
    live = torch.arange(n)  # rows of `out` still generating
    for step in range(max_new_tokens):
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=1).logits
        next_tokens = logits[:, -1].float().argmax(-1)
        out[live, step] = next_tokens.cpu()
        finished = (next_tokens == eos).cpu()
        if stopped is not None:
            finished |= torch.tensor([stopped(out[row, : step + 1].tolist()) for row in live.tolist()])
        if bool(finished.all()):
            break
        if bool(finished.any()):
            keep = torch.nonzero(~finished).squeeze(1)
            cache.batch_select_indices(keep.to(device))
            live, next_tokens = live[keep], next_tokens[keep.to(device)]
            attention, positions = attention[keep.to(device)], positions[keep.to(device)]
        ids = next_tokens[:, None]
        attention = torch.cat([attention, attention.new_ones((len(live), 1))], dim=1)
        positions = positions[:, -1:] + 1
    ends = torch.where((out == eos).any(1), (out == eos).int().argmax(1), max_new_tokens)
    return [out[row, : ends[row]].tolist() for row in range(n)]


def cut_at(text: str, stop_strings: Sequence[str]) -> str:
    """The text before the earliest stop string, stripped."""
    cut = min((at for at in (text.find(s) for s in stop_strings) if at >= 0), default=len(text))
    return text[:cut].strip()
