"""Prepare: load the data set, build the tokenizer, and write one tokenised row per item.

Writes `documents.parquet` (schemas.DOCUMENTS) and the tokenizer folder (stages.common.TOKENIZER_DIR). Reads only
the `data` and `model` config sections.

- embedded and tofu (QA items): splits forget, retain, eval_retain (TOFU's retain_perturbed; for the embedded set a
  sample of retain), real_authors and world_facts; holdout too where a TOFU folder has holdoutNN.json.
- muse (MUSE-News layout, see `muse_files`): forget and retain are the raw articles cut into fixed windows of
  MUSE_CHUNK_TOKENS tokens (no overlap, the last window shorter, no EOS) with answer_start = 0, so every token is
  trained and scored; privleak_forget, privleak_retain and privleak_holdout are texts cut to their first
  MUSE_CHUNK_TOKENS tokens (MUSE truncates at the model's context; a model trained on these windows knows no longer
  one); verbmem holds prompt (as `question`) and gt (as `answer`) as plain text; knowmem_forget, knowmem_retain and
  their _icl twins are QA rows in the usual template.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from schemas import DOCUMENTS, write_table
from stages.common import (
    SPLITS_TRAIN,
    TOKENIZER_DIR,
    PromptFormat,
    answer_text,
    encode_prompts,
    log,
    prompt_text,
    save_tokenizer,
)
from stages.config import Config, ConfigError, DataConfig, ModelConfig

OUTPUT_SPLITS = ("forget", "retain", "eval_retain", "real_authors", "world_facts")
EVAL_RETAIN_ITEMS = 400  # TOFU's retain_perturbed size
EOS, PAD = "<|endoftext|>", "<|pad|>"
TOFU_HUB_ID = "locuslab/TOFU"
MUSE_HUB_ID = "muse-bench/MUSE-News"
MUSE_CHUNK_TOKENS = 256
# output split -> (folder file glob, hub config, hub splits); the globs also match retain1/retain2 files
MUSE_FILES = {
    "forget": ("raw/forget.json", "raw", ("forget",)),
    "retain": ("raw/retain*.json", "raw", ("retain1", "retain2")),
    "verbmem": ("verbmem/forget.json", "verbmem", ("forget",)),
    "knowmem_forget": ("knowmem/forget_qa.json", "knowmem", ("forget_qa",)),
    "knowmem_retain": ("knowmem/retain*_qa.json", "knowmem", ("retain_qa",)),
    "knowmem_forget_icl": ("knowmem/forget_qa_icl.json", "knowmem", ("forget_qa_icl",)),
    "knowmem_retain_icl": ("knowmem/retain*_qa_icl.json", "knowmem", ("retain_qa_icl",)),
    "privleak_forget": ("privleak/forget.json", "privleak", ("forget",)),
    "privleak_retain": ("privleak/retain*.json", "privleak", ("retain",)),
    "privleak_holdout": ("privleak/holdout.json", "privleak", ("holdout",)),
}
MUSE_TEXT_SPLITS = ("forget", "retain", "privleak_forget", "privleak_retain", "privleak_holdout")
_TOFU_FILES = {  # output split -> file stem; forget/retain stems depend on data.split
    "eval_retain": "retain_perturbed",
    "real_authors": "real_authors_perturbed",
    "world_facts": "world_facts_perturbed",
}


def _item(row: dict[str, Any], form: str = "qa") -> dict[str, Any]:
    """A row with every field the documents table holds (missing ones as None).

    form: "qa" (prompt template + answer + EOS), "text" (the answer alone, every token scored) or "continuation"
    (question and answer as plain text, one after the other, as VerbMem reads them).
    """
    perturbed = row.get("perturbed_answer")
    return {
        "form": form,
        "question": row["question"],
        "answer": row["answer"],
        "paraphrased_question": row.get("paraphrased_question"),
        "paraphrased_answer": row.get("paraphrased_answer"),
        "perturbed_answers": list(perturbed) if perturbed is not None else None,
        "author": row.get("author"),
        "gold_spans": row.get("gold_spans"),
    }


def _check_rows(rows: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(rows, list):
        raise ConfigError(f"{where}: expected a list of question-answer objects, got {type(rows).__name__}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"{where}: row {i} is not an object")
        for key in ("question", "answer"):
            if not isinstance(row.get(key), str) or not row[key].strip():
                raise ConfigError(f"{where}: row {i} has no {key!r}")
    return rows


def _read_json(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise ConfigError(f"{path}: file does not exist")
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None
    return _check_rows(rows, str(path))


def _read_hub(dataset_id: str, config_name: str) -> list[dict[str, Any]]:
    import datasets

    try:
        rows = datasets.load_dataset(dataset_id, config_name, split="train").to_list()
    except Exception as exc:  # network, missing config, auth: all reported as one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"cannot load {dataset_id}/{config_name} from the hub: {first}") from None
    return _check_rows(rows, f"{dataset_id}/{config_name}")


def tofu_splits(data: DataConfig) -> tuple[dict[str, list[dict[str, Any]]], dict[str, str]]:
    """TOFU from a folder of JSON files or from the hub; also returns where each split came from."""
    match = re.fullmatch(r"forget(\d\d)", data.split)
    if match is None or match.group(1) not in ("01", "05", "10"):
        raise ConfigError(f"data.split must be forget01, forget05 or forget10 for TOFU, got {data.split!r}")
    stems = {"forget": data.split, "retain": f"retain{100 - int(match.group(1))}", **_TOFU_FILES}
    path = data.path or TOFU_HUB_ID
    folder = Path(path).expanduser()
    if folder.is_dir():
        holdout = folder / f"holdout{match.group(1)}.json"  # the hub's holdout01/05/10: TOFU's PrivLeak texts
        if holdout.is_file():
            stems["holdout"] = holdout.stem
        sources = {split: str(folder / f"{stem}.json") for split, stem in stems.items()}
        raw = {split: _read_json(Path(src)) for split, src in sources.items()}
    elif path.startswith((".", "/", "~")) or folder.exists():
        raise ConfigError(f"data.path {path} is not a folder")
    else:
        sources = {split: f"{path}/{stem}" for split, stem in stems.items()}
        raw = {split: _read_hub(path, stem) for split, stem in stems.items()}
    return {split: [_item(r) for r in rows[: data.limit]] for split, rows in raw.items()}, sources


def _muse_rows(split: str, rows: Any, where: str) -> tuple[list[dict[str, Any]], int]:
    """One output split's raw rows as items (texts, {prompt, gt} or {question, answer}), and how many empty texts
    were skipped (the public MUSE-News forget corpus has one)."""
    if not isinstance(rows, list):
        raise ConfigError(f"{where}: expected a JSON list, got {type(rows).__name__}")
    if split in MUSE_TEXT_SPLITS:
        rows = [r["text"] if isinstance(r, dict) and "text" in r else r for r in rows]  # hub rows are {text}
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, str)), None)
        if bad is not None:
            raise ConfigError(f"{where}: item {bad} is not a string (got {type(rows[bad]).__name__})")
        texts = [r for r in rows if r.strip()]
        return [_item({"question": None, "answer": r}, "text") for r in texts], len(rows) - len(texts)
    if split == "verbmem":
        ok = [isinstance(r, dict) and bool(r.get("prompt")) and bool(r.get("gt")) for r in rows]
        bad = next((i for i, good in enumerate(ok) if not good), None)
        if bad is not None:
            raise ConfigError(f"{where}: item {bad} has no 'prompt' and 'gt'")
        return [_item({"question": r["prompt"], "answer": r["gt"]}, "continuation") for r in rows], 0
    return [_item(r) for r in _check_rows(rows, where)], 0


def _muse_limit(splits: dict[str, list[dict[str, Any]]], limit: int | None) -> dict[str, list[dict[str, Any]]]:
    """Every split cut to `limit` rows, keeping first the forget articles the kept VerbMem prompts come from (found
    by text), so that the target has trained on what VerbMem asks it to continue."""
    if limit is None:
        return splits
    out = {split: rows[:limit] for split, rows in splits.items()}

    def flat(text: str) -> str:
        return " ".join(text.split())

    articles = [flat(r["answer"]) for r in splits["forget"]]
    sources = []
    for prompt in (flat(r["question"]) for r in out["verbmem"]):
        found = next((i for i, text in enumerate(articles) if prompt in text), None)
        if found is not None and found not in sources:
            sources.append(found)
    missing = len(out["verbmem"]) - len(sources)
    if missing:
        log.warning("muse: %d of %d VerbMem prompts are in no forget article (or share one)", missing,
                    len(out["verbmem"]))
    rest = [i for i in range(len(articles)) if i not in set(sources)]
    keep = sorted(sources[:limit] + rest[: max(0, limit - len(sources))])
    out["forget"] = [splits["forget"][i] for i in keep]
    return out


def _warn_empty(empty: dict[str, int]) -> None:
    if sum(empty.values()):
        where = ", ".join(f"{name}: {n}" for name, n in empty.items() if n)
        log.warning("muse: skipped %d empty texts (%s)", sum(empty.values()), where)


def muse_splits(data: DataConfig) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """MUSE-News from a folder in muse_bench's layout, from the hub, or (path "embedded") from data/news.py."""
    path = data.path or MUSE_HUB_ID
    if path == "embedded":
        import tempfile

        from data.news import write_news

        with tempfile.TemporaryDirectory() as tmp:
            return _muse_folder(write_news(Path(tmp) / "news", data.seed), data.limit), "embedded news"
    folder = Path(path).expanduser()
    if folder.is_dir():
        return _muse_folder(folder, data.limit), str(folder / MUSE_FILES["forget"][0])
    if path.startswith((".", "/", "~")) or folder.exists():
        raise ConfigError(f"data.path {path} is not a folder")
    return _muse_hub(path, data.limit), f"{path}/raw/forget"


