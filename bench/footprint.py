"""KenLM footprint: the assistants' binary sizes and lmplz's peak memory against corpus size.

Assistant A trains on forget + retain (2n tokens), B on retain (n tokens). Peak memory is the largest RSS among
the stage's children (lmplz and build_binary, A's being the larger), measured in a process that ran nothing else.
lmplz sorts in a buffer of `assistants.memory` (-S, 10% of RAM by default), which bounds its peak.
"""

from __future__ import annotations

from bench.report import Result, markdown_table, tokens_label
from bench.sized import SizedRuns, bench_config


def run(runs: SizedRuns, sizes: list[int]) -> Result:
    rows, details = [], {}
    for n in sorted(sizes):
        sized = runs.get(n)
        stats = sized.stats["assistants"]
        a_mb, b_mb = stats["a"]["binary_bytes"] / 2**20, stats["b"]["binary_bytes"] / 2**20
        details[str(n)] = {"a_tokens": stats["a"]["tokens"], "b_tokens": stats["b"]["tokens"], "a_binary_mb": a_mb,
                           "b_binary_mb": b_mb, "arpa_mb": stats["a"]["arpa_bytes"] / 2**20,
                           "kenlm_peak_rss_mb": sized.kenlm_peak_mb,
                           "bytes_per_token_a": stats["a"]["binary_bytes"] / stats["a"]["tokens"]}
        rows.append([tokens_label(n), f"{tokens_label(stats['a']['tokens'])} / {tokens_label(stats['b']['tokens'])}",
                     f"{a_mb:.1f} MB", f"{b_mb:.1f} MB", f"{details[str(n)]['bytes_per_token_a']:.1f}",
                     f"{sized.kenlm_peak_mb:.0f} MB"])
    header = ["forget tokens", "corpus A / B tokens", "a.binary", "b.binary", "bytes per token (A)",
              "lmplz peak RSS"]
    result = Result("footprint")
    result.extra_tables = [markdown_table(header, rows)]
    result.details = {"per_size": details, "order": bench_config().assistants.order,
                      "lmplz_memory": bench_config().assistants.memory}
    return result
