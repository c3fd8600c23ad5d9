"""Mask building: widening at document edges, between neighbours, and the adaptive threshold."""

import numpy as np
import pyarrow as pa
import pytest

from schemas import read_table, write_table
from stages.config import load_config
from stages.masks import answer_segments, build_masks, document_starts, otsu_threshold, widen


def _one_doc(in_answer, seed, window):
    segment = answer_segments(np.array([0]), np.array(in_answer, bool))
    return widen(np.array(seed, bool), segment, window).astype(int).tolist()


def test_widen_is_symmetric_in_the_middle():
    assert _one_doc([1] * 9, [0, 0, 0, 0, 1, 0, 0, 0, 0], 2) == [0, 0, 1, 1, 1, 1, 1, 0, 0]


def test_widen_clips_at_document_edges():
    assert _one_doc([1] * 6, [1, 0, 0, 0, 0, 1], 2) == [1, 1, 1, 1, 1, 1]
    assert _one_doc([1] * 7, [1, 0, 0, 0, 0, 0, 0], 2) == [1, 1, 1, 0, 0, 0, 0]


def test_widen_stays_inside_the_answer():
    # prompt tokens (0) never get selected, even next to a seed at the answer's first token
    assert _one_doc([0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0, 0, 0], 2) == [0, 0, 0, 1, 1, 1, 0, 0]


def test_neighbouring_selections_merge_and_gaps_stay():
    assert _one_doc([1] * 12, [0, 1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1], 1) == [1, 1, 1, 0, 1, 1, 1, 0, 0, 0, 1, 1]
    # gap of exactly 2*window+1 between seeds is bridged completely
    assert _one_doc([1] * 7, [1, 0, 0, 0, 0, 0, 1], 3) == [1] * 7


def test_window_does_not_cross_documents():
    in_answer = np.ones(6, bool)
    seed = np.array([0, 0, 1, 0, 0, 0], bool)
    segment = answer_segments(document_starts(np.array([0, 1, 2, 0, 1, 2])), in_answer)
    assert widen(seed, segment, 2).astype(int).tolist() == [1, 1, 1, 0, 0, 0]


def test_document_without_answer_tokens_selects_nothing():
    assert _one_doc([0, 0, 0], [0, 0, 0], 2) == [0, 0, 0]


def test_unsorted_scores_are_refused():
    with pytest.raises(ValueError, match="not sorted"):
        document_starts(np.array([0, 1, 3, 0]))


def test_window_zero_keeps_only_seeds():
    seed = [0, 1, 0, 1, 1, 0]
    assert _one_doc([1] * 6, seed, 0) == seed


def test_otsu_finds_the_valley_between_two_modes():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.uniform(0.0, 0.2, 5000), rng.uniform(0.7, 0.9, 500)])
    assert 0.2 <= otsu_threshold(values) <= 0.7


def _scores_table(tmp_path):
    diff = [0.0, 0.1, 0.9, 0.2, 0.1, 0.0, 0.6, 0.0, 0.0, 0.95]
    table = pa.table({
        "doc_id": ["d0"] * 6 + ["d1"] * 4,
        "position": [0, 1, 2, 3, 4, 5, 0, 1, 2, 3],
        "token_id": list(range(10)),
        "p_a": diff,
        "p_b": [0.0] * 10,
        "score_diff": diff,
        "in_answer": [False, True, True, True, True, True, False, False, True, True],
        "gold": [None, False, True, False, False, False, None, None, False, True],
    })
    (tmp_path / "scores").mkdir()
    write_table(table, tmp_path / "scores" / "token_scores.parquet")


def test_build_masks_writes_selection_and_stats(tmp_path):
    _scores_table(tmp_path)
    out = tmp_path / "masks"
    out.mkdir()
    cfg = load_config("micro", overrides=["masks.gamma=0.5", "masks.window=1"])
    stats = build_masks(cfg, {"scores": tmp_path / "scores"}, out)
    masks = read_table(out / "masks.parquet").to_pydict()
    # d0: seed at 2 widens to 1..3; d1: 0.6 is a prompt token (ignored), seed at 3 widens to 2..3
    assert masks["selected"] == [False, True, True, True, False, False, False, False, True, True]
    assert stats["tokens_selected"] == 5 and stats["seed_tokens"] == 2
    assert stats["precision"] == pytest.approx(2 / 5) and stats["recall"] == pytest.approx(1.0)
    per_doc = read_table(out / "mask_doc_stats.parquet").to_pydict()
    assert per_doc["selected_fraction"] == pytest.approx([3 / 5, 2 / 2])


