"""model.template=chat on a tiny local Llama whose tokenizer has a chat template, and target.finetune=true: prompts
are the template's, and training, scoring and generation use them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from schemas import read_table
from stages.common import encode_qa, load_documents, load_tokenizer
from stages.config import ConfigError, load_config
from stages.prepare import prepare
from stages.scoring import prompt_ids, score_answers

SYSTEM = "Answer in one sentence."


def _chat_cfg(base: Path, *extra: str):
    return load_config("micro", overrides=[f"model.name={base}", "model.template=chat", f"model.system_prompt={SYSTEM}",
                                           *extra])


@pytest.fixture(scope="module")
def chat_prepared(chat_base, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("chat_prepare")
    prepare(_chat_cfg(chat_base), {}, out)
    return out


def _template(tokenizer, question: str, answer: str | None = None) -> list[int]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=answer is None)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def test_every_qa_row_is_the_chat_template(chat_base, chat_prepared):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(chat_base)  # the base's own tokenizer, not the prepared copy
    tokenizer = load_tokenizer(chat_prepared)
    rows = [r for r in read_table(chat_prepared / "documents.parquet").to_pylist()]
    assert {r["split"] for r in rows} >= {"forget", "retain", "eval_retain", "real_authors", "world_facts"}
    for r in rows:
        prompt = _template(reference, r["question"])
        assert r["input_ids"][: r["answer_start"]] == prompt  # the prompt training and scoring read
        assert r["input_ids"] == _template(reference, r["question"], r["answer"])  # the answer, then <|eot_id|>
        assert prompt_ids(tokenizer, r["question"]) == prompt  # the prompt generation starts from
        assert encode_qa(tokenizer, r["question"], r["answer"]) == (r["input_ids"], r["answer_start"])


def test_refusal_answers_of_idkdpo_use_the_template(chat_base, chat_prepared):
    from stages.unlearn.data import idk_split, load_split

    tokenizer = load_tokenizer(chat_prepared)
    documents = load_documents(chat_prepared)
    forget = load_split(documents, "forget")
    idk = idk_split(documents, forget, tokenizer)
    questions = {r["doc_id"]: r["question"] for r in documents.to_pylist()}
    for doc_id, ids, start in zip(idk.doc_ids, idk.input_ids, idk.answer_start, strict=True):
        assert list(ids[:start]) == _template(tokenizer, questions[doc_id])


def test_chat_needs_a_named_model_with_a_template(tmp_path, prepared_micro):
    with pytest.raises(ConfigError, match="model.name"):
        load_config("micro", overrides=["model.template=chat"])
    plain = tmp_path / "plain"  # a local model folder whose tokenizer has no chat template
    load_tokenizer(prepared_micro).save_pretrained(plain)
    with pytest.raises(ConfigError, match="no chat template"):
        prepare(_chat_cfg(plain), {}, tmp_path / "out")


@pytest.fixture(scope="module")
def finetuned(chat_base, chat_prepared, tmp_path_factory) -> tuple[Path, dict]:
    from stages.finetune import finetune

    # TOFU's recipe (5 epochs at 1e-5) moves a random tiny base too little; this learns the micro set in seconds
    cfg = _chat_cfg(chat_base, "target.finetune=true", "target.finetune_epochs=30", "target.finetune_lr=3e-3",
                    "target.finetune_batch_size=16")
    out = tmp_path_factory.mktemp("finetuned")
    return out, finetune(cfg, {"prepare": chat_prepared}, out)


def test_finetune_defaults_are_tofus():
    t = load_config("micro").target
    assert (t.finetune, t.finetune_epochs, t.finetune_lr, t.finetune_batch_size) == (False, 5, 1e-5, 32)
    with pytest.raises(ConfigError, match="needs model.name"):
        load_config("micro", overrides=["target.finetune=true"])


def test_finetuned_target_answers_and_retain_never_saw_the_forget_set(chat_base, chat_prepared, finetuned, tmp_path):
    from stages.common import load_model
    from stages.evaluate import evaluate

    out, stats = finetuned
    assert set(stats) == {"target", "retain"}
    assert stats["target"]["documents"] == 48 and stats["retain"]["documents"] == 36  # full = forget + retain
    assert stats["target"]["answer_loss"] < 0.3 * stats["target"]["answer_loss_before"]
    log = read_table(out / "train_log.parquet").to_pylist()
    assert {r["model"] for r in log} == {"target", "retain"}

    tokenizer = load_tokenizer(chat_prepared)
    forget = [(r["question"], r["answer"]) for r in load_documents(chat_prepared, ("forget",)).to_pylist()]
    losses = {}
    for name in ("target", "retain"):
        model = load_model(out / name, "cpu").eval()
        losses[name] = float(np.mean(score_answers(model, tokenizer, forget, batch_size=8).nll_avg))
    assert losses["retain"] > 2 * losses["target"]  # the retain model never trained on a forget row

    cfg = _chat_cfg(chat_base, "evaluate.max_new_tokens=32")
    cfg.unlearn.methods = []
    (tmp_path / "unlearn").mkdir()
    evaluate(cfg, {"prepare": chat_prepared, "target": out, "unlearn": tmp_path / "unlearn"}, tmp_path / "eval")
    values = {(r["model"], r["metric"]): r["value"] for r in read_table(tmp_path / "eval/metrics.parquet").to_pylist()}
    # greedy answers from the chat prompt reproduce the training answers: generation uses the template too
    assert values[("target", "forget_rouge")] > 0.6 > values[("retain", "forget_rouge")]
    assert values[("target", "retain_rouge")] > 0.6

