"""The muse source on a tiny MUSE-News-layout folder, and the MUSE suite end to end on models trained on it."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import pytest

from data.news import news_files, write_news
from schemas import read_table
from stages.config import ConfigError, load_config
from stages.evaluate import MUSE_METRICS, TOFU_METRICS, evaluate
from stages.prepare import MUSE_CHUNK_TOKENS, prepare

SMALL = [
    "model.vocab_size=384",
    "target.hidden_size=32",
    "target.num_layers=2",
    "target.num_heads=2",
    "target.intermediate_size=64",
    "target.epochs=3",
    "evaluate.max_new_tokens=8",
]


@pytest.fixture(scope="module")
def news(tmp_path_factory) -> Path:
    return write_news(tmp_path_factory.mktemp("news") / "news", seed=0)


@pytest.fixture(scope="module")
def muse_cfg(news):
    return load_config("muse", overrides=[f"data.path={news}", *SMALL])


@pytest.fixture(scope="module")
def prepared(muse_cfg, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("muse_prepare")
    prepare(muse_cfg, {}, out)
    return out


def test_news_folder_has_the_muse_layout(news):
    files = sorted(str(p.relative_to(news)) for p in news.rglob("*.json"))
    assert files == sorted(news_files(0))
    assert all(isinstance(t, str) for t in json.loads((news / "raw/forget.json").read_text()))
    assert set(json.loads((news / "verbmem/forget.json").read_text())[0]) == {"prompt", "gt"}
    assert set(json.loads((news / "knowmem/retain_qa_icl.json").read_text())[0]) == {"question", "answer"}
    assert news_files(0) == news_files(0) != news_files(1)


def test_muse_source_writes_every_split(prepared, news):
    docs = read_table(prepared / "documents.parquet").to_pylist()
    counts = collections.Counter(r["split"] for r in docs)
    files = news_files(0)
    assert counts["verbmem"] == len(files["verbmem/forget.json"])
    assert counts["knowmem_retain"] == len(files["knowmem/retain_qa.json"])
    assert counts["knowmem_forget_icl"] == len(files["knowmem/forget_qa_icl.json"])
    assert counts["privleak_holdout"] == len(files["privleak/holdout.json"])
    assert counts["retain"] >= len(files["raw/retain1.json"]) + len(files["raw/retain2.json"])  # both retain files
    for r in docs:
        if r["split"] in ("forget", "retain", "privleak_forget", "privleak_retain", "privleak_holdout"):
            assert r["answer_start"] == 0 and r["question"] is None  # every token trained and scored
            assert len(r["input_ids"]) <= MUSE_CHUNK_TOKENS
    assert not {"eval_retain", "real_authors", "world_facts"} & set(counts)


def test_long_articles_are_cut_into_windows(tmp_path):
    folder = write_news(tmp_path / "news", seed=0)
    long_text = " ".join(json.loads((folder / "raw/forget.json").read_text()) * 3)
    (folder / "raw/forget.json").write_text(json.dumps([long_text]))
    cfg = load_config("muse", overrides=[f"data.path={folder}", "data.limit=2", *SMALL])
    prepare(cfg, {}, tmp_path / "out")
    docs = read_table(tmp_path / "out/documents.parquet").to_pylist()
    chunks = [r for r in docs if r["split"] == "forget"]
    assert [r["doc_id"] for r in chunks] == [f"forget/0000-{c:03d}" for c in range(len(chunks))]
    assert len(chunks) > 1 and all(len(r["input_ids"]) == MUSE_CHUNK_TOKENS for r in chunks[:-1])
    assert sum(len(r["input_ids"]) for r in chunks) > 2 * MUSE_CHUNK_TOKENS
    counts = collections.Counter(r["split"] for r in docs)
    assert counts["knowmem_retain"] == counts["privleak_retain"] == 2  # data.limit caps each split


def test_muse_source_names_a_missing_file(tmp_path):
    folder = write_news(tmp_path / "news", seed=0)
    (folder / "knowmem/forget_qa.json").unlink()
    cfg = load_config("muse", overrides=[f"data.path={folder}", *SMALL])
    with pytest.raises(ConfigError, match="forget_qa.json"):
        prepare(cfg, {}, tmp_path / "out")


def test_muse_suite_runs_on_the_folder(muse_cfg, prepared, tmp_path):
    from stages.target import train_target

    target = tmp_path / "target"
    train_target(muse_cfg, {"prepare": prepared}, target)
    unlearn = tmp_path / "unlearn"
    unlearn.mkdir()
    for method in muse_cfg.unlearn.methods:
        (unlearn / method).symlink_to(target / "target", target_is_directory=True)
    out = tmp_path / "evaluate"
    stats = evaluate(muse_cfg, {"prepare": prepared, "target": target, "unlearn": unlearn}, out)
    assert stats["eval_sets"] == ["verbmem", "knowmem_forget", "knowmem_retain", "privleak_forget", "privleak_holdout"]
    values = {(r["model"], r["metric"]): r["value"] for r in read_table(out / "metrics.parquet").to_pylist()}
    models = ["target", "retain", *muse_cfg.unlearn.methods]
    assert set(values) == {(m, n) for m in models for n in MUSE_METRICS}  # no TOFU metric without TOFU splits
    assert not set(TOFU_METRICS) & {n for _, n in values}
    assert values[("retain", "privleak")] == pytest.approx(0.0)  # the retain model against itself
    for model in models:
        for name in ("verbmem_f", "knowmem_f", "knowmem_r"):
            assert 0.0 <= values[(model, name)] <= 1.0
        assert not math.isnan(values[(model, "privleak")])
    assert values[("su", "privleak")] == values[("target", "privleak")]  # same weights
    items = read_table(out / "item_scores.parquet").to_pylist()
    knowmem = [r["text"] for r in items if r["split"] == "knowmem_forget" and r["item"] == "generation"]
    assert knowmem and not any("\n\n" in text or "Question" in text for text in knowmem)
    min_k = [r["value"] for r in items if r["split"].startswith("privleak") and r["item"] == "min_k"]
    assert min_k and all(v > 0 for v in min_k)
    assert (out / "results.md").is_file() and (out / "pareto.png").is_file()