def test_gamma_that_selects_nothing_is_recorded(tmp_path, caplog):
    _scores_table(tmp_path)
    out = tmp_path / "masks"
    out.mkdir()
    stats = build_masks(load_config("micro", overrides=["masks.gamma=0.99"]), {"scores": tmp_path / "scores"}, out)
    assert stats["tokens_selected"] == 0
    assert stats["warning"] == "no tokens selected"
    assert "selects no tokens" in caplog.text


def _probabilities_table(tmp_path, p_a, p_b, gold):
    """One document: a prompt token, then answer tokens with the given assistant probabilities."""
    n = len(p_a) + 1
    table = pa.table({
        "doc_id": ["d0"] * n,
        "position": list(range(n)),
        "token_id": list(range(n)),
        "p_a": [0.5, *p_a],
        "p_b": [0.5, *p_b],
        "score_diff": np.abs(np.array([0.5, *p_a]) - np.array([0.5, *p_b])),
        "in_answer": [False] + [True] * (n - 1),
        "gold": [None, *gold],
    })
    (tmp_path / "scores").mkdir()
    write_table(table, tmp_path / "scores" / "token_scores.parquet")


def test_log_ratio_selects_a_fact_both_assistants_find_unlikely(tmp_path):
    # token 1 differs by 0.019 in probability but 20x in ratio; token 2 by 0.3 in probability, 1.6x in ratio
    _probabilities_table(tmp_path, p_a=[0.02, 0.8, 0.4], p_b=[0.001, 0.5, 0.4], gold=[True, False, False])
    out = tmp_path / "masks"
    out.mkdir()
    overrides = ["masks.window=0", "masks.gamma=1.0", "masks.score=log_ratio"]
    stats = build_masks(load_config("micro", overrides=overrides), {"scores": tmp_path / "scores"}, out)
    assert read_table(out / "masks.parquet")["selected"].to_pylist() == [False, True, False, False]
    assert stats["score"] == "log_ratio" and stats["precision"] == 1.0
    by_diff = build_masks(load_config("micro", overrides=["masks.window=0", "masks.gamma=0.1"]),
                          {"scores": tmp_path / "scores"}, out)
    assert read_table(out / "masks.parquet")["selected"].to_pylist() == [False, False, True, False]
    assert by_diff["precision"] == 0.0


def _small_differences(rng, n_template=1000, n_fact=1000, n_sharp=200):
    """Scores like the embedded set's 5-gram pair: templates near 0, most facts a few hundredths apart, some near 1."""
    template = 10 ** rng.uniform(-4, -2.7, n_template)
    fact = 10 ** rng.uniform(-2.3, -0.5, n_fact)
    sharp = rng.uniform(0.85, 1.0, n_sharp)
    gold = np.concatenate([np.zeros(n_template, bool), np.ones(n_fact + n_sharp, bool)])
    return np.concatenate([template, fact, sharp]), gold


def test_auto_on_a_log_axis_finds_the_small_threshold_that_selects_better():
    from stages.masks import auto_threshold, precision_recall

    values, gold = _small_differences(np.random.default_rng(0))
    linear = auto_threshold(values, "prob_diff", "linear")
    log = auto_threshold(values, "prob_diff", "log")
    assert linear > 0.1  # the split between near-0 and near-1 differences: it misses most facts
    assert 10**-2.7 <= log <= 0.01  # near the valley between templates and facts
    f1 = {}
    for name, gamma in (("linear", linear), ("log", log)):
        p, r = precision_recall(values > gamma, gold)
        f1[name] = 2 * p * r / (p + r)
    assert f1["log"] > 0.9 and f1["linear"] < 0.5


@pytest.mark.parametrize("scale", ["linear", "log"])
def test_auto_works_on_the_log_ratio(tmp_path, scale):
    rng = np.random.default_rng(1)
    # templates: ratios within 1 ± 0.002; facts: p_a 3-30x p_b
    p_b = rng.uniform(0.01, 0.2, 400)
    fact = np.arange(400) % 4 == 0
    p_a = np.where(fact, p_b * 10 ** rng.uniform(0.5, 1.5, 400), p_b * rng.uniform(0.998, 1.002, 400)).clip(max=1)
    _probabilities_table(tmp_path, p_a.tolist(), p_b.tolist(), fact.tolist())
    out = tmp_path / "masks"
    out.mkdir()
    cfg = load_config("micro", overrides=["masks.window=0", "masks.score=log_ratio", f"masks.auto_scale={scale}"])
    stats = build_masks(cfg, {"scores": tmp_path / "scores"}, out)
    assert 0.002 < stats["gamma"] < np.log(3)  # above every template ratio, below every fact ratio
    assert stats["gamma_rule"] == ("otsu" if scale == "linear" else "otsu_log")
    assert stats["precision"] == 1.0 and stats["recall"] == 1.0
