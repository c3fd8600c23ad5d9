"""`python -m bench --quick`: every benchmark runs at toy size and writes its ratios; no assertion on wall time."""

import json
import subprocess
import sys

import numpy as np
import pytest

from bench.corpus import write_documents
from bench.masks import python_masks
from schemas import read_table
from stages.masks import answer_segments, widen

RATIOS = {"scoring_vs_llm", "scoring_vs_raw_kenlm", "masks_vs_python_10m", "su_vs_graddiff_step", "rerun_vs_cold",
          "memory_logprobs_vs_model", "memory_lora_vs_full", "sweep_parallel_2_vs_1", "snapshot_eval_floor",
          "sweep_points_2_vs_1"}


def test_synthetic_corpus_passes_the_documents_schema(tmp_path):
    stats = write_documents(tmp_path, 5_000)
    docs = read_table(tmp_path / "documents.parquet")
    forget = docs.filter(docs["split"].to_numpy(zero_copy_only=False) == "forget")
    assert sum(len(ids) for ids in forget["input_ids"].to_pylist()) == 5_000
    assert stats["forget_documents"] == len(forget)


def test_fact_word_tokens_lie_inside_the_gold_spans(prepared_micro):
    """bench.selection's TOFU truth, on the embedded set: fact words are gold-span words minus the question's (the
    author's name), so their tokens are gold tokens, and fewer of them; only a fact word repeated outside the spans
    (a "the" of a title) marks a token that is not gold."""
    import pyarrow as pa

    from bench.selection import fact_word_tokens
    from stages.common import load_documents
    from stages.scores import flat_token_table

    docs = load_documents(prepared_micro, ("forget",))
    flat = flat_token_table(docs)
    doc_ids = docs["doc_id"].take(pa.array(flat["doc_index"])).to_pylist()
    facts = fact_word_tokens(prepared_micro, doc_ids, flat["position"])
    known = ~np.isnan(facts)
    assert known.any() and not (known & ~flat["in_answer"] & (facts == 1)).any()  # prompts hold no fact
    assert (flat["gold"][known & (facts == 1)] == 1).mean() > 0.95
    assert 0 < (facts == 1).sum() < (flat["gold"][known] == 1).sum()


def test_python_loop_matches_the_vectorised_masks():
    rng = np.random.default_rng(0)
    doc = np.repeat(np.arange(50), rng.integers(1, 30, 50))
    in_answer = np.concatenate([np.arange(k) >= rng.integers(0, k) for k in np.bincount(doc)])
    diff = rng.random(len(doc))
    starts = np.flatnonzero(np.diff(doc, prepend=-1))
    expected = widen((diff > 0.7) & in_answer, answer_segments(starts, in_answer), 2)
    seed, selected = python_masks([str(d) for d in doc], diff.tolist(), in_answer.tolist(), 0.7, 2)
    assert selected == expected.tolist()
    assert seed == ((diff > 0.7) & in_answer).tolist()


@pytest.mark.slow
def test_quick_bench_writes_every_ratio(tmp_path):
    out = tmp_path / "results.json"
    # a guard against a hang, not a speed check: the smoke run takes about 380 s on 2 idle cores, and over 600 s
    # when another job shares them
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert RATIOS <= set(results["ratios"])
    assert all(v > 0 for v in results["ratios"].values())
    assert results["benches"]["masks"]["identical"]
    assert results["benches"]["sweep_parallel"]["tables_equal"] and results["benches"]["sweep_points"]["tables_equal"]
    assert results["quick"] and results["machine"]["cores"] >= 1
    assert "| benchmark |" in results["table"]


def test_snapshot_eval_counts_nan_items_as_equal_and_still_catches_a_changed_value():
    from bench.bench_eval import same_values

    nan = float("nan")
    assert same_values([0.5, nan], [0.5, nan])  # fact recall of an item without gold words is NaN on both sides
    assert not same_values([0.5, nan], [0.25, nan])
    assert same_values(["Gabriela"], ["Gabriela"]) and not same_values(["Gabriela"], ["Carrasco"])


def test_the_evaluation_floor_counts_each_scored_prompt_once_and_the_head_only_where_a_token_is_read():
    """Work.flops: layers on every token the model must see, the LM head only on scored answers and generated tokens.
    A model of 10 linear weights, 4 of them the head; 3 prompt + 5 answer scored tokens, 2 + 1 generation tokens."""
    from bench.bench_eval import Work

    work = Work(scored_prompts=3, scored_answers=5, generation_prompts=2, generated=1)
    assert work.flops(linear=10, head=4) == 2 * (6 * (3 + 5 + 2 + 1) + 4 * (5 + 1))


def test_counted_work_sees_every_scored_and_generated_token_and_restores_the_suites(prepared_micro, trained_micro):
    """One micro evaluation counted: answers scored, prompts scored once per distinct prompt (fewer than the sequences'
    prompts), every generation within its budget; the scoring and generation functions are the originals after."""
    from bench.bench_eval import counted_work
    from stages import scoring
    from stages.common import load_documents, load_model, load_tokenizer
    from stages.config import load_config
    from stages.evaluate.stage import eval_sets

    cfg = load_config("micro", overrides=["evaluate.max_new_tokens=4"])
    tokenizer, model = load_tokenizer(prepared_micro), load_model(trained_micro / "target").eval()
    sets = eval_sets(load_documents(prepared_micro).to_pylist(), cfg)
    originals = scoring.score_sequences, scoring.greedy_tokens
    work = counted_work(model, tokenizer, sets)
    assert (scoring.score_sequences, scoring.greedy_tokens) == originals
    rows = sum(len(s.rows) for s in sets.values())
    assert work.scored_answers > work.scored_prompts > 0
    assert rows <= work.generated <= 4 * rows and work.generation_prompts > rows
