"""Batched scoring and generation against one-at-a-time runs, then the evaluate stage end to end, on tiny Llamas."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from schemas import DOCUMENTS, read_table, write_table
from stages.common import TOKENIZER_DIR, encode_qa
from stages.config import Config
from stages.evaluate import TOFU_METRICS, evaluate
from stages.reports import format_table
from stages.scoring import generate_greedy, prompt_ids, score_answers

AUTHORS = ["Ana Reyes", "Bo Lindqvist", "Chen Wei", "Dara Okafor", "Eli Moreau", "Femi Adeyemi"]
GENRES = ["mystery novels", "poetry", "science fiction", "historical drama", "fantasy sagas", "short stories"]
CITIES = ["Lisbon", "Oslo", "Shanghai", "Lagos", "Lyon", "Accra"]


def _qa(i: int) -> dict[str, object]:
    a, g, c = AUTHORS[i % 6], GENRES[i % 6], CITIES[(i * 5) % 6]
    others = [GENRES[(i + d) % 6] for d in range(1, 6)]
    return {
        "question": f"What does {a} write?" if i < 6 else f"Where was {a} born?",
        "answer": f"{a} writes {g}." if i < 6 else f"{a} was born in {c}.",
        "paraphrased_answer": f"{a} is known for {g}." if i < 6 else f"{a} comes from {c}.",
        "perturbed_answers": [f"{a} writes {o}." for o in others],
    }


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    corpus = [
        f"Question: {q['question']}\nAnswer: {q['answer']} {q['paraphrased_answer']}" for q in map(_qa, range(12))
    ]
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus, vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def _tiny_llama(tokenizer, seed: int, train_steps: int):
    """A 2-layer Llama; a few full-batch steps on the QA pairs so it emits EOS and generations differ in length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    if train_steps:
        encoded = [encode_qa(tokenizer, q["question"], q["answer"])[0] for q in map(_qa, range(12))]
        width = max(map(len, encoded))
        ids = torch.tensor([e + [tokenizer.pad_token_id] * (width - len(e)) for e in encoded])
        labels = torch.tensor([e + [-100] * (width - len(e)) for e in encoded])
        mask = (labels != -100).long()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1.5e-2)
        for _ in range(train_steps):
            model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return _tiny_llama(tokenizer, seed=0, train_steps=50)


def test_batched_scoring_equals_one_at_a_time(model, tokenizer):
    pairs = [(q["question"], a) for q in map(_qa, range(9)) for a in (q["answer"], q["perturbed_answers"][0])]
    batched = score_answers(model, tokenizer, pairs, batch_size=5)
    single = score_answers(model, tokenizer, pairs, batch_size=1)
    np.testing.assert_allclose(batched.nll_sum, single.nll_sum, atol=1e-5)
    np.testing.assert_array_equal(batched.n_tokens, single.n_tokens)
    for b, s in zip(batched.argmax_correct, single.argmax_correct, strict=True):
        np.testing.assert_array_equal(b, s)

    # independent check of one pair: answer tokens are ' ' + answer, then EOS
    question, answer = pairs[3]
    ids, start = encode_qa(tokenizer, question, answer)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
    targets = torch.tensor(ids[1:])
    expected = -logprobs[torch.arange(len(targets)), targets][start - 1 :].sum().item()
    assert batched.n_tokens[3] == len(ids) - start == len(tokenizer(" " + answer)["input_ids"]) + 1
    assert batched.nll_sum[3] == pytest.approx(expected, abs=1e-5)
    assert batched.nll_avg[3] == pytest.approx(expected / batched.n_tokens[3], abs=1e-6)


def test_batched_left_padded_generation_equals_one_at_a_time(model, tokenizer):
    prompts = [prompt_ids(tokenizer, q["question"]) for q in map(_qa, range(12))]
    prompts.append(prompt_ids(tokenizer, "Who?"))  # a much shorter prompt gets the most left padding
    assert len({len(p) for p in prompts}) > 1
    batched = generate_greedy(model, tokenizer, prompts, max_new_tokens=32, batch_size=13)
    single = [generate_greedy(model, tokenizer, [p], max_new_tokens=32, batch_size=1)[0] for p in prompts]
    assert batched == single
    assert len({len(t) for t in batched}) > 3  # rows finish at different steps
    assert generate_greedy(model, tokenizer, prompts, max_new_tokens=32, batch_size=4) == single
    assert not any("</s>" in t or "<pad>" in t for t in batched)


