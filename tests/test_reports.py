"""Reports: the Pareto front, results.md, pareto.png, selection.html, and gathering runs under an artifact root."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from schemas import METRICS, write_table
from stages.reports import Run, gather_runs, pareto_front, plot_pareto, results_markdown, selection_html, write_reports


def _metrics(values: dict[str, dict[str, float]]) -> pa.Table:
    rows = [{"model": m, "step": 0, "metric": k, "value": v} for m, d in values.items() for k, v in d.items()]
    return pa.Table.from_pylist(rows, schema=METRICS)


VALUES = {
    "target": {"forget_quality": 1e-5, "model_utility": 0.60, "forget_rouge": 0.9},
    "retain": {"forget_quality": 1.0, "model_utility": 0.58, "forget_rouge": 0.3},
    "su": {"forget_quality": 0.2, "model_utility": 0.55, "forget_rouge": 0.4},
    "graddiff": {"forget_quality": 0.1, "model_utility": 0.40, "forget_rouge": 0.35},
    "npo": {"forget_quality": 0.05, "model_utility": 0.57, "forget_rouge": float("nan")},
}


def test_pareto_front_keeps_the_points_nothing_beats():
    x = np.array([0.55, 0.40, 0.57, 0.50])
    y = np.array([0.2, 0.1, 0.05, 0.2])
    # (0.40, 0.1) is beaten by (0.55, 0.2); (0.50, 0.2) too (same y, lower x); the others trade off
    np.testing.assert_array_equal(pareto_front(x, y), [0, 2])


def test_results_markdown_has_a_row_per_model_and_key_columns_first():
    text = results_markdown(VALUES)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0] == "| model | forget_quality | model_utility | forget_rouge |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == list(VALUES)
    assert "| su | 0.200 | 0.550 | 0.400 |" in text
    assert "| npo | 0.0500 | 0.570 | – |" in text  # NaN shown as a dash
    assert "| target | 1.00e-05 | 0.600 | 0.900 |" in text  # three significant digits throughout


def test_write_reports_draws_the_pareto_plot(tmp_path):
    written = write_reports(tmp_path, {}, _metrics(VALUES))
    assert written == ["results.md", "pareto.png"]  # no masks/scores inputs: no selection.html
    assert (tmp_path / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plot_pareto([Run("", {"su": {"verbmem_f": 0.1}})], tmp_path / "none.png")  # no axis pair
    assert plot_pareto([Run("", {"su": {"knowmem_r": 0.4, "verbmem_f": 0.1}})], tmp_path / "muse.png")


def _selection_folders(tmp_path: Path, gold: pa.Array | None = None) -> tuple[np.ndarray, list[int], pa.Array]:
    """prepare (a tokenizer), scores and masks folders with manifests for one forget document; returns the scores."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["Question: Where?\nAnswer: Ana was born in Lisbon."], vocab_size=280,
                            special_tokens=["<pad>", "</s>"], show_progress=False)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="</s>", pad_token="<pad>")
    tokenizer.save_pretrained(tmp_path / "prepare" / "tokenizer")
    ids = tokenizer("Question: Where?\nAnswer: Ana was born in Lisbon.")["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids)
    diff = np.linspace(0.0, 0.95, n)
    gold = pa.nulls(n, pa.bool_()) if gold is None else gold
    scores = pa.table({"doc_id": ["forget/0000"] * n, "position": np.arange(n, dtype=np.int32),
                       "token_id": np.array(ids, dtype=np.int32), "p_a": diff, "p_b": np.zeros(n),
                       "score_diff": diff, "in_answer": np.arange(n) >= 4, "gold": gold})
    masks = pa.table({"doc_id": ["forget/0000"] * n, "position": np.arange(n, dtype=np.int32),
                      "selected": diff > 0.7, "seed": diff > 0.9, "in_answer": np.arange(n) >= 4, "gold": gold})
    manifests = {"scores": {"config": {"assistants": {"kind": "kenlm", "order": 5, "splits": "full_retain"}}},
                 "masks": {"config": {"masks": {"gamma": "auto", "window": 2}},
                           "stats": {"gamma": 0.9, "gamma_rule": "otsu", "window": 2}}}
    for name, table in (("scores", scores), ("masks", masks)):
        (tmp_path / name).mkdir()
        write_table(table, tmp_path / name / f"{'token_scores' if name == 'scores' else 'masks'}.parquet")
        (tmp_path / name / "manifest.json").write_text(json.dumps(manifests[name]))
    return diff, ids, gold


def test_selection_html_highlights_selected_tokens_with_scores(tmp_path):
    diff, ids, _ = _selection_folders(tmp_path)
    n = len(ids)
    page = selection_html(tmp_path / "prepare", tmp_path / "masks", tmp_path / "scores")
    assert page.count('<span class="') == n - 1  # every token but the end-of-text one
    assert page.count('class="seed"') == int((diff[:-1] > 0.9).sum())
    assert page.count('class="sel"') == int(((diff > 0.7) & (diff <= 0.9)).sum())
    assert f'title="score_diff={diff[-2]:.3f}' in page
    assert "Lisbon" in "".join(part.split(">")[-1] for part in page.split("</span>"))  # decoded text, not Ġ
    assert "&lt;/s&gt;" not in page and "</s>" not in page  # special tokens hidden
    assert f"{int((diff > 0.7).sum())} of {int((np.arange(n) >= 4).sum())} answer tokens selected" in page
    legend = page.split("class='legend'>")[1].split("</p>")[0]
    assert all(f"<span class='{c}" in legend for c in ("seed", "sel", "ans", "pr", "ans gold"))
    assert "the data has no gold spans" in page


def test_selection_html_states_gamma_its_rule_precision_and_recall(tmp_path):
    n = len(_selection_folders(tmp_path / "probe")[1])
    gold = pa.array([None] * 4 + [i >= n - 4 for i in range(4, n)], pa.bool_())  # the last 4 tokens are gold
    diff, _, _ = _selection_folders(tmp_path / "run", gold)
    page = selection_html(tmp_path / "run" / "prepare", tmp_path / "run" / "masks", tmp_path / "run" / "scores")
    selected, is_gold = diff > 0.7, np.array([bool(g) for g in gold.to_pylist()])
    precision = (selected & is_gold).sum() / selected[4:].sum()
    recall = (selected & is_gold).sum() / is_gold.sum()
    assert "<b>γ</b></td><td>0.9: Otsu's threshold" in page and "masks.gamma=auto" in page
    assert f"precision {precision:.3f}, recall {recall:.3f}" in page
    assert "±2 tokens around each seed" in page and "a on forget+retain, b on retain" in page
    assert page.count(" gold\"") == int(is_gold[:-1].sum())  # gold spans marked, the hidden EOS aside


def test_gather_runs_labels_each_model_by_the_keys_it_depends_on(tmp_path):
    for i, gamma in enumerate((0.3, 0.7)):
        for stage, section, key, value in (("masks", "masks", "gamma", gamma), ("unlearn", "unlearn", "seed", i)):
            (tmp_path / stage / f"{stage}{i}").mkdir(parents=True)
            (tmp_path / stage / f"{stage}{i}" / "manifest.json").write_text(
                json.dumps({"config": {section: {key: value}}})
            )
        evaluate = tmp_path / "evaluate" / f"eval{i}"
        evaluate.mkdir(parents=True)
        metrics = _metrics({"su": {"forget_quality": 0.1 * (i + 1), "model_utility": 0.5},
                            "graddiff": {"forget_quality": 0.05, "model_utility": 0.4}})
        write_table(metrics, evaluate / "metrics.parquet")
        upstream = {"masks": f"masks{i}", "unlearn": f"unlearn{i}"}
        (evaluate / "manifest.json").write_text(json.dumps({"upstream": upstream}))
    runs = gather_runs(tmp_path)
    assert [r.label for r in runs] == ["γ=0.3 seed=0", "γ=0.7 seed=1"]
    assert [r.labels for r in runs] == [{"su": "γ=0.3 seed=0", "graddiff": "seed=0"},
                                        {"su": "γ=0.7 seed=1", "graddiff": "seed=1"}]  # graddiff ignores γ
    assert runs[1].metrics["su"]["forget_quality"] == pytest.approx(0.2)
    assert plot_pareto(runs, tmp_path / "all.png")


def test_report_command_needs_an_evaluate_artifact(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["report", "--preset", "micro", "--artifacts", str(tmp_path)]) == 2
    assert "run `sunlearn run` first" in capsys.readouterr().err


def test_muse_results_table(tmp_path: Path):
    write_reports(tmp_path, {}, _metrics({"su": {"knowmem_r": 0.4, "verbmem_f": 0.1, "privleak": -3.0}}))
    text = (tmp_path / "results.md").read_text()
    assert "| model | verbmem_f | knowmem_r | privleak |" in text
    assert "| su | 0.100 | 0.400 | -3.00 |" in text
