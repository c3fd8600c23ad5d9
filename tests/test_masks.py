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
