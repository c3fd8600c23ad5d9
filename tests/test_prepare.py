"""Prepare: documents.parquet and the tokenizer, from the embedded set and from TOFU files; bad input fails clearly."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from data.embedded import generate
from schemas import read_table
from stages.common import encode_qa, load_tokenizer
from stages.config import ConfigError, load_config
from stages.prepare import embedded_splits, prepare, train_tokenizer

TOFU_DIR = Path(__file__).resolve().parents[2] / "shared/data/tofu"


@pytest.fixture(scope="module")
def docs(prepared_micro):
    return read_table(prepared_micro / "documents.parquet").to_pylist()


@pytest.fixture(scope="module")
def tokenizer(prepared_micro):
    return load_tokenizer(prepared_micro)


def test_documents_hold_every_split(docs, micro_cfg):
    d = micro_cfg.data
    raw = generate(d.seed, d.n_authors, d.qa_per_author, d.forget_fraction)
    counts = {
        s: sum(r["split"] == s for r in docs)
        for s in ("forget", "retain", "eval_retain", "real_authors", "world_facts")
    }
    assert counts == {
        "forget": len(raw["forget"]),
        "retain": len(raw["retain"]),
        "eval_retain": len(raw["retain"]),
        "real_authors": 20,
        "world_facts": 20,
    }
    assert len({r["doc_id"] for r in docs}) == len(docs)
    assert docs[0]["doc_id"] == "forget/0000"
    retain = {(r["question"], r["answer"]) for r in docs if r["split"] == "retain"}
    assert all((r["question"], r["answer"]) in retain for r in docs if r["split"] == "eval_retain")


def test_answer_start_splits_prompt_from_answer(docs, tokenizer):
    for r in docs:
        ids, start = r["input_ids"], r["answer_start"]
        assert (ids, start) == encode_qa(tokenizer, r["question"], r["answer"])
        assert ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[start:-1]) == " " + r["answer"]
        assert tokenizer.decode(ids[:start]).endswith("Answer:")


def test_gold_tokens_cover_exactly_the_gold_spans(docs, tokenizer):
    checked = 0
    for r in docs:
        if r["gold_spans"] is None:
            assert r["gold"] is None
            continue
        ids, gold = r["input_ids"], r["gold"]
        assert len(gold) == len(ids) and not any(gold[: r["answer_start"]]) and not gold[-1]
        words = [r["answer"][s["start"] : s["end"]] for s in r["gold_spans"]]
        gold_text = "".join(tokenizer.decode([t]) for t, g in zip(ids, gold, strict=True) if g)
        assert all(w in gold_text for w in words)  # every gold word is covered
        for t, g in zip(ids[r["answer_start"] : -1], gold[r["answer_start"] : -1], strict=True):
            if g:  # and every gold token lies inside a gold word
                assert any(tokenizer.decode([t]).strip() in w for w in words)
        assert not all(gold[r["answer_start"] : -1])  # template words stay out
        checked += 1
    assert checked > 0


def test_tokenizer_is_deterministic(micro_cfg):
    splits = embedded_splits(micro_cfg.data)
    a, b = train_tokenizer(splits, 300), train_tokenizer(splits, 300)
    assert a.get_vocab() == b.get_vocab() and len(a) == 300


def _tofu_cfg(path: Path, *extra: str):
    return load_config("micro", overrides=["data.source=tofu", f"data.path={path}", "model.vocab_size=300", *extra])


def test_tofu_folder_missing_file_names_it(tmp_path, tofu_folder):
    folder = tofu_folder(tmp_path / "tofu", [{"question": "Q?", "answer": "A."}])
    (folder / "retain90.json").unlink()
    with pytest.raises(ConfigError, match=r"retain90\.json: file does not exist"):
        prepare(_tofu_cfg(folder), {}, tmp_path / "out")


def test_tofu_row_without_answer_names_file_and_row(tmp_path, tofu_folder):
    folder = tofu_folder(tmp_path / "tofu", [{"question": "Q?", "answer": "A."}, {"question": "Q2?"}])
    with pytest.raises(ConfigError, match=r"forget10\.json: row 1 has no 'answer'"):
        prepare(_tofu_cfg(folder), {}, tmp_path / "out")


def test_tofu_bad_json_and_empty_forget(tmp_path, tofu_folder):
    folder = tofu_folder(tmp_path / "tofu", [])
    with pytest.raises(ConfigError, match=r"forget10\.json: the forget set is empty"):
        prepare(_tofu_cfg(folder), {}, tmp_path / "out")
    (folder / "forget10.json").write_text("[{")
    with pytest.raises(ConfigError, match=r"forget10\.json: not valid JSON"):
        prepare(_tofu_cfg(folder), {}, tmp_path / "out")


def test_forget_overlapping_retain_warns_and_continues(tmp_path, caplog, tofu_folder):
    row = {"question": "Q?", "answer": "A."}
    folder = tofu_folder(tmp_path / "tofu", [row], retain=[row, {"question": "R?", "answer": "B."}])
    with caplog.at_level(logging.WARNING, logger="sunlearn"):
        stats = prepare(_tofu_cfg(folder), {}, tmp_path / "out")
    assert "1 forget items also appear in the retain set" in caplog.text
    assert stats["forget_items"] == 1 and stats["gold_coverage"] is None


def test_missing_model_path_and_unbuilt_source(tmp_path, micro_cfg):
    cfg = load_config("micro")
    cfg.model.name = "./no-such-model"
    with pytest.raises(ConfigError, match="no-such-model does not exist"):
        prepare(cfg, {}, tmp_path / "out")
    cfg = load_config("micro", overrides=["data.source=muse"])
    with pytest.raises(ConfigError, match="muse"):
        prepare(cfg, {}, tmp_path / "out")


@pytest.mark.skipif(not TOFU_DIR.is_dir(), reason=f"no TOFU copy at {TOFU_DIR}")
def test_tofu_files_load_with_every_split(tmp_path):
    stats = prepare(_tofu_cfg(TOFU_DIR, "data.split=forget10"), {}, tmp_path / "out")
    assert {k: stats[f"{k}_items"] for k in ("forget", "retain", "eval_retain", "real_authors", "world_facts")} == {
        "forget": 400,
        "retain": 3600,
        "eval_retain": 400,
        "real_authors": 100,
        "world_facts": 117,
    }
    docs = read_table(tmp_path / "out/documents.parquet")
    first = docs.slice(0, 1).to_pylist()[0]
    assert first["doc_id"] == "forget/0000" and len(first["perturbed_answers"]) == 5
    assert first["paraphrased_answer"] and first["gold"] is None
    ra = docs.filter(docs["split"].to_numpy(zero_copy_only=False) == "real_authors").to_pylist()
    assert all(len(r["perturbed_answers"]) == 3 for r in ra)


@pytest.mark.skipif(not TOFU_DIR.is_dir(), reason=f"no TOFU copy at {TOFU_DIR}")
def test_tofu_limit_caps_every_split(tmp_path):
    stats = prepare(_tofu_cfg(TOFU_DIR, "data.split=forget01", "data.limit=7"), {}, tmp_path / "out")
    assert all(stats[f"{k}_items"] == 7 for k in ("forget", "retain", "eval_retain", "real_authors", "world_facts"))
