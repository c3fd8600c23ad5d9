"""Token scoring: the scores stage (two KenLM assistants) against a tiny-LLM assistant pair and a raw kenlm loop.

- sunlearn: `stages.scores.score_tokens`, the whole stage (read documents, score with both assistants, write
  token_scores.parquet), on the forget split of the synthetic corpus.
- raw kenlm: both binaries' `full_scores` over the same sentences in a bare loop, nothing read or written: the
  ceiling any KenLM scorer in Python can reach.
- LLM pair: `stages.llm_assistants.score_with_llms` with two Llamas of the LLM-assistant recipe
  (`assistants.llm_hidden_size`, `assistants.llm_layers`) over the corpus vocabulary. Scoring cost does not depend on
  the weights, so they are left untrained. At 10M tokens this would take hours on a CPU, so it scores a prefix of the
  forget documents and the ratio compares throughputs (tokens/s).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa

from bench.corpus import VOCAB
from bench.report import Result, Row, rate, tokens_label
from bench.sized import SizedRuns, bench_config
from stages.common import load_documents


def raw_kenlm_seconds(assistants: Path, sentences: list[str]) -> float:
    import kenlm

    models = [kenlm.Model(str(assistants / f"{name}.binary")) for name in ("a", "b")]
    start = time.perf_counter()
    for model in models:
        scores: list[float] = []
        for sentence in sentences:
            scores.extend(s[0] for s in model.full_scores(sentence, bos=True, eos=False))
    return time.perf_counter() - start


def llm_pair(out: Path) -> Path:
    """Two untrained Llamas of the LLM-assistant recipe, saved where score_with_llms looks for them."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    a = bench_config().assistants
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=a.llm_hidden_size, num_hidden_layers=a.llm_layers,
                         num_attention_heads=2, num_key_value_heads=2, intermediate_size=3 * a.llm_hidden_size,
                         max_position_embeddings=512, tie_word_embeddings=True, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0)
    for seed, name in enumerate(("a", "b")):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(out / name)
    return out


def llm_seconds(prepare: Path, out: Path, n_tokens: int) -> tuple[float, int, int]:
    """Seconds for the LLM pair to score the first forget documents holding n_tokens, their token count, and the
    torch thread count that was fastest (the LLM side gets its best of one thread and all cores)."""
    import torch

    from stages.llm_assistants import score_with_llms

    docs = load_documents(prepare, ("forget",))
    cumulative = pa.compute.cumulative_sum(pa.compute.list_value_length(docs["input_ids"])).to_numpy()
    subset = docs.slice(0, int((cumulative < n_tokens).sum()) + 1)
    llm_pair(out)
    before, best = torch.get_num_threads(), {}
    for threads in sorted({1, len(os.sched_getaffinity(0))}):
        torch.set_num_threads(threads)
        start = time.perf_counter()
        score_with_llms(out, subset)
        best[threads] = time.perf_counter() - start
    torch.set_num_threads(before)
    threads = min(best, key=best.get)
    return best[threads], int(cumulative[len(subset) - 1]), threads


def run(runs: SizedRuns, sizes: list[int], llm_tokens: int) -> Result:
    from stages.common import kenlm_sentences

    result = Result("scoring")
    per_size = {}
    for n in sizes:
        sized = runs.get(n)
        stage_seconds = sized.seconds["scores"]
        docs = load_documents(sized.dir("prepare"), ("forget",))
        raw = raw_kenlm_seconds(sized.dir("assistants"), kenlm_sentences(docs))
        per_size[n] = {"stage_seconds": stage_seconds, "stage_tokens_per_s": n / stage_seconds,
                       "raw_kenlm_seconds": raw, "raw_kenlm_tokens_per_s": n / raw}
        result.rows.append(Row("scoring vs raw kenlm loop", f"{tokens_label(n)} tokens, 2 assistants",
                               rate(n, stage_seconds), rate(n, raw), f"{raw / stage_seconds:.2f}×", "≥ 0.5×"))
    largest = max(sizes)
    sized = runs.get(largest)
    llm_s, llm_n, llm_threads = llm_seconds(sized.dir("prepare"), runs.workdir / "llm-assistants", llm_tokens)
    stage_rate = per_size[largest]["stage_tokens_per_s"]
    result.rows.insert(0, Row("scoring vs LLM-assistant pair", f"{tokens_label(largest)} tokens (LLM: first "
                              f"{tokens_label(llm_n)}), tok/s", rate(largest, per_size[largest]["stage_seconds"]),
                              rate(llm_n, llm_s), f"{stage_rate / (llm_n / llm_s):.0f}×", "≥ 50×"))
    result.ratios = {
        "scoring_vs_llm": stage_rate / (llm_n / llm_s),
        "scoring_vs_raw_kenlm": per_size[largest]["raw_kenlm_seconds"] / per_size[largest]["stage_seconds"],
    }
    a = bench_config().assistants
    llm = {"tokens": llm_n, "seconds": llm_s, "tokens_per_s": llm_n / llm_s, "torch_threads": llm_threads,
           "hidden_size": a.llm_hidden_size, "layers": a.llm_layers, "vocab": VOCAB}
    result.details = {"per_size": per_size, "llm": llm}
    return result
