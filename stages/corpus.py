"""The `files` source: a user's own documents or QA pairs, and the ids of those to forget.

`data.path` is a JSONL, JSON (a list of objects) or Parquet file, a folder of them (every such file under it, in
name order), or a hub dataset id (its `train` split at `data.revision`). Each record has an id (`data.id_field`) and
either a document (`data.text_field`) or a question and an answer (`data.question_field`, `data.answer_field`).
`data.forget_ids` lists the ids to forget, one per line (blank lines and lines starting with `#` are skipped); every
other record is retain. Optional eval sets: `data.holdout` (documents never trained on, for PrivLeak) and
`data.utility` (QA pairs the model should keep answering). Bad records and unknown ids stop the run with one line.

Output splits: forget and retain (documents cut into windows, QA pairs in the prompt template), doc_verbmem (each
forget document cut after its first words: prompt and continuation), doc_holdout and doc_utility.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.config import ConfigError, DataConfig

RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
VERBMEM_PROMPT_WORDS = 32  # at most this many words of a forget document prompt VerbMem; at most half of them
SHOWN_IDS = 5  # valid ids an unknown-id error names


@dataclass
class Record:
    id: str
    text: str | None
    question: str | None
    answer: str | None
    where: str  # "file:line" or "file record N"


@dataclass
class Problems:
    """Bad records of one input, by kind: the count and where the first one is."""

    source: str
    kinds: dict[str, list[str]] = field(default_factory=dict)

    def add(self, kind: str, where: str) -> None:
        self.kinds.setdefault(kind, []).append(where)

    def raise_if_any(self) -> None:
        if not self.kinds:
            return
        total = sum(len(w) for w in self.kinds.values())
        parts = [f"{len(w)} {kind} (first: {w[0]})" for kind, w in self.kinds.items()]
        raise ConfigError(f"{self.source}: {total} bad record{'s' * (total != 1)}: {'; '.join(parts)}")


def is_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).expanduser().exists()


def record_files(path: str) -> list[Path]:
    """The record files of a local `data.path`, `data.holdout` or `data.utility`."""
    local = Path(path).expanduser()
    if local.is_file():
        return [local]
    if not local.is_dir():
        raise ConfigError(f"{path} does not exist")
    files = sorted(p for p in local.rglob("*") if p.is_file() and p.suffix in RECORD_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(local).parts))
    if not files:
        raise ConfigError(f"{path}: no {', '.join(RECORD_SUFFIXES)} files in the folder")
    return files


def input_files(data: DataConfig) -> list[Path]:
    """Every local file the files source reads: the records, the forget list and the eval sets."""
    files = record_files(data.path) if data.path and is_local(data.path) else []
    files += [Path(data.forget_ids).expanduser()] if data.forget_ids else []
    for extra in (data.holdout, data.utility):
        files += record_files(extra) if extra else []
    return files


def _raw_records(path: str, revision: str | None) -> Iterator[tuple[Any, str]]:
    """(raw record, where) for every record of a local path or a hub dataset, in order."""
    if not is_local(path):
        for i, row in enumerate(_hub_rows(path, revision)):
            yield row, f"{path} record {i}"
        return
    for file in record_files(path):
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            for i, row in enumerate(pq.read_table(file).to_pylist()):
                yield row, f"{file} record {i}"
        elif file.suffix == ".json":
            try:
                rows = json.loads(file.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(f"{file}: not valid JSON ({exc})") from None
            if not isinstance(rows, list):
                raise ConfigError(f"{file}: expected a JSON list of records, got {type(rows).__name__}")
            for i, row in enumerate(rows):
                yield row, f"{file} record {i}"
        else:
            with open(file, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():  # blank lines are skipped (docs/forget-requests.md says so)
                        try:
                            yield json.loads(line), f"{file}:{n}"
                        except json.JSONDecodeError:
                            yield None, f"{file}:{n}"


def _hub_rows(dataset_id: str, revision: str | None) -> list[dict[str, Any]]:
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split="train", revision=revision).to_list()
    except Exception as exc:  # network, missing split, auth: all reported as one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load {dataset_id} from the hub: {first}") from None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def read_records(path: str, data: DataConfig, revision: str | None = None) -> list[Record]:
    """Every record of `path`, checked: each bad one is counted by kind, and any makes one error line."""
    problems = Problems(path)
    records: list[Record] = []
    seen: dict[str, str] = {}
    for raw, where in _raw_records(path, revision):
        if not isinstance(raw, dict):
            problems.add("not a JSON object", where)
            continue
        rid = raw.get(data.id_field)
        if isinstance(rid, int) and not isinstance(rid, bool):
            rid = str(rid)
        if not isinstance(rid, str) or not rid.strip():
            problems.add(f"without {data.id_field!r}", where)
            continue
        rid = rid.strip()
        if rid in seen:
            problems.add("duplicate ids", f"{rid!r} at {seen[rid]} and {where}")
            continue
        seen[rid] = where
        text = raw.get(data.text_field)
        question, answer = _text(raw.get(data.question_field)), _text(raw.get(data.answer_field))
        if data.text_field in raw:
            if not isinstance(text, str) or not text.strip():
                problems.add(f"empty {data.text_field!r}", where)
                continue
            records.append(Record(rid, text, None, None, where))
        elif question is not None and answer is not None:
            if not question.strip() or not answer.strip():
                problems.add(f"empty {data.question_field!r} or {data.answer_field!r}", where)
                continue
            records.append(Record(rid, None, question, answer, where))
        else:
            problems.add(f"without {data.text_field!r} or {data.question_field!r} + {data.answer_field!r}", where)
    problems.raise_if_any()
    return records


def read_forget_ids(path: str | Path) -> list[tuple[str, int]]:
    """(id, line number) of every request, first occurrence only."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"data.forget_ids {path}: cannot read ({exc})") from None
    ids: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        rid = line.strip()
        if rid and not rid.startswith("#"):
            ids.setdefault(rid, n)
    return list(ids.items())


