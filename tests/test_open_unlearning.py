"""Differential test: open-unlearning's TOFU formulas, re-implemented here from its sources (src/evals/metrics/
memorization.py, utils.py, src/data/utils.py) and docs/metrics.md without calling stages/, against the evaluate
stage's per-item values and aggregates on a tiny target and retain model trained until they answer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from rouge_score import rouge_scorer
from scipy.stats import hmean, ks_2samp

IGNORE = -100
TOL = 1e-6
# eval set -> (metric prefix, the "correct" answer of the truth ratio, probability normalised over the options)
SETS = {
    "forget": ("forget", "paraphrased_answer", False),
    "eval_retain": ("retain", "paraphrased_answer", False),
    "real_authors": ("ra", "answer", True),
    "world_facts": ("wf", "answer", True),
}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> dict[str, Path]:
    """prepare → target (target and retain models, trained long enough to answer) → evaluate, micro data."""
    from stages.config import load_config
    from stages.evaluate import evaluate
    from stages.prepare import prepare
    from stages.target import train_target

    cfg = load_config("micro", overrides=["target.epochs=40", "target.hidden_size=64", "target.intermediate_size=128"])
    cfg.unlearn.methods = []  # the target and retain models are the models compared
    root = tmp_path_factory.mktemp("open_unlearning")
    dirs = {name: root / name for name in ("prepare", "target", "unlearn", "evaluate")}
    prepare(cfg, {}, dirs["prepare"])
    train_target(cfg, {"prepare": dirs["prepare"]}, dirs["target"])
    dirs["unlearn"].mkdir()
    evaluate(cfg, {k: dirs[k] for k in ("prepare", "target", "unlearn")}, dirs["evaluate"])
    return {**dirs, "max_new_tokens": cfg.evaluate.max_new_tokens}


def _instance(tokenizer, question: str, answer: str) -> tuple[list[int], list[int]]:
    """open-unlearning's preprocess_chat_instance without a chat template, with this project's tags: the prompt
    "Question: {q}\\nAnswer:" and the answer after one space (its own "Answer: " tag would mask the first answer
    token, docs/metrics.md); EOS appended; labels IGNORE over the prompt."""
    prompt = f"Question: {question}\nAnswer:"
    ids = tokenizer(prompt + " " + answer, add_special_tokens=True)["input_ids"]
    prompt_len = len(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if ids[-1] != tokenizer.eos_token_id:
        ids = [*ids, tokenizer.eos_token_id]
    return ids, [IGNORE] * prompt_len + ids[prompt_len:]


class OpenUnlearning:
    """One model's per-item values, computed as open-unlearning computes them, one item at a time."""

    def __init__(self, model_dir: Path, tokenizer, max_new_tokens: int):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.rouge = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)

    @torch.no_grad()
    def _pass(self, question: str, answer: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels = _instance(self.tokenizer, question, answer)
        logits = self.model(input_ids=torch.tensor([ids])).logits[0].double()
        return logits, torch.tensor(labels)

    def avg_loss(self, question: str, answer: str) -> float:
        """evaluate_probability: summed CE over labelled positions / their count."""
        logits, labels = self._pass(question, answer)
        ce = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=IGNORE, reduction="sum")
        return float(ce / (labels != IGNORE).sum())

    def memorisation(self, question: str, answer: str) -> tuple[float, float]:
        """tokenwise_vocab_logprobs (labelled positions, the last one, EOS, dropped), then EM and ES's suffix loop."""
        logits, labels = self._pass(question, answer)
        log_probs = torch.log_softmax(logits, -1)[:-1]
        actual = (labels != IGNORE).nonzero(as_tuple=True)[0][:-1]
        start, end = int(actual[0]), int(actual[-1])
        preds = log_probs[start - 1 : end].argmax(-1)
        gold = labels[actual]
        valid = len(gold)
        em = float((preds == gold).sum() / valid)
        for k in range(valid):
            if torch.equal(preds[k:], gold[k:]):
                break
        return em, 1 - k / valid

    @torch.no_grad()
    def generation(self, question: str) -> str:
        """eval_text_similarity: greedy generation from the prompt, decoded without special tokens, stripped."""
        prompt = self.tokenizer(f"Question: {question}\nAnswer:", add_special_tokens=True)["input_ids"]
        out = self.model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                  max_new_tokens=self.max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.eos_token_id)
        return self.tokenizer.decode(out[0, len(prompt):], skip_special_tokens=True).strip()

    def items(self, rows: list[dict], correct: str, normalised: bool) -> dict[str, np.ndarray | list[str]]:
        prob, truth_ratio, rouge, em, es, texts = [], [], [], [], [], []
        for r in rows:
            answer_loss = self.avg_loss(r["question"], r["answer"])
            wrong = np.array([self.avg_loss(r["question"], p) for p in r["perturbed_answers"]])
            correct_loss = self.avg_loss(r["question"], r[correct])
            if normalised:  # probability_w_options
                p_correct, p_wrong = math.exp(-answer_loss), np.exp(-wrong).sum()
                prob.append(p_correct / (p_correct + p_wrong + 1e-10))
            else:
                prob.append(math.exp(-answer_loss))
            truth_ratio.append(math.exp(-wrong.mean()) / (math.exp(-correct_loss) + 1e-10))
            text = self.generation(r["question"])
            texts.append(text)
            rouge.append(self.rouge.score(r["answer"], text)["rougeL"].recall)
            m, s = self.memorisation(r["question"], r["answer"])
            em.append(m)
            es.append(s)
        return {"prob": np.array(prob), "truth_ratio": np.array(truth_ratio), "rouge": np.array(rouge),
                "exact_memorization": np.array(em), "extraction_strength": np.array(es), "generation": texts}


