"""Reference values from the frozen target, computed once before any method trains, so no second model is kept.

`unlearn.reference=model` keeps the frozen target in memory instead (ModelReference) and computes the same values
batch by batch: the field's usual way, which costs a second copy of the weights during training (`python -m bench
memory` measures it).

Kinds (column `kind` of ref_logprobs.parquet):
    forget  log-probs of each forget answer token (npo, npo_gd, idkdpo, su_npo; su_npo sums the selected ones)
    idk     log-probs of each refusal answer token (idkdpo)
    retain  top-k log-probs per retain answer token, flattened, with their token ids in `topk_ids` (kl)
    retain_hidden_<L>  the output of decoder layer L per retain answer token, flattened (rmu); d floats a token

UNDIAL's full logits on forget tokens (V floats a token) are not kept: only ModelReference gives them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import Tensor

from stages.unlearn.data import Batch, Split, collate
from stages.unlearn.methods import KL_TOP_K, token_logprobs


def hidden_kind(layer: int) -> str:
    return f"retain_hidden_{layer}"


@contextmanager
def layer_output(model, layer: int | None) -> Iterator[list[Tensor]]:
    """Collects the output of decoder layer `layer` (module model.layers.<layer>) of each forward pass inside;
    with layer None, collects nothing."""
    captured: list[Tensor] = []
    if layer is None:
        yield captured
        return
    try:
        module = model.get_submodule(f"model.layers.{layer}")
    except AttributeError:
        message = f"the model has no module model.layers.{layer} (hidden states need a Llama-style layout)"
        raise ValueError(message) from None
    handle = module.register_forward_hook(
        lambda _module, _inputs, out: captured.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        yield captured
    finally:
        handle.remove()


@torch.no_grad()
def hidden_table(model, split: Split, layer: int, pad_id: int, batch_size: int = 32) -> pa.Table:
    """Rows of kind retain_hidden_<layer>: the layer's output at each answer position of `split`, flattened."""
    model.eval()
    device = next(model.parameters()).device
    columns: dict[str, list] = {"doc_id": [], "kind": [], "logprob_sum": [], "token_logprobs": [], "topk_ids": []}
    for lo in range(0, len(split), batch_size):
        batch = collate(split, np.arange(lo, min(lo + batch_size, len(split))), pad_id)
        with layer_output(model, layer) as hidden:
            model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
        values = hidden[0].float().cpu()
        for b, doc_id in enumerate(batch.doc_ids):
            columns["doc_id"].append(doc_id)
            columns["kind"].append(hidden_kind(layer))
            columns["logprob_sum"].append(None)
            columns["token_logprobs"].append(values[b][batch.answer_mask[b]].flatten().numpy())
            columns["topk_ids"].append(None)
    model.train()
    return pa.table(columns)


@torch.no_grad()
def reference_table(model, splits: dict[str, Split], pad_id: int, batch_size: int = 32) -> pa.Table:
    """One row per (kind, document) of `splits`, keyed by kind: forget | idk | retain."""
    model.eval()
    device = next(model.parameters()).device
    columns: dict[str, list] = {"doc_id": [], "kind": [], "logprob_sum": [], "token_logprobs": [], "topk_ids": []}
    for kind, split in splits.items():
        for lo in range(0, len(split), batch_size):
            batch = collate(split, np.arange(lo, min(lo + batch_size, len(split))), pad_id)
            ids = batch.input_ids.to(device)
            logits = model(input_ids=ids, attention_mask=batch.attention_mask.to(device)).logits.float()
            logp = token_logprobs(logits, ids).cpu()
            if kind == "retain":
                k = min(KL_TOP_K, logits.shape[-1])
                top_logp, top_ids = torch.log_softmax(logits[:, :-1], dim=-1).topk(k, dim=-1)
                top_logp, top_ids = top_logp.cpu(), top_ids.cpu()
            for b, doc_id in enumerate(batch.doc_ids):
                answer = batch.answer_mask[b]
                columns["doc_id"].append(doc_id)
                columns["kind"].append(kind)
                columns["logprob_sum"].append(float(logp[b][answer].sum()))
                if kind == "retain":  # row t-1 of the shifted top-k predicts position t
                    shifted = answer[1:]
                    columns["token_logprobs"].append(top_logp[b][shifted].flatten().numpy())
                    columns["topk_ids"].append(top_ids[b][shifted].flatten().int().numpy())
                else:
                    columns["token_logprobs"].append(logp[b][answer].numpy())
                    columns["topk_ids"].append(None)
    model.train()
    return pa.table(columns)


