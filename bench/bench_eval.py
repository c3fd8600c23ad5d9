"""Evaluation cost, in one run: `python bench/bench_eval.py [--items N]`, and `python -m bench eval` (snapshot_eval).

`main`: the embedded forget split evaluated with evaluate.batch_size items per batch, then one item per batch (both
produce the same numbers; the tests check it).

`run` (`snapshot_eval`): one model's whole evaluation (every eval set of its data: teacher-forced scores and greedy
generation) as the evaluate stage runs it now, against the same evaluation with generation through Hugging Face's
`generate()` (`generate_with_hf`, the stage's generation before rows left their batch at EOS). Same model, same
items, same metrics (checked equal here and in tests/test_generation.py); the ratio is what one snapshot of a curve
costs against one model's evaluation before.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from stages.config import load_config  # noqa: E402


def generate_with_hf(model, tokenizer, prompts: Sequence[list[int]], max_new_tokens: int, batch_size: int,
                     stop_strings: Sequence[str] = ()) -> list[str]:
    """Greedy generation through `model.generate()`: a batch runs until its last row ends."""
    import torch
    from transformers import GenerationConfig

    from stages.scoring import _batches, cut_at

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=pad,
                              bos_token_id=None, stop_strings=list(stop_strings) or None)
    texts = [""] * len(prompts)
    with torch.inference_mode():
        for idx in _batches([len(p) for p in prompts], batch_size):
            width = max(len(prompts[i]) for i in idx)
            input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
            attention = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                input_ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
                attention[row, width - len(prompts[i]) :] = 1
            out = model.generate(input_ids=input_ids.to(model.device), attention_mask=attention.to(model.device),
                                 generation_config=config, tokenizer=tokenizer if stop_strings else None)
            new = out[:, width:].cpu()
            finished = new == eos
            ends = torch.where(finished.any(1), finished.int().argmax(1), new.shape[1])
            for row, i in enumerate(idx):
                text = tokenizer.decode(new[row, : ends[row]].tolist(), skip_special_tokens=True)
                texts[i] = cut_at(text, stop_strings)
    return texts


def evaluate_model(model, tokenizer, sets) -> dict:
    """Every eval set's per-item values, as the evaluate stage computes them for one model."""
    out = {}
    for name, eval_set in sets.items():
        passes = eval_set.run(model, tokenizer)
        out[name] = {item.name: item.fn(passes) for item in eval_set.items}
    return out


