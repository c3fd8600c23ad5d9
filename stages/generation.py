"""Greedy generation in batches, as Hugging Face's generate() computes it, for the evaluation suites.

Prompts are sorted by length so a batch holds similar lengths, and texts come back in the input order. Padding is on
the left so every row's next token sits in the last column. A row leaves its batch once it has emitted EOS or a stop
string (KnowMem's "\n\n" and "Question"), and its text is cut before the stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from stages.common import encode_prompts
from stages.scoring import length_batches


def prompt_ids(tokenizer, question: str) -> list[int]:
    """The prompt exactly as encode_qa tokenizes it for training, in the tokenizer's prompt format."""
    return encode_prompts(tokenizer, [question])[0]


def text_ids(tokenizer, text: str) -> list[int]:
    """Plain text as the model reads it (no QA template): BOS when the tokenizer adds one, then the text."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        ids = [tokenizer.bos_token_id, *ids]
    return ids


class InPlaceLayer(DynamicLayer):
    """A DynamicLayer that writes each step's keys and values into buffers sized once for the whole generation,
    where DynamicLayer concatenates: its copy of the whole cache at every step was most of a tiny model's step time.
    Attention reads views of the same values, so every logit is what DynamicLayer gives."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        batch, heads, _, dim = key_states.shape
        self.key_buffer = key_states.new_empty((batch, heads, self.capacity, dim))
        self.value_buffer = value_states.new_empty((batch, value_states.shape[1], self.capacity, value_states.shape[3]))
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot hold {end}")
        self.key_buffer[:, :, self.length : end] = key_states
        self.value_buffer[:, :, self.length : end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def _views(self) -> None:
        self.keys = self.key_buffer[:, :, : self.length]
        self.values = self.value_buffer[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self._views()


def preallocated_cache(config, capacity: int) -> DynamicCache:
    """The model's DynamicCache with each full-attention layer replaced by an InPlaceLayer of `capacity` positions;
    other layer kinds (sliding windows) stay as the model declares them."""
    cache = DynamicCache(config=config)
    cache.layers = [InPlaceLayer(capacity) if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


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
    for idx in length_batches([len(p) for p in prompts], batch_size):
        new = greedy_tokens(model, [prompts[i] for i in idx], max_new_tokens, eos, tokenizer.pad_token_id,
                            stopped if stop_strings else None)
        for row, i in enumerate(idx):
            texts[i] = cut_at(tokenizer.decode(new[row], skip_special_tokens=True), stop_strings)
    return texts


def greedy_tokens(model, prompts: Sequence[list[int]], max_new_tokens: int, eos: int, pad: int, stopped=None
                  ) -> list[list[int]]:
    """Each prompt's greedy new tokens before its EOS, as generate() computes them (left padding, positions from the
    attention mask, a KV cache, float32 argmax of the last position), except that a row leaves the batch once it has
    emitted EOS, or once `stopped(tokens)` holds: the rows left compute what they would have, and cost only theirs.
    The KV cache is written in place (preallocated_cache), so a step costs its own tokens, not a copy of the cache."""
    device = model.device
    n, width = len(prompts), max(len(p) for p in prompts)
    input_ids = torch.full((n, width), pad, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention[row, width - len(prompt) :] = 1
    ids, attention = input_ids.to(device), attention.to(device)
    positions = (attention.cumsum(-1) - 1).masked_fill(attention == 0, 0)
    cache = preallocated_cache(model.config, width + max_new_tokens)
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
