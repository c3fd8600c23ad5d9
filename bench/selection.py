"""Which token selection finds the forget-specific words? Every option measured against known fact tokens.

Runs prepare → assistants → scores (no training of the target) for each assistant kind and split pair, reusing the
artifact cache, then the masks stage for every score (prob_diff, log_ratio), window (0, 2) and γ (fixed values down
to 0.001, and `auto` on a linear and a log axis), and prints precision, recall and F1 of the selected answer tokens:

- on the embedded set, against its gold spans (author names and facts), the `gold` column of token_scores.parquet;
- on TOFU (`--tofu`, skipped when the folder is absent), against the tokens of the fact words fact recall uses
  (stages.evaluate.tofu.fact_words: the paraphrased answer's words its perturbations change), over the forget items that
  have fact words.

`all answer tokens` is what GradDiff trains: its precision is the share of fact tokens, its recall 1. Without a GPU,
pass `--kinds kenlm` when TOFU is measured: its LLM assistants train on 4,000 items (2,500 steps each, ~2.2 s a step
on 2 CPU cores).

    python -m bench.selection [--preset embedded] [--tofu ../shared/data/tofu] [--kinds kenlm,llm] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.runner import materialize_until
from schemas import read_table
from stages.common import answer_text, load_documents, load_tokenizer
from stages.config import Config, load_config
from stages.evaluate.tofu import fact_words
from stages.masks import build_masks, precision_recall
from stages.metrics import words

GAMMAS = {
    "prob_diff": ["0.001", "0.002", "0.005", "0.01", "0.02", "0.05", "0.1", "0.2", "0.3", "0.5", "0.7", "0.9"],
    "log_ratio": ["0.001", "0.002", "0.005", "0.01", "0.02", "0.05", "0.1", "0.2", "0.5", "1", "2", "4"],
}
AUTO = [("auto", "linear"), ("auto", "log")]


def fact_word_tokens(prepare_dir: Path, doc_ids: list[str], positions: np.ndarray) -> np.ndarray:
    """Per token_scores row: 1 where the token overlaps a fact word of its item, 0 elsewhere, NaN for items without
    fact words. Rows are those of token_scores.parquet (sorted by document, then position)."""
    docs = load_documents(prepare_dir, ("forget",)).to_pylist()
    tokenizer = load_tokenizer(prepare_dir)
    out = np.full(len(positions), np.nan)
    doc_index = {d: i for i, d in enumerate(dict.fromkeys(doc_ids))}
    bounds = np.searchsorted(np.asarray([doc_index[d] for d in doc_ids]), np.arange(len(doc_index) + 1))
    for row in docs:
        lo, hi = bounds[doc_index[row["doc_id"]]], bounds[doc_index[row["doc_id"]] + 1]
        facts = set(fact_words(row))
        if not facts:
            continue
        text = answer_text(tokenizer, row["answer"])  # the answer as encode_qa tokenises it
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        start = row["answer_start"]
        if list(row["input_ids"][start : start + len(enc["input_ids"])]) != enc["input_ids"]:
            raise ValueError(f"{row['doc_id']}: the answer does not re-tokenise to its input_ids")
        # the same words ROUGE and fact recall compare: alphanumeric runs, lower-cased and stemmed
        spans = np.array([m.span() for m in re.finditer(r"[A-Za-z0-9]+", text) if words(m.group())[0] in facts],
                         dtype=np.int64).reshape(-1, 2)
        offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        hit = ((offsets[:, :1] < spans[None, :, 1]) & (offsets[:, 1:] > spans[None, :, 0])).any(axis=1)
        gold = np.zeros(hi - lo)
        gold[start : start + len(hit)] = hit  # the prompt and the EOS hold no fact
        out[lo:hi] = gold[positions[lo:hi]]
    return out


def gold_tokens(prepare_dir: Path, scores_dir: Path, facts: bool) -> np.ndarray:
    """Per token_scores row: 1 for a fact token, 0 for another answer token, NaN outside answers or where unknown."""
    scores = read_table(scores_dir / "token_scores.parquet", columns=["doc_id", "position", "in_answer", "gold"])
    if facts:
        gold = fact_word_tokens(prepare_dir, scores["doc_id"].to_pylist(), scores["position"].to_numpy())
    else:
        gold = scores["gold"].cast("float64").fill_null(np.nan).to_numpy()
    return np.where(scores["in_answer"].to_numpy(zero_copy_only=False), gold, np.nan)


def selection_row(gamma: float, selected: np.ndarray, gold: np.ndarray) -> dict:
    """What `selected` (a bool per token_scores row) takes, and its precision, recall and F1 against `gold`."""
    known = ~np.isnan(gold)
    p, r = precision_recall(selected[known], gold[known] == 1)
    return {"gamma_used": float(f"{gamma:.3g}"), "selected": round(float(selected[known].mean()), 3),
            "precision": round(p, 3), "recall": round(r, 3), "f1": round(2 * p * r / (p + r), 3) if p + r > 0 else 0.0}


def measure(cfg_of: Callable[[list[str]], Config], artifacts: str, kinds: list[str], facts: bool) -> list[dict]:
    """Every selection option on one data set; `cfg_of(overrides)` builds its config."""
    rows = []
    for kind, splits in itertools.product(kinds, ["full_retain", "full_forget"]):
        base = [f"assistants.kind={kind}", f"assistants.splits={splits}"]
        results = materialize_until("scores", cfg_of(base), artifacts)
        scores_dir = Path(results[-1].path)
        gold = gold_tokens(Path(results[0].path), scores_dir, facts)
        every = selection_row(0.0, ~np.isnan(gold), gold)
        rows.append({"kind": kind, "splits": splits, "score": "-", "window": "-", "gamma": "all answer tokens",
                     **every, "gamma_used": "-"})
        for score, window in itertools.product(["prob_diff", "log_ratio"], ["0", "2"]):
            for gamma, scale in [(g, "linear") for g in GAMMAS[score]] + AUTO:
                cfg = cfg_of([*base, f"masks.score={score}", f"masks.window={window}", f"masks.gamma={gamma}",
                              f"masks.auto_scale={scale}"])
                used, selected = run_masks(cfg, scores_dir)
                label = gamma if gamma != "auto" else f"auto ({scale})"
                rows.append({"kind": kind, "splits": splits, "score": score, "window": int(window), "gamma": label,
                             **selection_row(used, selected, gold)})
    return rows


def run_masks(cfg: Config, scores_dir: Path) -> tuple[float, np.ndarray]:
    """The masks stage itself into a scratch folder (hundreds of options: no cache entries): γ and `selected`."""
    with tempfile.TemporaryDirectory() as tmp:
        stats = build_masks(cfg, {"scores": scores_dir}, Path(tmp))
        selected = read_table(Path(tmp) / "masks.parquet", columns=["selected"])["selected"]
        return stats["gamma"], selected.to_numpy(zero_copy_only=False)


def markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[dict]:
    """Per kind, splits, score and window: both auto rules beside the best fixed γ by F1."""
    out = []
    keys = dict.fromkeys((r["kind"], r["splits"], r["score"], r["window"]) for r in rows if r["score"] != "-")
    for kind, splits, score, window in keys:
        group = [r for r in rows if (r["kind"], r["splits"], r["score"], r["window"]) == (kind, splits, score, window)]
        fixed = max((r for r in group if not r["gamma"].startswith("auto")), key=lambda r: r["f1"])
        row = {"kind": kind, "splits": splits, "score": score, "window": window}
        for r in [*(r for r in group if r["gamma"].startswith("auto")), fixed]:
            name = r["gamma"].removeprefix("auto (").removesuffix(")") if r["gamma"].startswith("auto") else "best γ"
            row[name] = f"γ={r['gamma_used']}: P {r['precision']} R {r['recall']} F1 {r['f1']}"
        out.append(row)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="embedded")
    parser.add_argument("--tofu", default="../shared/data/tofu", help="TOFU's json folder; skipped if absent")
    parser.add_argument("--artifacts", default="artifacts")
    parser.add_argument("--kinds", default="kenlm,llm")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    start = time.time()
    kinds = args.kinds.split(",")
    results = {args.preset: measure(lambda o: load_config(args.preset, overrides=[*args.overrides, *o]),
                                    args.artifacts, kinds, facts=False)}
    if Path(args.tofu).is_dir():
        tofu = [f"data.path={args.tofu}", *args.overrides]
        results["tofu"] = measure(lambda o: load_config("tofu", overrides=[*tofu, *o]), args.artifacts, kinds,
                                  facts=True)
    else:
        print(f"TOFU: {args.tofu} does not exist; measured {args.preset} only")
    if args.json:
        print(json.dumps(results))
        return
    for name, rows in results.items():
        truth = "fact words" if name == "tofu" else "gold spans"
        print(f"\n## {name}: selection against {truth}\n\n{markdown(summary(rows))}\n\n{markdown(rows)}")
    print(f"\n({time.time() - start:.0f}s)")


if __name__ == "__main__":
    main()