def test_generation_is_cut_at_eos(model, tokenizer):
    prompt = prompt_ids(tokenizer, _qa(0)["question"])
    with torch.no_grad():
        full = model.generate(
            input_ids=torch.tensor([prompt]), max_new_tokens=30, do_sample=False, pad_token_id=tokenizer.pad_token_id
        )[0, len(prompt) :].tolist()
    text = generate_greedy(model, tokenizer, [prompt], max_new_tokens=30, batch_size=1)[0]
    assert tokenizer.eos_token_id in full  # the trained model stops by itself
    full = full[: full.index(tokenizer.eos_token_id)]
    assert text == tokenizer.decode(full, skip_special_tokens=True).strip()


def _documents(tokenizer) -> pa.Table:
    rows = []
    splits = ["forget"] * 4 + ["retain"] * 8 + ["real_authors"] * 3 + ["world_facts"] * 3
    for i, split in enumerate(splits):
        q = _qa(i % 12)
        if split in ("real_authors", "world_facts"):
            q["perturbed_answers"] = q["perturbed_answers"][:3]
        ids, start = encode_qa(tokenizer, q["question"], q["answer"])
        rows.append(
            {
                "doc_id": f"{split}-{i}",
                "split": split,
                "author": AUTHORS[i % 6],
                "paraphrased_question": q["question"],
                "gold_spans": None,
                "input_ids": ids,
                "answer_start": start,
                "gold": None,
                **q,
            }
        )
    return pa.Table.from_pylist(rows, schema=DOCUMENTS)


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory, tokenizer, model) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluate_inputs")
    prepare, target, unlearn = root / "prepare", root / "target", root / "unlearn"
    prepare.mkdir()
    write_table(_documents(tokenizer), prepare / "documents.parquet")
    tokenizer.save_pretrained(prepare / TOKENIZER_DIR)
    model.save_pretrained(target / "target")
    _tiny_llama(tokenizer, seed=1, train_steps=20).save_pretrained(target / "retain")
    _tiny_llama(tokenizer, seed=2, train_steps=0).save_pretrained(unlearn / "su")
    _tiny_llama(tokenizer, seed=3, train_steps=10).save_pretrained(unlearn / "graddiff")
    return {"prepare": prepare, "target": target, "unlearn": unlearn}


def _config(methods: list[str]) -> Config:
    cfg = Config()
    cfg.unlearn.methods = methods
    cfg.evaluate.max_new_tokens = 8
    cfg.evaluate.batch_size = 4
    cfg.evaluate.retain_eval_items = 3  # no eval_retain rows: the first 3 retain rows stand in
    return cfg


def test_evaluate_on_micro_writes_every_metric_for_every_model(micro_cfg, prepared_micro, trained_micro, tmp_path):
    unlearn = tmp_path / "unlearn"
    unlearn.mkdir()
    for method in micro_cfg.unlearn.methods:  # stand-ins: the target itself under each method's name
        (unlearn / method).symlink_to(trained_micro / "target", target_is_directory=True)
    out = tmp_path / "evaluate"
    stats = evaluate(micro_cfg, {"prepare": prepared_micro, "target": trained_micro, "unlearn": unlearn}, out)
    models = ["target", "retain", *micro_cfg.unlearn.methods]
    assert stats["models"] == models
    assert set(stats["summary"]) == set(models)

    values = {(r["model"], r["metric"]): r["value"] for r in read_table(out / "metrics.parquet").to_pylist()}
    without_holdout = set(TOFU_METRICS) - {"tofu_privleak"}  # the embedded set has no holdout questions
    assert set(values) == {(m, n) for m in models for n in without_holdout}
    for (model, name), value in values.items():
        assert 0.0 <= value <= (math.inf if name.endswith("_nll") else 1.0), (model, name)
        assert value == values[("target", name)] or model in ("target", "retain")  # same weights, same numbers
    assert values[("retain", "forget_quality")] == pytest.approx(1.0)  # KS of a sample against itself
    assert stats["summary"]["target"]["model_utility"] == values[("target", "model_utility")]

    documents = read_table(prepared_micro / "documents.parquet", columns=["split"])["split"].to_pylist()
    sizes = {s: documents.count(s) for s in ("forget", "eval_retain", "real_authors", "world_facts")}
    assert all(sizes.values())
    items = [r for r in read_table(out / "item_scores.parquet").to_pylist() if r["item"] == "prob"]
    assert len(items) == len(models) * sum(sizes.values())
    forget_probs = [r["value"] for r in items if r["model"] == "retain" and r["split"] == "forget"]
    assert values[("retain", "forget_prob")] == pytest.approx(np.mean(forget_probs))

    lines = format_table(read_table(out / "metrics.parquet")).splitlines()
    assert lines[0].split()[:3] == ["model", "forget_quality", "model_utility"]
    assert [line.split()[0] for line in lines[2:]] == models