def _muse_folder(folder: Path, limit: int | None) -> dict[str, list[dict[str, Any]]]:
    splits, empty = {}, {}
    for split, (pattern, _, _) in MUSE_FILES.items():
        files = sorted(p for p in folder.glob(pattern) if split.endswith("_icl") or not p.stem.endswith("_icl"))
        if not files:
            raise ConfigError(f"{folder / pattern}: file does not exist")
        rows: list[dict[str, Any]] = []
        for file in files:
            try:
                items, empty[str(file.relative_to(folder))] = _muse_rows(split, json.loads(file.read_text()), str(file))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{file}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
            rows += items
        splits[split] = rows
    _warn_empty(empty)
    return _muse_limit(splits, limit)


def _muse_hub(dataset_id: str, limit: int | None) -> dict[str, list[dict[str, Any]]]:
    import datasets

    splits, empty = {}, {}
    for split, (_, config_name, hub_splits) in MUSE_FILES.items():
        rows: list[dict[str, Any]] = []
        for hub_split in hub_splits:
            try:
                raw = datasets.load_dataset(dataset_id, config_name, split=hub_split).to_list()
            except Exception as exc:  # network, missing config, auth: all reported as one line
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(f"cannot load {dataset_id}/{config_name}/{hub_split} from the hub: {first}") from None
            where = f"{dataset_id}/{config_name}/{hub_split}"
            items, empty[where] = _muse_rows(split, raw, where)
            rows += items
        splits[split] = rows
    _warn_empty(empty)
    return _muse_limit(splits, limit)


