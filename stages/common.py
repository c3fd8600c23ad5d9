"""Helpers every stage shares: the QA text format, tokenizers and models from artifact folders, devices."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from schemas import read_table

log = logging.getLogger("sunlearn")

TOKENIZER_DIR = "tokenizer"
SPLITS_TRAIN = ("forget", "retain")  # the unlearning corpora; "full" is their union


PLAIN_PROMPT = "Question: {question}\nAnswer:"  # TOFU's template; the answer follows after one space
PROMPT_FORMAT_FILE = "prompt_format.json"  # beside the tokenizer: the template every stage builds QA prompts with
TEMPLATES = ("plain", "chat")


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes a prompt: `plain` (PLAIN_PROMPT) or `chat` (the tokenizer's chat template, a user turn
    after an optional system turn, then the assistant header; the answer is what follows, then EOS)."""

    template: str = "plain"
    system_prompt: str | None = None


def prompt_format(tokenizer) -> PromptFormat:
    """The prompt format load_tokenizer attached to this tokenizer (plain for one made elsewhere)."""
    return getattr(tokenizer, "prompt_format", None) or PromptFormat()


def chat_messages(question: str, fmt: PromptFormat) -> list[dict[str, str]]:
    system = [{"role": "system", "content": fmt.system_prompt}] if fmt.system_prompt else []
    return [*system, {"role": "user", "content": question}]


def prompt_text(question: str, tokenizer=None) -> str:
    """The prompt a model sees before its answer: PLAIN_PROMPT, or the chat template of `tokenizer` when its format
    says chat (BOS then comes from the template)."""
    fmt = prompt_format(tokenizer) if tokenizer is not None else PromptFormat()
    if fmt.template == "chat":
        return tokenizer.apply_chat_template(chat_messages(question, fmt), tokenize=False, add_generation_prompt=True)
    return PLAIN_PROMPT.format(question=question)


def encode_prompts(tokenizer, questions: list[str]) -> list[list[int]]:
    """Token ids of each question's prompt, with BOS where the tokenizer adds one (plain) or the template writes it
    (chat); equal to apply_chat_template(..., tokenize=True, add_generation_prompt=True) for chat."""
    texts = [prompt_text(q, tokenizer) for q in questions]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    add_bos = tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False)
    if prompt_format(tokenizer).template == "plain" and add_bos:
        ids = [[tokenizer.bos_token_id, *x] for x in ids]
    return ids


def answer_text(tokenizer, answer: str) -> str:
    """The answer as it follows the prompt: after one space (plain), right after the assistant header (chat)."""
    return answer if prompt_format(tokenizer).template == "chat" else " " + answer


def encode_qa(tokenizer, question: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + answer + EOS, and the position of the first answer token."""
    [prompt_ids] = encode_prompts(tokenizer, [question])
    answer_ids = tokenizer(answer_text(tokenizer, answer), add_special_tokens=False)["input_ids"]
    return [*prompt_ids, *answer_ids, tokenizer.eos_token_id], len(prompt_ids)


def load_documents(prepare_dir: Path, splits: tuple[str, ...] | None = None) -> pa.Table:
    table = read_table(Path(prepare_dir) / "documents.parquet")
    if splits is not None:
        mask = pa.compute.is_in(table["split"], value_set=pa.array(list(splits)))
        table = table.filter(mask)
    return table


def kenlm_sentences(docs: pa.Table) -> list[str]:
    """Each document's token ids as one KenLM sentence: one "word" per token id, separated by spaces."""
    import polars as pl

    frame = pl.from_arrow(docs.select(["input_ids"]))
    return frame.select(pl.col("input_ids").cast(pl.List(pl.Utf8)).list.join(" ")).to_series().to_list()


def load_tokenizer(prepare_dir: Path):
    """The prepared tokenizer, with its prompt format attached (prompt_format reads it)."""
    from transformers import AutoTokenizer

    folder = Path(prepare_dir) / TOKENIZER_DIR
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    fmt = folder / PROMPT_FORMAT_FILE
    tokenizer.prompt_format = PromptFormat(**json.loads(fmt.read_text())) if fmt.is_file() else PromptFormat()
    return tokenizer


def save_tokenizer(tokenizer, folder: Path) -> None:
    """The tokenizer's files and its prompt format, as load_tokenizer reads them."""
    tokenizer.save_pretrained(folder)
    (Path(folder) / PROMPT_FORMAT_FILE).write_text(json.dumps(asdict(prompt_format(tokenizer))))


def load_model(path: Path | str, device: str | None = None):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path)
    return model.to(device or pick_device())


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def seed_everything(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
