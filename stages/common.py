"""Helpers every stage shares: the QA text format, tokenizers and models from artifact folders, devices."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pyarrow as pa

from schemas import read_table

log = logging.getLogger("sunlearn")

TOKENIZER_DIR = "tokenizer"
SPLITS_TRAIN = ("forget", "retain")  # the unlearning corpora; "full" is their union


def prompt_text(question: str) -> str:
    """The prompt every model sees; the answer follows it after one space."""
    return f"Question: {question}\nAnswer:"


def encode_qa(tokenizer, question: str, answer: str) -> tuple[list[int], int]:
    """Token ids of prompt + ' ' + answer + EOS, and the position of the first answer token."""
    prompt_ids = tokenizer(prompt_text(question), add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False):
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
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
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(Path(prepare_dir) / TOKENIZER_DIR)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
