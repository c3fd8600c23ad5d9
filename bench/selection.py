"""Which token selection finds the forget-specific words? Every option measured against the gold spans.

Runs prepare → assistants → scores → masks (no training of the target) for each combination of assistant splits,
assistant kind, γ (fixed values and `auto`) and window, reusing the artifact cache, and prints precision, recall
and F1 of the selected answer tokens against the embedded set's gold spans (author names and facts).

    python -m bench.selection [--preset embedded] [--artifacts artifacts] [--kinds kenlm,llm] [--set key=value ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

from pipeline.runner import materialize_until
from stages.config import load_config

GAMMAS = ["0.1", "0.2", "0.3", "0.4", "0.5", "0.6", "0.7", "0.8", "0.9", "auto"]


def measure(preset: str, artifacts: str, kinds: list[str], overrides: list[str]) -> list[dict]:
    rows = []
    for kind, splits, window, gamma in itertools.product(kinds, ["full_retain", "full_forget"], ["0", "2"], GAMMAS):
        cfg = load_config(preset, overrides=[*overrides, f"assistants.kind={kind}", f"assistants.splits={splits}",
                                             f"masks.window={window}", f"masks.gamma={gamma}"])
        stats = materialize_until("masks", cfg, artifacts)[-1].stats
        p, r = stats.get("precision", float("nan")), stats.get("recall", float("nan"))
        rows.append({"kind": kind, "splits": splits, "window": int(window), "gamma": gamma,
                     "gamma_used": round(stats["gamma"], 3), "selected": round(stats["fraction_selected"], 3),
                     "precision": round(p, 3), "recall": round(r, 3),
                     "f1": round(2 * p * r / (p + r), 3) if p + r > 0 else 0.0})
    return rows


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="embedded")
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--kinds", default="kenlm,llm")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    start = time.time()
    rows = measure(args.preset, args.artifacts, args.kinds.split(","), args.overrides)
    if args.json:
        print(json.dumps(rows))
        return
    best = max(rows, key=lambda r: r["f1"])
    print(markdown(sorted(rows, key=lambda r: -r["f1"])))
    print(f"\nbest by F1: {best}  ({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