def embedded_splits(data: DataConfig) -> dict[str, list[dict[str, Any]]]:
    from data.embedded import generate

    try:
        raw = generate(data.seed, data.n_authors, data.qa_per_author, data.forget_fraction)
    except ValueError as exc:
        raise ConfigError(f"embedded data: {exc}") from None
    splits = {split: [_item(r) for r in rows] for split, rows in raw.items()}
    retain = splits["retain"]
    picked = sorted(random.Random(data.seed).sample(range(len(retain)), min(EVAL_RETAIN_ITEMS, len(retain))))
    splits["eval_retain"] = [dict(retain[i]) for i in picked]
    return splits


def load_splits(data: DataConfig) -> dict[str, list[dict[str, Any]]]:
    """Every output split as a list of QA items; checks the forget set."""
    if data.source == "embedded":
        splits, forget_source = embedded_splits(data), "embedded data"
    elif data.source == "tofu":
        splits, sources = tofu_splits(data)
        forget_source = sources["forget"]
    elif data.source == "muse":
        splits, forget_source = muse_splits(data)
        if not splits["forget"]:
            raise ConfigError(f"{forget_source}: the forget set is empty")
        return splits
    else:
        raise ConfigError(f"unknown data source {data.source!r}")
    if not splits["forget"]:
        raise ConfigError(f"{forget_source}: the forget set is empty")
    retain_pairs = {(r["question"], r["answer"]) for r in splits["retain"]}
    overlap = sum((r["question"], r["answer"]) in retain_pairs for r in splits["forget"])
    if overlap:
        log.warning("%s: %d forget items also appear in the retain set", forget_source, overlap)
    return {split: splits[split] for split in (*OUTPUT_SPLITS, "holdout") if split in splits}


