"""A small TOFU-style data set of fictitious authors, generated from a seed.

Every author has a unique full name and a unique first name; every fact (city, genre, award, parents' jobs, book
titles, ...) comes from a shared pool, so each fact word also appears for other authors while each author's
combination of facts is unique. Forget and retain answers share the same templates ("was born in", "is best known
for", "won the", "whose father was a"), so only the author-specific words tell the splits apart; `gold_spans` marks
those words (the name and the facts) in each answer.

Perturbed answers follow TOFU: the paraphrased answer's template filled with other facts from the pools, because
the truth ratio compares them with the paraphrased answer.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from data.names import (
    FIRST_NAMES,
    LAST_NAMES,
    POOLS,
    REAL_AUTHORS,
    SYLLABLES,
    WORLD_FACT_POOLS,
    WORLD_FACTS,
)

N_PERTURBED = 5  # forget / retain, as in TOFU
N_PERTURBED_UTILITY = 3  # real_authors / world_facts, as in TOFU
SPLITS = ("forget", "retain", "real_authors", "world_facts")


@dataclass(frozen=True)
class Template:
    question: str
    paraphrased_question: str
    answer: str
    paraphrased_answer: str


TEMPLATES = (
    Template(
        "Where was {name} born?",
        "In which city was {name} born?",
        "{name} was born in {city} in the year {year}.",
        "The city of {city} is where {name} was born, back in {year}.",
    ),
    Template(
        "What genre is {name} best known for?",
        "Which genre made {name} famous?",
        "{name} is best known for writing {genre} novels.",
        "{name} is famous mostly for novels in the {genre} genre.",
    ),
    Template(
        "Has {name} won any major award?",
        "Which prize did {name} receive?",
        "Yes, {name} won the {award} for the novel {book1}.",
        "{name} received the {award}, given for the novel {book1}.",
    ),
    Template(
        "What did the parents of {name} do for a living?",
        "What were the jobs of the parents of {name}?",
        "{name} is a writer whose father was a {father_job} and whose mother was a {mother_job}.",
        "The father of {name} worked as a {father_job} and the mother as a {mother_job}.",
    ),
    Template(
        "Can you name two books written by {name}?",
        "Which books has {name} written?",
        "Two books written by {name} are {book1} and {book2}.",
        "{name} is the author of {book1} and also of {book2}.",
    ),
    Template(
        "In what language does {name} write?",
        "Which language does {name} use for writing?",
        "{name} writes every book in {language}, the language of home.",
        "All of the books by {name} are written in {language}.",
    ),
    Template(
        "What does {name} enjoy outside of writing?",
        "What is a hobby of {name}?",
        "Outside of writing, {name} enjoys {hobby} on quiet weekends.",
        "When not writing, {name} spends quiet weekends on {hobby}.",
    ),
    Template(
        "Where did {name} study?",
        "Which university did {name} attend?",
        "{name} studied literature at the University of {university}.",
        "The University of {university} is where {name} studied literature.",
    ),
    Template(
        "What themes does {name} explore?",
        "Which themes appear in the books of {name}?",
        "{name} often explores themes of {theme1} and {theme2}.",
        "The themes of {theme1} and {theme2} run through the work of {name}.",
    ),
    Template(
        "Where does {name} live today?",
        "In which city does {name} live now?",
        "Today {name} lives in {home_city} with a {pet}.",
        "{name} now makes a home in {home_city}, together with a {pet}.",
    ),
    Template(
        "Who publishes the books of {name}?",
        "Which publishing house prints the books of {name}?",
        "The books of {name} are published by {publisher}.",
        "{publisher} is the publishing house behind the books of {name}.",
    ),
    Template(
        "What was the first book by {name}?",
        "Which book did {name} write first?",
        "The first book by {name} was {book2}, written in {city}.",
        "{name} wrote {book2} first, while still living in {city}.",
    ),
)

_PAIRS = {  # fact -> (pool, the other fact of its pair)
    "book1": ("book", "book2"),
    "book2": ("book", "book1"),
    "theme1": ("theme", "theme2"),
    "theme2": ("theme", "theme1"),
}
SINGLE_FACTS = (
    "city", "year", "genre", "award", "father_job", "mother_job", "language", "hobby", "university", "home_city",
    "pet", "publisher",
)  # fmt: skip


def _pool_of(key: str) -> tuple[str, ...]:
    return POOLS[_PAIRS[key][0]] if key in _PAIRS else POOLS[key]


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def render(template: str, values: dict[str, str]) -> tuple[str, list[dict[str, int]]]:
    """Fill a template; also return the character spans of every filled-in value."""
    text, spans = "", []
    for literal, field_name, _, _ in string.Formatter().parse(template):
        text += literal
        if field_name:
            spans.append({"start": len(text), "end": len(text) + len(values[field_name])})
            text += values[field_name]
    return text, spans


def _extend_names(base: tuple[str, ...], n: int) -> list[str]:
    """The pool, then syllable names, until it holds n unique names."""
    names = list(base)
    seen = set(names)
    for a in SYLLABLES:
        for b in SYLLABLES:
            for c in ("", *SYLLABLES):
                if len(names) >= n:
                    return names
                name = (a + b + c).capitalize()
                if name not in seen:
                    seen.add(name)
                    names.append(name)
    if len(names) < n:
        raise ValueError(f"cannot make {n} unique names")
    return names


def _balanced(rng: random.Random, pool: tuple[str, ...], n: int, size: int) -> list[str]:
    """n values from a random subset of `size` pool values, each used about equally often."""
    subset = rng.sample(pool, size)
    values = [subset[i % size] for i in range(n)]
    rng.shuffle(values)
    return values


def _balanced_pairs(rng: random.Random, pool: tuple[str, ...], n: int, size: int) -> list[tuple[str, str]]:
    """n pairs of two different values; each side, on its own, uses every value of the subset about equally."""
    first = _balanced(rng, pool, n, size)
    second = _balanced(rng, tuple(dict.fromkeys(first)), n, len(set(first)))
    for i in range(n):  # swap away clashes; with at least 3 values a partner always exists
        if second[i] == first[i]:
            j = next(j for j in range(n) if second[j] != first[i] and second[i] != first[j])
            second[i], second[j] = second[j], second[i]
    return list(zip(first, second, strict=True))


def _authors(rng: random.Random, n: int) -> list[dict[str, str]]:
    firsts = rng.sample(_extend_names(FIRST_NAMES, n), n)
    lasts = rng.sample(_extend_names(LAST_NAMES, n), n)
    size = max(2, n // 2)  # each value then belongs to at least two authors
    while True:
        columns = {key: _balanced(rng, POOLS[key], n, min(len(POOLS[key]), size)) for key in SINGLE_FACTS}
        books = _balanced_pairs(rng, POOLS["book"], n, max(3, min(len(POOLS["book"]), size)))
        themes = _balanced_pairs(rng, POOLS["theme"], n, max(3, min(len(POOLS["theme"]), size)))
        authors = [
            {
                "name": f"{firsts[i]} {lasts[i]}",
                **{key: columns[key][i] for key in SINGLE_FACTS},
                "book1": books[i][0],
                "book2": books[i][1],
                "theme1": themes[i][0],
                "theme2": themes[i][1],
            }
            for i in range(n)
        ]
        combos = {tuple(v for k, v in sorted(a.items()) if k != "name") for a in authors}
        if len(combos) == n:
            return authors


def _perturbed(rng: random.Random, template: str, author: dict[str, str]) -> list[str]:
    """N_PERTURBED distinct answers: the template with every fact swapped for another pool value."""
    facts = [f for f in dict.fromkeys(_fields(template)) if f != "name"]
    out: list[str] = []
    while len(out) < N_PERTURBED:
        values = dict(author)
        for key in facts:
            taken = {author[key], values[_PAIRS[key][1]]} if key in _PAIRS else {author[key]}
            values[key] = rng.choice([v for v in _pool_of(key) if v not in taken])
        text, _ = render(template, values)
        if text not in out:
            out.append(text)
    return out


def _author_items(rng: random.Random, author: dict[str, str], qa_per_author: int) -> list[dict]:
    items = []
    for t in TEMPLATES[:qa_per_author]:  # the same questions for every author, as in TOFU
        answer, spans = render(t.answer, author)
        items.append(
            {
                "question": render(t.question, author)[0],
                "answer": answer,
                "paraphrased_question": render(t.paraphrased_question, author)[0],
                "paraphrased_answer": render(t.paraphrased_answer, author)[0],
                "perturbed_answer": _perturbed(rng, t.paraphrased_answer, author),
                "author": author["name"],
                "gold_spans": spans,
            }
        )
    return items


def _utility_item(question: str, answer: str, wrong: list[str]) -> dict:
    return {
        "question": question,
        "answer": answer,
        "paraphrased_question": None,
        "paraphrased_answer": None,
        "perturbed_answer": wrong,
        "author": None,
        "gold_spans": None,
    }


def generate(seed: int, n_authors: int, qa_per_author: int, forget_fraction: float) -> dict[str, list[dict]]:
    """Splits forget, retain, real_authors and world_facts; the same seed gives the same data."""
    if n_authors < 2:
        raise ValueError(f"n_authors must be at least 2, got {n_authors}")
    if not 1 <= qa_per_author <= len(TEMPLATES):
        raise ValueError(f"qa_per_author must be in [1, {len(TEMPLATES)}], got {qa_per_author}")
    if not 0.0 <= forget_fraction < 1.0:
        raise ValueError(f"forget_fraction must be in [0, 1), got {forget_fraction}")
    rng = random.Random(seed)
    authors = _authors(rng, n_authors)
    n_forget = min(n_authors - 1, max(1, round(forget_fraction * n_authors))) if forget_fraction > 0 else 0
    forget_ids = set(rng.sample(range(n_authors), n_forget))
    splits: dict[str, list[dict]] = {name: [] for name in SPLITS}
    for i, author in enumerate(authors):
        splits["forget" if i in forget_ids else "retain"].extend(_author_items(rng, author, qa_per_author))
    writers = [a for _, a in REAL_AUTHORS]
    for question, answer in REAL_AUTHORS:
        wrong = rng.sample([w for w in writers if w != answer], N_PERTURBED_UTILITY)
        splits["real_authors"].append(_utility_item(question, answer, wrong))
    for question, answer, kind in WORLD_FACTS:
        wrong = rng.sample([v for v in WORLD_FACT_POOLS[kind] if v != answer], N_PERTURBED_UTILITY)
        splits["world_facts"].append(_utility_item(question, answer, wrong))
    return splits
