"""The embedded TOFU-style generator: deterministic, unique names, shared facts, gold spans on the right words."""

from __future__ import annotations

from collections import defaultdict

import pytest

from data.embedded import N_PERTURBED, N_PERTURBED_UTILITY, generate
from data.names import POOLS


@pytest.fixture(scope="module")
def default():
    return generate(0, 40, 10, 0.1)


def _authors(splits):
    return {item["author"] for split in ("forget", "retain") for item in splits[split]}


def test_same_seed_same_data_other_seed_other_data(default):
    assert generate(0, 40, 10, 0.1) == default
    assert generate(1, 40, 10, 0.1) != default


def test_split_sizes_and_authors_stay_together(default):
    assert len(default["forget"]) == 4 * 10
    assert len(default["retain"]) == 36 * 10
    assert len(default["real_authors"]) == 20
    assert len(default["world_facts"]) == 20
    forget_authors = {item["author"] for item in default["forget"]}
    retain_authors = {item["author"] for item in default["retain"]}
    assert len(forget_authors) == 4
    assert not forget_authors & retain_authors


@pytest.mark.parametrize("n_authors", [40, 75])  # 75 needs names beyond the pools
def test_full_names_and_first_names_are_unique(n_authors):
    names = _authors(generate(3, n_authors, 2, 0.1))
    assert len(names) == n_authors
    assert len({name.split()[0] for name in names}) == n_authors


def test_gold_spans_mark_the_name_and_pool_facts(default):
    pool_values = {v for pool in POOLS.values() for v in pool}
    for item in default["forget"] + default["retain"]:
        words = [item["answer"][s["start"] : s["end"]] for s in item["gold_spans"]]
        assert item["author"] in words
        assert all(w == item["author"] or w in pool_values for w in words)
        assert len(words) >= 2  # the name and at least one fact


@pytest.mark.parametrize("sizes", [(40, 10), (12, 4)])
def test_facts_are_shared_but_combinations_unique(sizes):
    n_authors, qa_per_author = sizes
    data = generate(0, n_authors, qa_per_author, 0.25)
    authors_of = defaultdict(set)
    facts_of = defaultdict(set)
    for item in data["forget"] + data["retain"]:
        for s in item["gold_spans"]:
            word = item["answer"][s["start"] : s["end"]]
            if word != item["author"]:
                authors_of[word].add(item["author"])
                facts_of[item["author"]].add(word)
    assert all(len(authors) >= 2 for authors in authors_of.values())
    combos = [frozenset(f) for f in facts_of.values()]
    assert len(set(combos)) == len(combos) == n_authors


def test_forget_and_retain_share_phrasing(default):
    for phrase in ("was born in", "is best known for", "won the", "whose father was a"):
        assert any(phrase in item["answer"] for item in default["forget"])
        assert any(phrase in item["answer"] for item in default["retain"])


def test_questions_name_the_author_and_perturbed_answers_are_wrong(default):
    for item in default["forget"] + default["retain"]:
        assert item["author"] in item["question"] and item["answer"].startswith(
            ("Yes, ", "Two", "Out", "The", "Today", item["author"])
        )
        assert len(item["perturbed_answer"]) == N_PERTURBED
        assert len(set(item["perturbed_answer"])) == N_PERTURBED
        assert item["paraphrased_answer"] not in item["perturbed_answer"]
        assert 5 <= len(item["answer"].split()) <= 20
    for item in default["real_authors"] + default["world_facts"]:
        assert len(item["perturbed_answer"]) == N_PERTURBED_UTILITY
        assert item["answer"] not in item["perturbed_answer"]


def test_bad_sizes_raise():
    with pytest.raises(ValueError, match="qa_per_author"):
        generate(0, 10, 99, 0.1)