def same_values(a, b) -> bool:
    """Equal per-item values; NaN (an item a metric does not apply to) equals NaN."""
    import numpy as np

    a, b = np.asarray(a), np.asarray(b)
    return np.array_equal(a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f")


def use_generation(generate) -> None:
    """Point the suites' generation at `generate` (they import it by name)."""
    from stages.evaluate import muse, tofu

    tofu.generate_greedy = muse.generate_greedy = generate


def trained_target(cfg, artifacts: str | None):
    """(tokenizer, target model, documents) of `cfg`: through the pipeline's cache at `artifacts` (a target already
    there is reused, a new one stays there), or trained in a temporary folder."""
    from stages.common import load_documents, load_model, load_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp:
        if artifacts is not None:
            from pipeline.runner import materialize

            prepare_dir, target_dir = (Path(materialize(s, cfg, artifacts).path) for s in ("prepare", "target"))
        else:
            from stages.prepare import prepare
            from stages.target import train_target

            prepare_dir, target_dir = Path(tmp) / "prepare", Path(tmp) / "target"
            prepare(cfg, {}, prepare_dir)
            train_target(cfg, {"prepare": prepare_dir}, target_dir)
        return (load_tokenizer(prepare_dir), load_model(target_dir / "target").eval(),
                load_documents(prepare_dir).to_pylist())


@dataclass
class Work:
    """What one evaluation must put through the model, at least: each distinct scored prompt once and every scored
    answer token (the LM head only there), each generation's prompt and every token it generated (EOS included)."""

    scored_prompts: int = 0
    scored_answers: int = 0
    generation_prompts: int = 0
    generated: int = 0

    def flops(self, linear: int, head: int) -> int:
        """Matmul FLOPs of that work in a model of `linear` linear-layer weights, `head` of them the LM head."""
        through_layers = self.scored_prompts + self.scored_answers + self.generation_prompts + self.generated
        return 2 * ((linear - head) * through_layers + head * (self.scored_answers + self.generated))


def counted_work(model, tokenizer, sets) -> Work:
    """One evaluation as `evaluate_model` runs it, counting its Work through the scoring and generation calls."""
    from stages import scoring

    work, score, greedy = Work(), scoring.score_sequences, scoring.greedy_tokens

    def counting_score(model, encoded, pad, batch_size):
        out = score(model, encoded, pad, batch_size)
        work.scored_prompts += sum(len(prompt) for prompt in {tuple(ids[:start]) for ids, start in encoded})
        work.scored_answers += int(out.n_tokens.sum())
        return out

    def counting_greedy(model, prompts, max_new_tokens, *args, **kwargs):
        new = greedy(model, prompts, max_new_tokens, *args, **kwargs)
        work.generation_prompts += sum(len(prompt) for prompt in prompts)
        work.generated += sum(min(len(tokens) + 1, max_new_tokens) for tokens in new)
        return new

    scoring.score_sequences, scoring.greedy_tokens = counting_score, counting_greedy
    try:
        evaluate_model(model, tokenizer, sets)
    finally:
        scoring.score_sequences, scoring.greedy_tokens = score, greedy
    return work


def forward_flops_per_second(model, batch_size: int, length: int, repeats: int = 5) -> float:
    """The model's own forward rate: matmul FLOPs of one full (batch_size, length) forward over its best time."""
    import torch

    ids = torch.randint(5, model.config.vocab_size, (batch_size, length), device=model.device)
    with torch.inference_mode():
        model(input_ids=ids)
        best = min(_timed(lambda: model(input_ids=ids)) for _ in range(repeats))
    return 2 * linear_weights(model) * batch_size * length / best


def linear_weights(model) -> int:
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run(preset: str, overrides: list[str], artifacts: str | None = None):
    """snapshot_eval: seconds of one model's evaluation now over the same with generate(), a trained tiny target."""
    import numpy as np

    from bench.report import Result, Row
    from stages.evaluate.stage import eval_sets

    cfg = load_config(preset, overrides=overrides)
    tokenizer, model, documents = trained_target(cfg, artifacts)
    sets = eval_sets(documents, cfg)
    seconds, results = {}, {}
    for label in ("now", "generate()", "now ", "generate() "):  # twice each, interleaved: load hits both alike
        use_generation(generate_with_hf if label.startswith("generate") else GENERATE_NOW)
        start = time.perf_counter()
        results[label.strip()] = evaluate_model(model, tokenizer, sets)
        seconds[label.strip()] = min(seconds.get(label.strip(), np.inf), time.perf_counter() - start)
    use_generation(GENERATE_NOW)
    work = counted_work(model, tokenizer, sets)
    rate = forward_flops_per_second(model, cfg.evaluate.batch_size, 64)
    floor = work.flops(linear_weights(model), model.lm_head.weight.numel()) / rate
    same = all(same_values(a[k], b[k])
               for name in sets for a, b in [(results["now"][name], results["generate()"][name])] for k in a)
    ratio = seconds["now"] / seconds["generate()"]
    n_items = sum(len(spec.rows) for spec in sets.values())
    result = Result("eval")
    result.rows = [Row("snapshot evaluation vs full evaluation", f"{preset}, {n_items} items in {len(sets)} sets, "
                       f"{cfg.evaluate.max_new_tokens} new tokens (identical: {'yes' if same else 'NO'})",
                       f"{seconds['now']:.1f} s", f"{seconds['generate()']:.1f} s", f"{ratio:.3f}", "≤ 0.25"),
                   Row("the floor: exact work at the model's forward rate vs full evaluation",
                       f"{work.scored_prompts + work.scored_answers} scored and "
                       f"{work.generation_prompts + work.generated} generation tokens at {rate / 1e9:.1f} GFLOP/s "
                       f"({cfg.evaluate.batch_size} × 64 forward)",
                       f"{floor:.1f} s", f"{seconds['generate()']:.1f} s", f"{floor / seconds['generate()']:.3f}",
                       "< 0.25 for the target to be reachable")]
    result.ratios = {"snapshot_eval": ratio, "snapshot_eval_floor": floor / seconds["generate()"]}
    result.details = {"seconds": seconds, "identical": same, "items": n_items, "sets": list(sets), "preset": preset,
                      "overrides": overrides, "work": vars(work), "forward_flops_per_second": rate,
                      "floor_seconds": floor}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=40, help="forget items evaluated (default: 40)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per item (default: 32)")
    args = parser.parse_args()

    import torch

    from stages.common import load_documents, load_tokenizer
    from stages.evaluate.tofu import QA_SETS, run_qa
    from stages.prepare import prepare
    from stages.target import build_model

    torch.manual_seed(0)
    cfg = load_config("embedded", overrides=[f"evaluate.max_new_tokens={args.new_tokens}"])
    with tempfile.TemporaryDirectory() as tmp:
        prepare(cfg, {}, Path(tmp))
        tokenizer = load_tokenizer(Path(tmp))
        rows = load_documents(Path(tmp), ("forget",)).to_pylist()[: args.items]
    model = build_model(cfg.target, tokenizer).eval()
    timings = {}
    for label, batch_size in (("batched", cfg.evaluate.batch_size), ("one at a time", 1)):
        start = time.perf_counter()
        run_qa(model, tokenizer, rows, QA_SETS[0], args.new_tokens, batch_size)
        timings[label] = time.perf_counter() - start
    print(f"items={len(rows)} new_tokens={args.new_tokens} threads={torch.get_num_threads()}")
    for label, seconds in timings.items():
        print(f"  {label:<14} {seconds:8.2f} s")
    print(f"  ratio (one at a time / batched): {timings['one at a time'] / timings['batched']:.1f}x")


from stages.scoring import generate_greedy as GENERATE_NOW  # noqa: E402

if __name__ == "__main__":
    main()