def test_evaluate_uses_first_retain_rows_without_eval_retain(stage_inputs, tmp_path):
    stats = evaluate(_config(["su"]), stage_inputs, tmp_path)
    assert stats["models"] == ["target", "retain", "su"]
    items = [r for r in read_table(tmp_path / "item_scores.parquet").to_pylist() if r["item"] == "prob"]
    retain_rows = [r["doc_id"] for r in items if r["model"] == "target" and r["split"] == "eval_retain"]
    assert retain_rows == ["retain-4", "retain-5", "retain-6"]
    # the target memorised its answers, the untrained "su" did not: generations and ROUGE are wired to the answer
    values = {(r["model"], r["metric"]): r["value"] for r in read_table(tmp_path / "metrics.parquet").to_pylist()}
    assert values[("target", "forget_rouge")] > 0.5 > values[("su", "forget_rouge")]
    assert values[("target", "forget_prob")] > values[("su", "forget_prob")]


def test_evaluate_without_retain_model_reports_nan_forget_quality(stage_inputs, tmp_path):
    target = tmp_path / "target_only"
    target.mkdir()
    (target / "target").symlink_to(stage_inputs["target"] / "target", target_is_directory=True)
    stats = evaluate(_config(["su"]), {**stage_inputs, "target": target}, tmp_path / "out")
    assert stats["models"] == ["target", "su"]
    assert all(math.isnan(s["forget_quality"]) for s in stats["summary"].values())
    assert not math.isnan(stats["summary"]["target"]["model_utility"])


def test_stop_strings_cut_generations_batched_as_one_at_a_time(model, tokenizer):
    from stages.scoring import cut_at

    prompts = [prompt_ids(tokenizer, q["question"]) for q in map(_qa, range(12))]
    full = generate_greedy(model, tokenizer, prompts, max_new_tokens=16, batch_size=12)
    stops = ("s", "\n\n")
    batched = generate_greedy(model, tokenizer, prompts, max_new_tokens=16, batch_size=12, stop_strings=stops)
    single = [generate_greedy(model, tokenizer, [p], 16, 1, stop_strings=stops)[0] for p in prompts]
    assert batched == single == [cut_at(text, stops) for text in full]
    assert any(len(b) < len(f) for b, f in zip(batched, full, strict=True))  # some rows did stop early
    assert cut_at("Paris\n\nQuestion: x", ("\n\n", "Question")) == "Paris"


def test_each_model_is_evaluated_once_per_eval_set(stage_inputs, tmp_path):
    import shutil

    from stages.evaluate.cache import context_key

    root = tmp_path / "artifacts"
    inputs = {}
    for name, path in stage_inputs.items():
        inputs[name] = root / name / "fingerprint"
        shutil.copytree(path, inputs[name])
    first = evaluate(_config(["su"]), inputs, tmp_path / "first", eval_cache=root / "eval_cache")
    assert first["cache_hits"] == 0
    second = evaluate(_config(["su", "graddiff"]), inputs, tmp_path / "second", eval_cache=root / "eval_cache")
    n_sets = len(second["eval_sets"])
    assert second["cache_hits"] == 3 * n_sets  # target, retain and su come from the cache; graddiff is new
    assert len(list((root / "eval_cache").iterdir())) == 4  # one folder per distinct set of weights

    def values(folder: Path) -> dict:
        return {(r["model"], r["metric"]): r["value"] for r in read_table(folder / "metrics.parquet").to_pylist()}

    a, b = values(tmp_path / "first"), values(tmp_path / "second")
    assert all(b[key] == value or math.isnan(value) for key, value in a.items())
    longer = _config(["su"])
    longer.evaluate.max_new_tokens = 9  # generation settings are part of the key
    assert context_key(inputs["prepare"], longer) != context_key(inputs["prepare"], _config(["su"]))


