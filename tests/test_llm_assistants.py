"""LLM assistants: two tiny causal LMs on the same token_scores.parquet schema as KenLM."""

import copy

import numpy as np

from schemas import read_table
from stages.common import load_documents, load_model
from stages.llm_assistants import token_probabilities
from stages.scores import score_tokens


def test_llm_assistants_score_every_forget_token(micro_cfg, prepared_micro, tmp_path):
    from stages.assistants import train_assistants

    cfg = copy.deepcopy(micro_cfg)
    cfg.assistants.kind, cfg.assistants.llm_epochs = "llm", 2
    assistants, scores = tmp_path / "assistants", tmp_path / "scores"
    assistants.mkdir()
    scores.mkdir()
    stats = train_assistants(cfg, {"prepare": prepared_micro}, assistants)
    assert stats["kind"] == "llm" and stats["a"]["documents"] > stats["b"]["documents"]  # full vs retain
    score_tokens(cfg, {"prepare": prepared_micro, "assistants": assistants}, scores)

    forget = load_documents(prepared_micro, ("forget",))
    table = read_table(scores / "token_scores.parquet").to_pydict()
    assert len(table["doc_id"]) == sum(len(ids) for ids in forget["input_ids"].to_pylist())
    p_a, p_b = np.array(table["p_a"]), np.array(table["p_b"])
    assert ((p_a > 0) & (p_a <= 1) & (p_b > 0) & (p_b <= 1)).all()
    assert np.allclose(table["score_diff"], np.abs(p_a - p_b))

    # batched, padded scoring equals scoring one sequence at a time
    model = load_model(assistants / "a", "cpu").eval()
    sequences = forget["input_ids"].to_pylist()[:5]
    start = model.config.eos_token_id
    batched = token_probabilities(model, sequences, start, batch_size=5)
    single = np.concatenate([token_probabilities(model, [s], start, batch_size=1) for s in sequences])
    np.testing.assert_allclose(batched, single, rtol=1e-4, atol=1e-6)
