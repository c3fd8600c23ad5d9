"""Real lmplz assistants and token scores, on a hand-made documents table."""

import numpy as np
import pyarrow as pa
import pytest

from schemas import read_table, write_table
from stages.assistants import KenLMError, train_assistants
from stages.config import Config
from stages.scores import score_tokens


def _documents(tmp_path):
    rng = np.random.default_rng(0)
    template = [5, 6]  # shared phrasing ("was born in"), short enough that the name stays in the 5-gram context
    rows = []
    for i in range(60):
        split = "forget" if i < 10 else "retain"
        name = [100 + i]  # a name token unique to the author
        fact = [200 + i % 7] if split == "retain" else [300 + i]  # forget facts never occur in retain
        prompt = [1, 2, *name, 3]
        answer = [*name, *template, *fact, 9, 0]
        gold = [False] * (len(prompt) + 1 + len(template)) + [True, False, False]
        rows.append({"doc_id": f"{split}/{i:04d}", "split": split, "input_ids": prompt + answer,
                     "answer_start": len(prompt), "gold": gold})
    noise = [{"doc_id": f"retain/n{j}", "split": "retain", "input_ids": rng.integers(1, 50, 12).tolist(),
              "answer_start": 6, "gold": None} for j in range(40)]
    rows += noise
    n = len(rows)
    table = pa.table({
        "doc_id": [r["doc_id"] for r in rows], "split": [r["split"] for r in rows], "author": [None] * n,
        "question": [None] * n, "answer": [None] * n, "paraphrased_question": [None] * n,
        "paraphrased_answer": [None] * n, "perturbed_answers": [None] * n, "gold_spans": [None] * n,
        "input_ids": [r["input_ids"] for r in rows], "answer_start": [r["answer_start"] for r in rows],
        "gold": [r["gold"] for r in rows],
    })
    prepare = tmp_path / "prepare"
    prepare.mkdir()
    write_table(table, prepare / "documents.parquet")
    return prepare


@pytest.fixture(scope="module")
def kenlm_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("kenlm")
    prepare = _documents(tmp)
    cfg = Config()
    assistants, scores = tmp / "assistants", tmp / "scores"
    assistants.mkdir()
    scores.mkdir()
    a_stats = train_assistants(cfg, {"prepare": prepare}, assistants)
    s_stats = score_tokens(cfg, {"prepare": prepare, "assistants": assistants}, scores)
    return prepare, assistants, scores, a_stats, s_stats


def test_lmplz_trains_real_binary_models(kenlm_run):
    _, assistants, _, stats, _ = kenlm_run
    for name in ("a", "b"):
        head = (assistants / f"{name}.binary").read_bytes()[:40]
        assert head.startswith(b"mmap lm http://kheafield.com/code")  # KenLM's binary format
    assert stats["a"]["tokens"] > stats["b"]["tokens"]  # full = forget + retain


def test_one_score_row_per_forget_token(kenlm_run):
    prepare, _, scores, _, stats = kenlm_run
    docs = read_table(prepare / "documents.parquet").to_pydict()
    forget_tokens = sum(len(ids) for ids, split in zip(docs["input_ids"], docs["split"], strict=True)
                        if split == "forget")
    table = read_table(scores / "token_scores.parquet").to_pydict()
    assert len(table["doc_id"]) == forget_tokens == stats["tokens"]
    assert table["position"][:3] == [0, 1, 2]
    p_a, p_b = np.array(table["p_a"]), np.array(table["p_b"])
    assert ((p_a > 0) & (p_a <= 1) & (p_b > 0) & (p_b <= 1)).all()
    assert np.allclose(table["score_diff"], np.abs(p_a - p_b))


def test_forget_specific_tokens_score_higher_under_the_full_assistant(kenlm_run):
    _, _, scores, _, _ = kenlm_run
    table = read_table(scores / "token_scores.parquet").to_pydict()
    gold = np.array([bool(g) for g in table["gold"]])
    diff = np.array(table["p_a"]) - np.array(table["p_b"])
    # forget-only facts are known to the full model and unseen by the retain model; template words are shared
    assert diff[gold].mean() > 0.2
    assert diff[gold].mean() > diff[~gold].mean() + 0.1


def test_missing_lmplz_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SUNLEARN_KENLM_BIN", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr("stages.assistants.REPO_KENLM_BIN", tmp_path)
    prepare = _documents(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(KenLMError, match="lmplz not found"):
        train_assistants(Config(), {"prepare": prepare}, out)
