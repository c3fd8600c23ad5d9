"""LLM assistants: two tiny causal LMs trained from scratch on the two splits, scored in batches.

The paper's alternative to KenLM. Each sequence is trained and scored as [EOS] + tokens, so the first token is
scored given a start-of-text context, exactly as KenLM scores it with `bos=True`. Scores land on the same
`token_scores.parquet` schema, so masks and everything downstream are unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from stages.common import load_documents, load_model, load_tokenizer, pick_device
from stages.config import Config, TargetConfig
from stages.progress import track
from stages.target import train_from_scratch

SCORE_BATCH = 64


def _with_start_token(docs: pa.Table, start_id: int) -> pa.Table:
    """Prepend the start token and train on every token after it (whole documents, not only answers)."""
    ids = [[start_id, *seq] for seq in docs["input_ids"].to_pylist()]
    docs = docs.set_column(docs.schema.get_field_index("input_ids"), "input_ids", pa.array(ids, pa.list_(pa.int32())))
    return docs.set_column(docs.schema.get_field_index("answer_start"), "answer_start",
                           pa.array(np.ones(len(docs), np.int32)))


def train_llm_assistants(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    from stages.assistants import ASSISTANT_SPLITS

    a = cfg.assistants
    recipe = TargetConfig(hidden_size=a.llm_hidden_size, num_layers=a.llm_layers, num_heads=2,
                          intermediate_size=3 * a.llm_hidden_size, epochs=a.llm_epochs, lr=3e-3, batch_size=32, seed=0)
    tokenizer = load_tokenizer(inputs["prepare"])
    stats: dict[str, Any] = {"kind": "llm", "splits": a.splits}
    for name, splits in zip(("a", "b"), ASSISTANT_SPLITS[a.splits], strict=True):
        docs = _with_start_token(load_documents(inputs["prepare"], splits), tokenizer.eos_token_id)
        model, stats[name], _ = train_from_scratch(recipe, tokenizer, docs, f"assistant-{name}", pick_device(),
                                                     stage="assistants")
        model.save_pretrained(out / name)
        stats[name]["splits"] = list(splits)
    return stats


@torch.inference_mode()
def token_probabilities(model, sequences: list[list[int]], start_id: int, batch_size: int = SCORE_BATCH) -> np.ndarray:
    """P(token | [start] + previous tokens) for every token of every sequence, concatenated."""
    device = next(model.parameters()).device
    lengths = np.array([len(s) for s in sequences])
    out = np.empty(lengths.sum())
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    order = np.argsort(-lengths, kind="stable")  # similar lengths together: less padding
    for i in track(range(0, len(order), batch_size), "scores", unit="batches"):
        rows = order[i : i + batch_size]
        width = int(lengths[rows].max()) + 1
        batch = torch.full((len(rows), width), start_id, dtype=torch.long)
        valid = torch.arange(width - 1)[None, :] < torch.as_tensor(lengths[rows])[:, None]
        batch[:, 1:][valid] = torch.as_tensor(np.concatenate([sequences[r] for r in rows]), dtype=torch.long)
        logp = torch.log_softmax(model(input_ids=batch.to(device)).logits[:, :-1].float(), -1)
        picked = logp.gather(-1, batch[:, 1:, None].to(device))[..., 0].exp().cpu()
        flat_positions = torch.as_tensor(offsets[rows])[:, None] + torch.arange(width - 1)[None, :]
        out[flat_positions[valid].numpy()] = picked[valid].double().numpy()
    return out


def score_with_llms(assistants_dir: Path, docs: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    sequences = docs["input_ids"].to_pylist()
    probs = []
    for name in ("a", "b"):
        model = load_model(assistants_dir / name).eval()
        start_id = model.config.eos_token_id
        probs.append(token_probabilities(model, sequences, start_id))
        del model
    assert len(probs[0]) == int(pc.sum(pc.list_value_length(docs["input_ids"])).as_py() or 0)
    return probs[0], probs[1]
