"""The shapes of the field's real files: MUSE-News with an empty article and VerbMem prompts from late articles,
and a TOFU folder with holdout questions (TOFU's PrivLeak, as open-unlearning's TOFU suite computes it)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from data.news import write_news
from schemas import read_table
from stages.config import ConfigError, load_config
from stages.evaluate import evaluate
from stages.prepare import prepare
from stages.target import train_target

SMALL = ["model.vocab_size=384", "target.hidden_size=64", "target.num_layers=2", "target.num_heads=2",
         "target.intermediate_size=128", "evaluate.max_new_tokens=24"]


def _real_like_news(folder: Path) -> Path:
    """MUSE-News's quirks on data/news.py's layout: an empty forget article, and VerbMem prompts taken from the
    last forget articles, so the first `data.limit` articles are not the ones VerbMem asks about."""
    write_news(folder, seed=0, n_forget=8, n_retain=8, n_holdout=4)
    forget = json.loads((folder / "raw/forget.json").read_text())
    (folder / "raw/forget.json").write_text(json.dumps([*forget[:2], "", *forget[2:]]))
    verbmem = json.loads((folder / "verbmem/forget.json").read_text())
    (folder / "verbmem/forget.json").write_text(json.dumps(verbmem[::-1]))
    return folder


def _run(cfg, root: Path) -> dict[tuple[str, str], float]:
    dirs = {name: root / name for name in ("prepare", "target", "unlearn", "evaluate")}
    prepare(cfg, {}, dirs["prepare"])
    train_target(cfg, {"prepare": dirs["prepare"]}, dirs["target"])
    cfg.unlearn.methods = []
    dirs["unlearn"].mkdir()
    evaluate(cfg, {k: dirs[k] for k in ("prepare", "target", "unlearn")}, dirs["evaluate"])
    return {(r["model"], r["metric"]): r["value"] for r in read_table(dirs["evaluate"] / "metrics.parquet").to_pylist()}


def test_muse_news_with_an_empty_article_runs_end_to_end(tmp_path, caplog):
    folder = _real_like_news(tmp_path / "news")
    # wide enough to memorise the three kept articles, so VerbMem separates the target from the retain model
    cfg = load_config("muse", overrides=[f"data.path={folder}", "data.limit=3", "target.epochs=40", *SMALL,
                                         "target.hidden_size=128", "target.intermediate_size=256", "target.lr=5e-3"])
    with caplog.at_level(logging.WARNING, logger="sunlearn"):
        values = _run(cfg, tmp_path)
    skipped = [r.getMessage() for r in caplog.records if "empty texts" in r.getMessage()]
    assert skipped == ["muse: skipped 1 empty texts (raw/forget.json: 1)"]

    docs = read_table(tmp_path / "prepare/documents.parquet").to_pylist()
    forget = " ".join(r["answer"] for r in docs if r["split"] == "forget")
    prompts = [r["question"] for r in docs if r["split"] == "verbmem"]
    assert len(prompts) == 3 and all(p in forget for p in prompts)  # the articles VerbMem continues were kept
    assert values[("target", "verbmem_f")] > values[("retain", "verbmem_f")] + 0.1
    assert all(math.isfinite(values[(m, "privleak")]) for m in ("target", "retain"))


def test_malformed_muse_text_fails_with_one_line(tmp_path):
    folder = write_news(tmp_path / "news", seed=0)
    (folder / "raw/forget.json").write_text(json.dumps(["an article", 7]))
    cfg = load_config("muse", overrides=[f"data.path={folder}", *SMALL])
    with pytest.raises(ConfigError, match=r"raw/forget.json: item 1 is not a string \(got int\)$"):
        prepare(cfg, {}, tmp_path / "out")


def _qa(i: int, who: str) -> dict:
    facts = ["Lisbon", "Oslo", "Lagos", "Lyon", "Accra", "Quito", "Hanoi", "Perth"]
    return {"question": f"Where was {who} {i} born?", "answer": f"{who} {i} was born in {facts[i % 8]}.",
            "paraphrased_answer": f"{who} {i} comes from {facts[i % 8]}.",
            "perturbed_answer": [f"{who} {i} comes from {facts[(i + d) % 8]}." for d in range(1, 4)]}


def test_tofu_holdout_file_gives_tofu_privleak(tmp_path, tofu_folder):
    # forget and holdout share the template, the name and the numbers' familiarity (the retain set has every number):
    # only having trained on the forget answers separates them, so the retain model's AUC stays away from 1
    folder = tofu_folder(tmp_path / "tofu", [_qa(i, "Forgotten Author") for i in range(0, 16, 2)],
                         [_qa(i, "Kept Author") for i in range(16)])
    holdout = [{"question": q["question"], "answer": q["answer"]}
               for q in (_qa(i, "Forgotten Author") for i in range(1, 16, 2))]
    (folder / "holdout10.json").write_text(json.dumps(holdout))
    cfg = load_config("tofu", overrides=[f"data.path={folder}", "target.epochs=30", "evaluate.retain_eval_items=4",
                                         *SMALL])
    values = _run(cfg, tmp_path)
    docs = read_table(tmp_path / "prepare/documents.parquet", columns=["split"])["split"].to_pylist()
    assert docs.count("holdout") == 8
    assert values[("retain", "tofu_privleak")] == pytest.approx(0.0)  # the retain model against itself
    # the target trained on the forget answers: it tells them from the holdout ones, unlike the retain model
    assert values[("target", "tofu_privleak")] < -10
    items = read_table(tmp_path / "evaluate/item_scores.parquet").to_pylist()
    assert {r["split"] for r in items if r["item"] == "min_k"} == {"forget", "holdout"}


def test_tofu_without_holdout_has_no_tofu_privleak(tmp_path, tofu_folder):
    folder = tofu_folder(tmp_path / "tofu", [_qa(i, "Forgotten Author") for i in range(2)])
    prepare(load_config("tofu", overrides=[f"data.path={folder}", *SMALL]), {}, tmp_path / "out")
    docs = read_table(tmp_path / "out/documents.parquet", columns=["split"])["split"].to_pylist()
    assert "holdout" not in docs