def test_fact_recall_counts_the_swapped_words(model, tokenizer):
    from stages.evaluate.stage import _items_for
    from stages.evaluate.tofu import FACT_RECALL, QA_SETS, fact_words, run_qa

    rows = [{**_qa(i), "doc_id": f"forget-{i}", "gold_spans": None} for i in range(4)]
    # the perturbed answers swap the genre, so the genre words are the facts ("mystery novels" -> mysteri, novel)
    assert fact_words(rows[0]) == ["mysteri", "novel"]
    # 24 new tokens: long enough to reach the genre at the end of the answer
    memorised = FACT_RECALL.fn(run_qa(model, tokenizer, rows, QA_SETS[0], max_new_tokens=24, batch_size=4))
    untrained_model = _tiny_llama(tokenizer, seed=2, train_steps=0)
    untrained = FACT_RECALL.fn(run_qa(untrained_model, tokenizer, rows, QA_SETS[0], max_new_tokens=24, batch_size=4))
    assert np.mean(memorised) > 0.5 > np.mean(untrained)
    forget_items = {i.name for i in _items_for("forget")}
    retain_items = {i.name for i in _items_for("eval_retain")}
    assert {"fact_recall", "exact_memorization", "extraction_strength"} <= forget_items
    assert "fact_recall" in retain_items and "exact_memorization" not in retain_items  # memorisation: forget only


def test_retain_model_log_stands_in_for_a_missing_retain_model(tmp_path):
    import json

    from stages.evaluate import summarise
    from stages.evaluate.retain_logs import read_retain_logs

    ratios = [0.2, 0.5, 0.9]
    log_file = tmp_path / "TOFU_EVAL.json"  # open-unlearning's format
    by_index = {str(i): {"score": r} for i, r in enumerate(ratios)}
    log_file.write_text(json.dumps({
        "forget_truth_ratio": {"agg_value": 0.5, "value_by_index": by_index},
        "mia_min_k": {"agg_value": 0.6},
    }))
    reference = read_retain_logs(log_file)
    np.testing.assert_allclose(reference["forget_truth_ratio"], ratios)
    assert reference["privleak_auc"] == 0.6

    forget = {"truth_ratio": np.array(ratios), "prob": np.ones(3), "rouge": np.ones(3),
              "fact_recall": np.ones(3), "exact_memorization": np.ones(3), "extraction_strength": np.ones(3),
              "fact_nll": np.ones(3), "template_nll": np.ones(3)}
    privleak = {"privleak_forget": {"min_k": np.array([1.0, 2.0])}, "privleak_holdout": {"min_k": np.array([1.5, 3.0])}}
    per_model = {("target", 0): {"forget": forget, **privleak}}
    sets = dict.fromkeys(["forget", "privleak_forget", "privleak_holdout"])
    values = summarise(per_model, sets, str(log_file))[("target", 0)]
    assert values["forget_quality"] == pytest.approx(1.0)  # the same truth ratios as the retain model's log
    # AUC 3/4 against the log's 0.6: ((0.25) - (0.4)) / 0.4 * 100
    assert values["privleak"] == pytest.approx(-37.5)
    assert math.isnan(summarise(per_model, sets)[("target", 0)]["forget_quality"])  # neither retain model nor log


def test_gold_nll_splits_answer_tokens_into_facts_and_template():
    from stages.evaluate.tofu import QAPasses, gold_nll

    rows = [{"answer_start": 2, "gold": [False, True, True, False, True, False]},  # answer: 4 tokens, EOS last
            {"answer_start": 1, "gold": None}]
    logprobs = [np.log(np.array([0.5, 0.25, 0.8, 0.9])), np.log(np.array([0.5, 0.5]))]
    passes = QAPasses(rows, np.zeros(2), np.zeros(2), np.zeros((2, 0)), [], logprobs, ["", ""])
    facts, template = gold_nll(passes, gold=True), gold_nll(passes, gold=False)
    assert facts[0] == pytest.approx(-(np.log(0.5) + np.log(0.8)) / 2)  # answer positions 0 and 2 are gold
    assert template[0] == pytest.approx(-np.log(0.25))  # position 1; EOS (position 3) counts for neither
    assert np.isnan(facts[1]) and np.isnan(template[1])  # no gold marked