def _row(rid: str, question: str | None, answer: str, form: str) -> dict[str, Any]:
    """An item with every field the documents table holds, as stages.prepare builds them."""
    return {"form": form, "question": question, "answer": answer, "paraphrased_question": None,
            "paraphrased_answer": None, "perturbed_answers": None, "author": None, "gold_spans": None, "id": rid}


def _item(record: Record) -> dict[str, Any]:
    if record.text is not None:
        return _row(record.id, None, record.text, "text")
    return _row(record.id, record.question, record.answer or "", "qa")


def verbmem_item(record: Record) -> dict[str, Any] | None:
    """The document cut after its first words (at most VERBMEM_PROMPT_WORDS, at most half): prompt and truth."""
    text = record.text or ""
    words = list(re.finditer(r"\S+", text))
    k = min(VERBMEM_PROMPT_WORDS, len(words) // 2)
    if k == 0:
        return None
    return _row(record.id, text[: words[k - 1].end()], text[words[k].start() :], "continuation")


def _eval_records(path: str, data: DataConfig, kind: str, key: str) -> list[Record]:
    records = read_records(path, data)
    wrong = [r for r in records if (r.text is None) == (kind == "documents")]
    if wrong:
        raise ConfigError(f"data.{key} {path}: {len(wrong)} records are not {kind} (first: {wrong[0].where})")
    return records


def files_splits(data: DataConfig, revision: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """forget, retain, doc_verbmem, doc_holdout and doc_utility (the last three only where they have items);
    `revision` is the hub commit the fingerprint resolved."""
    assert data.path and data.forget_ids  # validate() checks both
    records = read_records(data.path, data, revision)
    requests = read_forget_ids(data.forget_ids)
    known = {r.id for r in records}
    unknown = [(rid, n) for rid, n in requests if rid not in known]
    if unknown:
        rid, n = unknown[0]
        shown = ", ".join(repr(r.id) for r in records[:SHOWN_IDS])
        more = f" ({len(unknown)} unknown ids in all)" if len(unknown) > 1 else ""
        raise ConfigError(f"data.forget_ids {data.forget_ids} line {n}: unknown id {rid!r}{more}; "
                          f"valid ids include {shown}")
    forget_ids = {rid for rid, _ in requests}
    forget = [r for r in records if r.id in forget_ids]
    if len(forget) == len(records):
        raise ConfigError(f"data.forget_ids {data.forget_ids} lists every record of {data.path}: nothing to retain")
    splits = {
        "forget": [_item(r) for r in forget],
        "retain": [_item(r) for r in records if r.id not in forget_ids],
        "doc_verbmem": [v for r in forget if r.text is not None and (v := verbmem_item(r)) is not None],
        "doc_holdout": [_item(r) for r in _eval_records(data.holdout, data, "documents", "holdout")]
        if data.holdout else [],
        "doc_utility": [_item(r) for r in _eval_records(data.utility, data, "QA pairs", "utility")]
        if data.utility else [],
    }
    return {split: items for split, items in splits.items() if items or split in ("forget", "retain")}
