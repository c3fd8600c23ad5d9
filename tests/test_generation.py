"""Greedy generation that drops finished rows from their batch gives exactly the texts of Hugging Face's generate()
(bench.bench_eval.generate_with_hf, the evaluate stage's generation before), so every metric read from them is
unchanged."""

from __future__ import annotations

import pytest

from bench.bench_eval import generate_with_hf
from stages.generation import generate_greedy, greedy_tokens, prompt_ids
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


def test_generation_writes_its_cache_in_place(model, tokenizer):  # noqa: F811
    """Every attention layer of the tiny Llama gets a buffer sized once, and a generation that would outgrow it stops
    with an error instead of writing past it."""
    import torch

    from stages.generation import InPlaceLayer, preallocated_cache

    cache = preallocated_cache(model.config, capacity=8)
    assert [type(layer) for layer in cache.layers] == [InPlaceLayer] * model.config.num_hidden_layers
    prompt = torch.tensor([prompt_ids(tokenizer, QUESTIONS[0])])
    with pytest.raises(ValueError, match="cannot hold"), torch.inference_mode():
        model(input_ids=prompt, cache=cache, use_cache=True)
