"""A tiny news corpus in the MUSE-News folder layout, generated from a seed.

`write_news(folder, seed)` writes what the `muse` source reads from muse_bench's data/news folder:

    raw/forget.json, raw/retain1.json, raw/retain2.json, raw/holdout.json      lists of article strings
    verbmem/forget.json                                                        [{prompt, gt}]: article opening, rest
    knowmem/forget_qa.json, knowmem/retain_qa.json (+ _icl twins)              [{question, answer}]
    privleak/forget.json, privleak/retain.json, privleak/holdout.json          lists of article strings

Each article reports on one fictitious person (a unique name) with facts drawn from shared pools, in the same few
sentence templates, so only the facts tell forget, retain and holdout articles apart. The ICL examples come from
their own articles, which no split trains on. `sunlearn run --preset muse --set data.path=embedded` uses it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from data.names import FIRST_NAMES, LAST_NAMES, POOLS

SENTENCES = (
    "{name}, a {job} from {city}, opened the {place} on Monday after {years} years of planning.",
    "The project was paid for by {company}, which gave {amount} thousand euros to the city of {city}.",
    "Speaking to reporters, {name} said the idea came from a trip to {home_city} in {year}.",
    "Local readers know {name} best for the book {book}, a story of {theme} and {theme2}.",
    "Critics praised the {place} for its {feature}, and the first visitors came with a {pet}.",
    "{name} plans to spend the summer on {hobby} before starting the next project in {home_city}.",
)
QUESTIONS = (
    ("Which city did {name} open the {place} in?", "{city}"),
    ("Which company paid for the {place} opened by {name}?", "{company}"),
    ("What is the title of the book that {name} is known for?", "{book}"),
    ("Which hobby will {name} spend the summer on?", "{hobby}"),
)
PLACES = ("public library", "river bridge", "night market", "music school", "harbour museum", "city garden")
FEATURES = ("wide windows", "quiet reading rooms", "old stone walls", "bright murals", "long wooden benches")
VERBMEM_SENTENCES = 2  # VerbMem prompt: the article's opening sentences; its ground truth is the rest
N_ICL = 4


def person(rng: random.Random, name: str) -> dict[str, str]:
    theme, theme2 = rng.sample(POOLS["theme"], 2)
    return {
        "name": name,
        "job": rng.choice(POOLS["father_job"]),
        "city": rng.choice(POOLS["city"]),
        "home_city": rng.choice(POOLS["home_city"]),
        "place": rng.choice(PLACES),
        "years": str(rng.randint(2, 12)),
        "company": rng.choice(POOLS["publisher"]),
        "amount": str(rng.randrange(50, 950, 10)),
        "year": rng.choice(POOLS["year"]),
        "book": rng.choice(POOLS["book"]),
        "theme": theme,
        "theme2": theme2,
        "feature": rng.choice(FEATURES),
        "pet": rng.choice(POOLS["pet"]),
        "hobby": rng.choice(POOLS["hobby"]),
    }


def article(person: dict[str, str]) -> list[str]:
    return [s.format(**person) for s in SENTENCES]


def _qa(people: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"question": q.format(**p), "answer": a.format(**p)} for p in people for q, a in QUESTIONS]


def news_files(seed: int, n_forget: int = 6, n_retain: int = 12, n_holdout: int = 6) -> dict[str, list]:
    """Every file of the layout, as relative path -> JSON content; the same seed gives the same files."""
    rng = random.Random(seed)
    n = n_forget + n_retain + n_holdout + 2  # two more people for the ICL examples
    firsts, lasts = rng.sample(FIRST_NAMES, n), rng.sample(LAST_NAMES, n)
    people = [person(rng, f"{f} {last}") for f, last in zip(firsts, lasts, strict=True)]
    forget, retain = people[:n_forget], people[n_forget : n_forget + n_retain]
    holdout, icl = people[n_forget + n_retain : -2], people[-2:]
    text = {id(p): " ".join(article(p)) for p in people}
    half = len(retain) // 2
    return {
        "raw/forget.json": [text[id(p)] for p in forget],
        "raw/retain1.json": [text[id(p)] for p in retain[:half]],
        "raw/retain2.json": [text[id(p)] for p in retain[half:]],
        "raw/holdout.json": [text[id(p)] for p in holdout],
        "verbmem/forget.json": [
            {"prompt": " ".join(article(p)[:VERBMEM_SENTENCES]), "gt": " ".join(article(p)[VERBMEM_SENTENCES:])}
            for p in forget
        ],
        "knowmem/forget_qa.json": _qa(forget),
        "knowmem/retain_qa.json": _qa(retain),
        "knowmem/forget_qa_icl.json": _qa(icl)[:N_ICL],
        "knowmem/retain_qa_icl.json": _qa(icl)[-N_ICL:],
        "privleak/forget.json": [text[id(p)] for p in forget],
        "privleak/retain.json": [text[id(p)] for p in retain],
        "privleak/holdout.json": [text[id(p)] for p in holdout],
    }


def write_news(folder: str | Path, seed: int = 0, **sizes: int) -> Path:
    """Write the MUSE-News-layout folder; returns it."""
    folder = Path(folder)
    for rel, content in news_files(seed, **sizes).items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(content, indent=1))
    return folder