def _closer_to_1(tr: np.ndarray) -> float:
    return float(np.mean(np.minimum(tr, 1 / (tr + 1e-10))))


def _true_better(tr: np.ndarray) -> float:
    return float(np.mean(np.maximum(0, 1 - tr)))


def test_every_tofu_metric_matches_open_unlearning(run):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run["prepare"] / "tokenizer")
    documents = pq.read_table(run["prepare"] / "documents.parquet").to_pylist()
    items = pq.read_table(run["evaluate"] / "item_scores.parquet").to_pylist()
    metrics = {(r["model"], r["metric"]): r["value"]
               for r in pq.read_table(run["evaluate"] / "metrics.parquet").to_pylist()}
    ours: dict[tuple[str, str, str], dict[str, float | str]] = {}
    for r in items:
        ours.setdefault((r["model"], r["split"], r["item"]), {})[r["doc_id"]] = r["text"] or r["value"]

    truth_ratios: dict[str, np.ndarray] = {}
    worst = 0.0
    for model in ("target", "retain"):
        theirs = OpenUnlearning(run["target"] / model, tokenizer, run["max_new_tokens"])
        expected: dict[str, float] = {}
        for split, (prefix, correct, normalised) in SETS.items():
            rows = [r for r in documents if r["split"] == split]
            assert rows, split
            values = theirs.items(rows, correct, normalised)
            doc_ids = [r["doc_id"] for r in rows]
            assert [ours[(model, split, "generation")][d] for d in doc_ids] == values["generation"], (model, split)
            names = ("prob", "truth_ratio", "rouge") + (("exact_memorization", "extraction_strength")
                                                        if split == "forget" else ())
            for name in names:
                got = np.array([ours[(model, split, name)][d] for d in doc_ids])
                np.testing.assert_allclose(got, values[name], rtol=TOL, atol=TOL, err_msg=f"{model} {split} {name}")
                worst = max(worst, float(np.max(np.abs(got - values[name]))))
            tr = values["truth_ratio"]
            expected[f"{prefix}_prob"] = float(np.mean(values["prob"]))
            expected[f"{prefix}_rouge"] = float(np.mean(values["rouge"]))
            expected[f"{prefix}_truth_ratio"] = _closer_to_1(tr) if split == "forget" else _true_better(tr)
            if split == "forget":
                truth_ratios[model] = tr
                expected["exact_memorization"] = float(np.mean(values["exact_memorization"]))
                expected["extraction_strength"] = float(np.mean(values["extraction_strength"]))
        expected["model_utility"] = float(hmean([expected[f"{p}_{m}"] for p in ("retain", "ra", "wf")
                                                 for m in ("prob", "rouge", "truth_ratio")]))
        for name, value in expected.items():
            assert metrics[(model, name)] == pytest.approx(value, rel=TOL, abs=TOL), (model, name)
            worst = max(worst, abs(metrics[(model, name)] - value))
        assert expected["model_utility"] > 0.3, "the tiny model must answer for ROUGE and utility to mean anything"
    for model in ("target", "retain"):  # get_forget_quality: KS on 1/TR, against the retain model
        pvalue = ks_2samp(1 / (truth_ratios[model] + 1e-10), 1 / (truth_ratios["retain"] + 1e-10)).pvalue
        assert metrics[(model, "forget_quality")] == pytest.approx(pvalue, rel=TOL, abs=TOL), model
    print(f"largest difference from open-unlearning: {worst:.2e}")