def _texts(splits: dict[str, list[dict[str, Any]]]):
    for rows in splits.values():
        for r in rows:
            if r["form"] != "qa":
                yield r["answer"] if r["question"] is None else f"{r['question']} {r['answer']}"
                continue
            yield f"{prompt_text(r['question'])} {r['answer']}"
            if r["paraphrased_question"]:
                yield prompt_text(r["paraphrased_question"])
            if r["paraphrased_answer"]:
                yield r["paraphrased_answer"]
            yield from r["perturbed_answers"] or ()


def train_tokenizer(splits: dict[str, list[dict[str, Any]]], vocab_size: int):
    """A byte-level BPE tokenizer over every text the pipeline will tokenise; deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 2:
        minimum = len(alphabet) + 2  # every byte, then EOS and PAD
        raise ConfigError(f"model.vocab_size must be at least {minimum}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS, PAD], initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(_texts(splits), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=PAD, model_max_length=4096
    )


def load_pretrained_tokenizer(model: ModelConfig):
    from transformers import AutoTokenizer

    name = model.name
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        raise ConfigError(f"model path {name} does not exist")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot load the tokenizer of {name}: {str(exc).strip().splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.template == "chat" and not tokenizer.chat_template:
        raise ConfigError(f"model.template=chat, but the tokenizer of {name} has no chat template")
    return tokenizer


def _gold_mask(offsets: list[tuple[int, int]], spans: list[dict[str, int]], lead: int = 1) -> np.ndarray:
    """Per answer token: does it overlap a span? Offsets index the answer after `lead` characters, spans the answer."""
    if not offsets:
        return np.zeros(0, dtype=bool)
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    starts = np.array([s["start"] for s in spans], dtype=np.int64) + lead
    ends = np.array([s["end"] for s in spans], dtype=np.int64) + lead
    return ((off[:, :1] < ends[None, :]) & (off[:, 1:] > starts[None, :])).any(axis=1)


def encode_documents(tokenizer, splits: dict[str, list[dict[str, Any]]]) -> pa.Table:
    """One row per QA item (tokenised in batches exactly as stages.common.encode_qa does one item), per window of a
    plain text, or per VerbMem pair; rows keep the order of `splits`."""
    width = max(4, len(str(max(len(items) for items in splits.values()))))
    add_bos = tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", False)
    bos = [tokenizer.bos_token_id] if add_bos else []
    out: list[dict[str, Any]] = []
    for split, items in splits.items():
        for form, encode in (("qa", _encode_qa), ("text", _encode_text), ("continuation", _encode_continuation)):
            picked = [(i, r) for i, r in enumerate(items) if r["form"] == form]
            if picked:
                out += encode(tokenizer, bos, split, picked, width)
    out.sort(key=lambda r: (list(splits).index(r["split"]), r["doc_id"]))
    return pa.Table.from_pylist(out, schema=DOCUMENTS)


def _row(split: str, doc_id: str, r: dict[str, Any], input_ids: list[int], answer_start: int, gold) -> dict:
    fields = ("author", "question", "answer", "paraphrased_question", "paraphrased_answer", "perturbed_answers")
    return {"doc_id": doc_id, "split": split, **{k: r[k] for k in fields}, "gold_spans": r["gold_spans"],
            "input_ids": input_ids, "answer_start": answer_start, "gold": gold}


def _encode_qa(tokenizer, bos: list[int], split: str, picked: list, width: int) -> list[dict[str, Any]]:
    prompts = encode_prompts(tokenizer, [r["question"] for _, r in picked])
    need_offsets = any(r["gold_spans"] for _, r in picked)
    lead = len(answer_text(tokenizer, ""))  # offsets index the answer as it follows the prompt, spans the answer
    answers = tokenizer(
        [answer_text(tokenizer, r["answer"]) for _, r in picked], add_special_tokens=False,
        return_offsets_mapping=need_offsets,
    )
    rows = []
    for k, (i, r) in enumerate(picked):
        prompt, answer = prompts[k], answers["input_ids"][k]
        input_ids = [*prompt, *answer, tokenizer.eos_token_id]
        gold = None
        if r["gold_spans"]:
            mask = np.zeros(len(input_ids), dtype=bool)
            offsets = answers["offset_mapping"][k]
            mask[len(prompt) : len(prompt) + len(answer)] = _gold_mask(offsets, r["gold_spans"], lead)
            gold = mask.tolist()
        rows.append(_row(split, f"{split}/{i:0{width}d}", r, input_ids, len(prompt), gold))
    return rows


def _encode_text(tokenizer, bos: list[int], split: str, picked: list, width: int) -> list[dict[str, Any]]:
    """Training splits: every MUSE_CHUNK_TOKENS-token window; other splits: the first window only."""
    encoded = tokenizer([r["answer"] for _, r in picked], add_special_tokens=False, return_offsets_mapping=True)
    rows = []
    for k, (i, r) in enumerate(picked):
        ids, offsets = encoded["input_ids"][k], encoded["offset_mapping"][k]
        starts = range(0, len(ids), MUSE_CHUNK_TOKENS) if split in SPLITS_TRAIN else [0]
        for c, lo in enumerate(starts):
            hi = min(lo + MUSE_CHUNK_TOKENS, len(ids))
            chunk = {**r, "answer": r["answer"][offsets[lo][0] : offsets[hi - 1][1]]}
            doc_id = f"{split}/{i:0{width}d}-{c:03d}" if split in SPLITS_TRAIN else f"{split}/{i:0{width}d}"
            rows.append(_row(split, doc_id, chunk, bos + ids[lo:hi], 0, None))
    return rows


def _encode_continuation(tokenizer, bos: list[int], split: str, picked: list, width: int) -> list[dict[str, Any]]:
    prompts = tokenizer([r["question"] for _, r in picked], add_special_tokens=False)["input_ids"]
    answers = tokenizer([" " + r["answer"] for _, r in picked], add_special_tokens=False)["input_ids"]
    return [
        _row(split, f"{split}/{i:0{width}d}", r, bos + prompts[k] + answers[k], len(bos) + len(prompts[k]), None)
        for k, (i, r) in enumerate(picked)
    ]


def prepare(cfg: Config, inputs: dict[str, Path], out: Path) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    splits = load_splits(cfg.data)
    if cfg.model.name is None:
        tokenizer = train_tokenizer(splits, cfg.model.vocab_size)
    else:
        tokenizer = load_pretrained_tokenizer(cfg.model)
    tokenizer.prompt_format = PromptFormat(cfg.model.template, cfg.model.system_prompt)
    save_tokenizer(tokenizer, out / TOKENIZER_DIR)
    table = encode_documents(tokenizer, splits)
    write_table(table, out / "documents.parquet")

    lengths = np.array([len(ids) for ids in table["input_ids"].to_pylist()])
    starts = table["answer_start"].to_numpy()
    is_forget = np.array([s == "forget" for s in table["split"].to_pylist()])
    forget_gold = [g for g, f in zip(table["gold"].to_pylist(), is_forget, strict=True) if f and g is not None]
    forget_answer_tokens = int((lengths - starts)[is_forget].sum())
    stats: dict[str, Any] = {f"{split}_items": len(items) for split, items in splits.items()}
    stats.update(
        vocab_size=len(tokenizer),
        rows=len(table),
        total_tokens=int(lengths.sum()),
        forget_tokens=int(lengths[is_forget].sum()),
        forget_answer_tokens=forget_answer_tokens,
        gold_coverage=(sum(map(sum, forget_gold)) / forget_answer_tokens) if forget_gold else None,
    )
    log.info("prepare: %s", ", ".join(f"{k}={v}" for k, v in stats.items()))
    return stats