class Reference:
    """Looks reference values up by doc_id and lays them out at the positions of a batch."""

    def __init__(self, table: pa.Table):
        self.rows: dict[tuple[str, str], tuple[np.ndarray, np.ndarray | None]] = {}
        for doc_id, kind, logp, ids in zip(
            table["doc_id"].to_pylist(),
            table["kind"].to_pylist(),
            table["token_logprobs"].to_numpy(zero_copy_only=False),
            table["topk_ids"].to_numpy(zero_copy_only=False),
            strict=True,
        ):
            self.rows[(kind, doc_id)] = (np.array(logp, dtype=np.float32), None if ids is None else np.array(ids))

    def token_logprobs(self, kind: str, batch: Batch) -> Tensor:
        """(B, T) reference log-probs at the batch's answer positions, 0 elsewhere."""
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        for b, doc_id in enumerate(batch.doc_ids):
            out[b][batch.answer_mask[b]] = torch.from_numpy(self.rows[(kind, doc_id)][0])
        return out

    def topk(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(B, T, k) reference top-k log-probs and token ids at the batch's answer positions."""
        rows = [self.rows[("retain", doc_id)] for doc_id in batch.doc_ids]
        k = len(rows[0][0]) // int(batch.answer_mask[0].sum())  # KL_TOP_K, or the vocabulary size if smaller
        logp = torch.zeros((*batch.input_ids.shape, k))
        ids = torch.zeros((*batch.input_ids.shape, k), dtype=torch.long)
        for b, (values, top_ids) in enumerate(rows):
            logp[b][batch.answer_mask[b]] = torch.from_numpy(values).view(-1, k)
            ids[b][batch.answer_mask[b]] = torch.from_numpy(top_ids.astype(np.int64)).view(-1, k)
        return logp, ids

    def hidden(self, batch: Batch, layer: int) -> Tensor:
        """(B, T, d) output of decoder layer `layer` at the batch's answer positions, 0 elsewhere."""
        rows = [self.rows[(hidden_kind(layer), doc_id)][0] for doc_id in batch.doc_ids]
        d = len(rows[0]) // int(batch.answer_mask[0].sum())
        out = torch.zeros((*batch.input_ids.shape, d))
        for b, values in enumerate(rows):
            out[b][batch.answer_mask[b]] = torch.from_numpy(values).view(-1, d)
        return out

    def logits(self, batch: Batch) -> Tensor:
        raise ValueError(
            "undial distils from the frozen model's full logits on forget tokens, which ref_logprobs.parquet does "
            "not keep (V floats per token); set unlearn.reference=model"
        )


class ModelReference:
    """The frozen target kept in memory: the values of Reference, computed on each batch as it comes."""

    def __init__(self, model):
        self.model = model.eval().requires_grad_(False)
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def _logits(self, batch: Batch) -> tuple[Tensor, Tensor]:
        ids = batch.input_ids.to(self.device)
        return self.model(input_ids=ids, attention_mask=batch.attention_mask.to(self.device)).logits.float(), ids

    def logits(self, batch: Batch) -> Tensor:
        return self._logits(batch)[0]

    @torch.no_grad()
    def hidden(self, batch: Batch, layer: int) -> Tensor:
        with layer_output(self.model, layer) as hidden:
            self._logits(batch)
        return hidden[0].float().masked_fill(~batch.answer_mask.to(self.device).unsqueeze(-1), 0.0)

    def token_logprobs(self, kind: str, batch: Batch) -> Tensor:
        logits, ids = self._logits(batch)
        return token_logprobs(logits, ids).masked_fill(~batch.answer_mask.to(self.device), 0.0)

    def topk(self, batch: Batch) -> tuple[Tensor, Tensor]:
        logits, _ = self._logits(batch)
        top_logp, top_ids = torch.log_softmax(logits[:, :-1], dim=-1).topk(min(KL_TOP_K, logits.shape[-1]), dim=-1)
        outside = ~batch.answer_mask.to(self.device).unsqueeze(-1)  # row t-1 predicts position t, as in the table
        return (F.pad(top_logp, (0, 0, 1, 0)).masked_fill(outside, 0.0),
                F.pad(top_ids, (0, 0, 1, 0)).masked_fill(outside, 0))
