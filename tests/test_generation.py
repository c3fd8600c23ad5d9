"""Greedy generation that drops finished rows from their batch gives exactly the texts of Hugging Face's generate()
(bench.bench_eval.generate_with_hf, the evaluate stage's generation before), so every metric read from them is
unchanged."""

from __future__ import annotations

import pytest

from bench.bench_eval import generate_with_hf
from stages.scoring import generate_greedy, greedy_tokens, prompt_ids
from tests.test_evaluate import _qa, _tiny_llama, tokenizer  # noqa: F401  (a fixture)

QUESTIONS = [_qa(i)["question"] for i in range(12)] + ["Who?", "Where was Chen Wei born? And what does he write?"]


@pytest.fixture(scope="module", params=[50, 20, 4], ids=["trained", "half-trained", "untrained"])
def model(request, tokenizer):  # noqa: F811
    """Trained, rows end at different steps; less trained, some or all rows never end within the budget."""
    return _tiny_llama(tokenizer, seed=1, train_steps=request.param)


@pytest.mark.parametrize("batch_size", [1, 3, 14])
def test_generation_equals_generate(model, tokenizer, batch_size):  # noqa: F811
    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    expected = generate_with_hf(model, tokenizer, prompts, max_new_tokens=24, batch_size=batch_size)
    assert generate_greedy(model, tokenizer, prompts, max_new_tokens=24, batch_size=batch_size) == expected
    lengths = [len(t) for t in greedy_tokens(model, prompts, 24, tokenizer.eos_token_id, tokenizer.pad_token_id)]
    assert len(set(lengths)) > 2 or min(lengths) == 24  # rows leave the batch at different steps, or never


@pytest.mark.parametrize("stop", [("\n\n", "Question"), ("born",)])
def test_generation_with_stop_strings_equals_generate(model, tokenizer, stop):  # noqa: F811
    prompts = [prompt_ids(tokenizer, q) for q in QUESTIONS]
    expected = generate_with_hf(model, tokenizer, prompts, 24, 5, stop)
    assert generate_greedy(model, tokenizer, prompts, 24, 5, stop) == expected
