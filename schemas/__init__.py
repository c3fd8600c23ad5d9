"""The contract between stages: one pyarrow schema per Parquet artifact, an atomic writer and a validating reader.

A reader never trusts a file: `read_table` checks every required column and its type, and raises SchemaError
naming the file and the column.
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


class SchemaError(ValueError):
    """A Parquet artifact that does not match its schema."""


_span = pa.struct([("start", pa.int32()), ("end", pa.int32())])

DOCUMENTS = pa.schema(
    [
        ("doc_id", pa.string()),
        ("split", pa.string()),  # forget | retain | eval_retain | real_authors | world_facts | holdout | ...
        ("author", pa.string()),
        ("question", pa.string()),
        ("answer", pa.string()),
        ("paraphrased_question", pa.string()),
        ("paraphrased_answer", pa.string()),
        ("perturbed_answers", pa.list_(pa.string())),
        ("gold_spans", pa.list_(_span)),  # character spans of author-specific words in `answer`; null if unknown
        ("input_ids", pa.list_(pa.int32())),  # prompt tokens, then answer tokens, then EOS
        ("answer_start", pa.int32()),  # first answer position; answer tokens run to the end (EOS included)
        ("gold", pa.list_(pa.bool_())),  # per token: inside a gold span; null if the data set has none
    ]
)

TOKEN_SCORES = pa.schema(
    [
        ("doc_id", pa.string()),
        ("position", pa.int32()),
        ("token_id", pa.int32()),
        ("p_a", pa.float64()),  # P(token | context) under assistant A (trained on the full split)
        ("p_b", pa.float64()),  # under assistant B (retain or forget split)
        ("score_diff", pa.float64()),  # |p_a - p_b|
        ("in_answer", pa.bool_()),
        ("gold", pa.bool_()),  # null where the data set has no gold spans
    ]
)

MASKS = pa.schema(
    [
        ("doc_id", pa.string()),
        ("position", pa.int32()),
        ("selected", pa.bool_()),
        ("seed", pa.bool_()),  # above gamma before widening
        ("in_answer", pa.bool_()),
        ("gold", pa.bool_()),
    ]
)

MASK_DOC_STATS = pa.schema(
    [
        ("doc_id", pa.string()),
        ("answer_tokens", pa.int64()),
        ("selected_tokens", pa.int64()),
        ("selected_fraction", pa.float64()),
    ]
)

TRAIN_LOG = pa.schema(
    [
        ("model", pa.string()),
        ("step", pa.int64()),
        ("epoch", pa.int64()),
        ("loss", pa.float64()),
        ("forget_loss", pa.float64()),
        ("retain_loss", pa.float64()),
        ("lr", pa.float64()),
        ("seconds", pa.float64()),
    ]
)

METRICS = pa.schema(
    [
        ("model", pa.string()),
        ("step", pa.int64()),  # unlearning steps behind the weights: 0 for target and retain, k for a snapshot
        ("metric", pa.string()),
        ("value", pa.float64()),
    ]
)

# long, so that a new metric needs no schema change: one row per (model, step, eval set, item, value name)
ITEM_SCORES = pa.schema(
    [
        ("model", pa.string()),
        ("step", pa.int64()),
        ("split", pa.string()),  # the eval set
        ("doc_id", pa.string()),
        ("item", pa.string()),  # the per-item value's name (stages/evaluate: ItemValue.name), e.g. rouge
        ("value", pa.float64()),  # null for text values
        ("text", pa.string()),  # a text value (the greedy generation); null otherwise
    ]
)

REF_LOGPROBS = pa.schema(
    [
        ("doc_id", pa.string()),
        ("kind", pa.string()),  # forget | idk | retain
        ("logprob_sum", pa.float64()),
        ("token_logprobs", pa.list_(pa.float32())),  # per answer token; kind retain: top-k per token, flattened
        ("topk_ids", pa.list_(pa.int32())),  # kind retain: token ids of token_logprobs; null otherwise
    ]
)

SWEEP_METRICS = pa.schema(
    [
        ("point", pa.int64()),  # index of the grid point
        ("params", pa.string()),  # the grid point's key=value settings, as JSON
        ("model", pa.string()),
        ("step", pa.int64()),
        ("metric", pa.string()),
        ("value", pa.float64()),
    ]
)

SCHEMAS: dict[str, pa.Schema] = {
    "sweep_metrics.parquet": SWEEP_METRICS,
    "documents.parquet": DOCUMENTS,
    "token_scores.parquet": TOKEN_SCORES,
    "masks.parquet": MASKS,
    "mask_doc_stats.parquet": MASK_DOC_STATS,
    "train_log.parquet": TRAIN_LOG,
    "metrics.parquet": METRICS,
    "item_scores.parquet": ITEM_SCORES,
    "ref_logprobs.parquet": REF_LOGPROBS,
}


def schema_for(path: str | Path) -> pa.Schema:
    name = Path(path).name
    if name not in SCHEMAS:
        raise SchemaError(f"{path}: no schema registered for {name!r}")
    return SCHEMAS[name]


def write_table(table: pa.Table, path: str | Path) -> None:
    """Cast to the registered schema and write atomically (temp file, then rename)."""
    path = Path(path)
    schema = schema_for(path)
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise SchemaError(f"{path}: missing column {missing[0]!r}")
    table = table.select(schema.names).cast(schema)
    tmp = path.with_name(f".tmp-{path.name}.{uuid.uuid4().hex[:8]}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, payload: Any) -> None:
    """A JSON file written as write_table writes Parquet: a temp file, then a rename."""
    path = Path(path)
    tmp = path.with_name(f".tmp-{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    """Read a Parquet artifact after checking it against its schema."""
    path = Path(path)
    schema = schema_for(path)
    if not path.is_file():
        raise SchemaError(f"{path}: file does not exist")
    try:
        actual = pq.read_schema(path)
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise SchemaError(f"{path}: not a readable Parquet file ({exc})") from None
    for expected in schema:
        if expected.name not in actual.names:
            raise SchemaError(f"{path}: missing column {expected.name!r}")
        got = actual.field(expected.name).type
        if not got.equals(expected.type):
            raise SchemaError(f"{path}: column {expected.name!r} has type {got}, expected {expected.type}")
    try:
        return pq.read_table(path, columns=columns)
    except Exception as exc:
        raise SchemaError(f"{path}: cannot read ({exc})") from None
