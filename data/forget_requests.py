"""An example folder for the `files` source: generated news-style documents, a forget list and two eval sets.

    python -m data.forget_requests FOLDER [--seed N] [--documents N]

writes FOLDER/corpus.jsonl ({"id": "doc-007", "text": ...} per line, one fictitious person per document, as
data/news.py writes them), FOLDER/forget.txt (three ids to forget), FOLDER/holdout.jsonl (documents of other people,
never trained on: PrivLeak), FOLDER/utility.jsonl (QA pairs about retain documents) and FOLDER/config.yaml, which
points the files source at them with absolute paths. docs/forget-requests.md runs it on a schedule.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from data.names import FIRST_NAMES, LAST_NAMES
from data.news import QUESTIONS, article, person

FORGET = 3
HOLDOUT = 8
UTILITY_PEOPLE = 6


def write_example(folder: str | Path, seed: int = 0, documents: int = 36) -> Path:
    """Write the example folder; the same seed gives the same files. Returns the config file."""
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    n = documents + HOLDOUT
    people = [person(rng, f"{f} {last}") for f, last in zip(rng.sample(FIRST_NAMES, n), rng.sample(LAST_NAMES, n),
                                                              strict=True)]
    corpus = [{"id": f"doc-{i:03d}", "text": " ".join(article(p))} for i, p in enumerate(people[:documents])]
    holdout = [{"id": f"holdout-{i:03d}", "text": " ".join(article(p))} for i, p in enumerate(people[documents:])]
    forget = sorted(rng.sample(range(documents), FORGET))
    retain_people = [p for i, p in enumerate(people[:documents]) if i not in forget][:UTILITY_PEOPLE]
    utility = [{"id": f"qa-{i:03d}", "question": q.format(**p), "answer": a.format(**p)}
               for i, (p, (q, a)) in enumerate((p, qa) for p in retain_people for qa in QUESTIONS[:2])]
    _jsonl(folder / "corpus.jsonl", corpus)
    _jsonl(folder / "holdout.jsonl", holdout)
    _jsonl(folder / "utility.jsonl", utility)
    (folder / "forget.txt").write_text("".join(f"doc-{i:03d}\n" for i in forget))
    config = folder / "config.yaml"
    config.write_text(
        "# the files source on this folder: `sunlearn run --config " + str(config) + "`\n"
        "data:\n"
        "  source: files\n"
        f"  path: {folder / 'corpus.jsonl'}\n"
        f"  forget_ids: {folder / 'forget.txt'}\n"
        f"  holdout: {folder / 'holdout.jsonl'}\n"
        f"  utility: {folder / 'utility.jsonl'}\n"
    )
    return config


def _jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--documents", type=int, default=36)
    args = parser.parse_args()
    config = write_example(args.folder, args.seed, args.documents)
    print(config)


if __name__ == "__main__":
    main()
