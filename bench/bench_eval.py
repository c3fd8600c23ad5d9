"""Batched evaluation against one item at a time, in one run: `python bench/bench_eval.py [--items N]`.

Evaluates the embedded forget split (teacher-forced scoring of answer, paraphrase and perturbed answers, then greedy
generation) with a tiny Llama of the default target size, first with evaluate.batch_size items per batch, then with
one item per batch, and prints both times and their ratio. Both runs produce the same numbers (the tests check it).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.config import load_config  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=40, help="forget items evaluated (default: 40)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per item (default: 32)")
    args = parser.parse_args()

    import torch

    from stages.common import load_documents, load_tokenizer
    from stages.evaluate import SPLITS, evaluate_split
    from stages.prepare import prepare
    from stages.target import build_model

    torch.manual_seed(0)
    cfg = load_config("embedded", overrides=[f"evaluate.max_new_tokens={args.new_tokens}"])
    with tempfile.TemporaryDirectory() as tmp:
        prepare(cfg, {}, Path(tmp))
        tokenizer = load_tokenizer(Path(tmp))
        rows = load_documents(Path(tmp), ("forget",)).drop_columns(["gold"]).to_pylist()[: args.items]
    model = build_model(cfg.target, tokenizer).eval()
    spec = SPLITS[0]
    timings = {}
    for label, batch_size in (("batched", cfg.evaluate.batch_size), ("one at a time", 1)):
        cfg.evaluate.batch_size = batch_size
        start = time.perf_counter()
        evaluate_split(model, tokenizer, rows, cfg, spec)
        timings[label] = time.perf_counter() - start
    print(f"items={len(rows)} new_tokens={args.new_tokens} threads={torch.get_num_threads()}")
    for label, seconds in timings.items():
        print(f"  {label:<14} {seconds:8.2f} s")
    print(f"  ratio (one at a time / batched): {timings['one at a time'] / timings['batched']:.1f}x")


if __name__ == "__main__":
    main()
