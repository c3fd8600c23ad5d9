"""Each TOFU and MUSE metric against a value worked out by hand on a tiny case."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from stages import metrics as M


def test_registry_holds_every_metric_by_name():
    expected = {
        "probability",
        "normalised_probability",
        "truth_ratio",
        "truth_ratio_closer_to_1",
        "truth_ratio_true_better",
        "rouge_l_recall",
        "forget_quality",
        "model_utility",
        "exact_memorization",
        "extraction_strength",
        "rouge_l_f1",
        "fact_recall",
        "min_k_percent",
        "forget_holdout_auc",
        "privleak",
    }
    assert expected <= set(M.METRIC_FUNCTIONS)
    assert M.METRIC_FUNCTIONS["truth_ratio"] is M.truth_ratio


def test_probability_is_exp_of_minus_average_nll():
    np.testing.assert_allclose(M.probability(np.array([0.0, math.log(2), math.log(10)])), [1.0, 0.5, 0.1])


def test_normalised_probability_divides_by_all_options():
    correct = np.array([math.log(2), math.log(2)])  # P = 0.5 each
    perturbed = np.array([[math.log(4), math.log(4), math.log(8)], [math.log(2), np.nan, np.nan]])
    # item 0: 0.5 / (0.5 + 0.25 + 0.25 + 0.125); item 1 has one perturbed answer: 0.5 / (0.5 + 0.5)
    np.testing.assert_allclose(M.normalised_probability(correct, perturbed), [0.5 / 1.125, 0.5], rtol=1e-8)


def test_truth_ratio_uses_geometric_mean_of_perturbed_and_both_aggregates():
    correct = np.array([1.0, 2.0])
    perturbed = np.array([[2.0, 4.0], [1.0, 1.0]])
    # item 0: exp(-mean(2, 4)) / exp(-1) = e^-2; item 1: exp(-1) / exp(-2) = e
    ratios = M.truth_ratio(correct, perturbed)
    np.testing.assert_allclose(ratios, [math.exp(-2), math.e], rtol=1e-8)
    # forget: mean(min(TR, 1/TR)) = (e^-2 + e^-1) / 2; retain: mean(max(0, 1 - TR)) = (1 - e^-2 + 0) / 2
    assert M.truth_ratio_closer_to_1(ratios) == pytest.approx((math.exp(-2) + math.exp(-1)) / 2, rel=1e-8)
    assert M.truth_ratio_true_better(ratios) == pytest.approx((1 - math.exp(-2)) / 2, rel=1e-8)


def test_truth_ratio_aggregates_skip_missing_items():
    assert M.truth_ratio_true_better(np.array([0.5, np.nan])) == pytest.approx(0.5)
    assert math.isnan(M.truth_ratio_closer_to_1(np.array([np.nan])))


def test_rouge_l_recall_is_lcs_over_reference_length():
    reference = "The cat sat on the mat."
    generation = "the cat lay on a mat"
    # reference tokens: the cat sat on the mat (6); LCS with the generation: the cat on mat (4)
    assert M.rouge_l_recall([generation], [reference])[0] == pytest.approx(4 / 6)
    # recall, not precision: extra generated words cost nothing
    assert M.rouge_l_recall(["so the cat sat on the mat today"], [reference])[0] == pytest.approx(1.0)
    # the stemmer is on: cats/cat and running/runs share stems
    assert M.rouge_l_recall(["cat runs"], ["cats running"])[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        M.rouge_l_recall(["a"], ["a", "b"])


def test_forget_quality_is_exact_ks_p_value():
    same = np.array([0.1, 0.4, 0.7, 0.9])
    assert M.forget_quality(same, same) == pytest.approx(1.0)
    # fully separated samples of size n: D = 1, reached by 2 of the C(2n, n) equally likely orderings
    for n in (3, 4, 5):
        low, high = np.arange(n) / 10, 1 + np.arange(n) / 10
        assert M.forget_quality(low, high) == pytest.approx(2 / math.comb(2 * n, n), rel=1e-9)
    assert math.isnan(M.forget_quality(np.array([np.nan]), same))


def test_model_utility_is_harmonic_mean_and_zero_if_any_input_is_zero():
    assert M.model_utility([1.0, 0.5, 0.25]) == pytest.approx(3 / (1 + 2 + 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no divide-by-zero warning leaks from scipy
        assert M.model_utility([0.9] * 8 + [0.0]) == 0.0
    assert math.isnan(M.model_utility([0.5, math.nan]))


def test_exact_memorisation_and_extraction_strength():
    hits = [np.array([True, False, True, True]), np.array([True, True, True]), np.array([True, True, False])]
    np.testing.assert_allclose(M.exact_memorization(hits), [0.75, 1.0, 2 / 3])
    # k* = 2, 0, 3 → 1 - k*/|y|; with no matching suffix open-unlearning's k* stops at |y| - 1
    np.testing.assert_allclose(M.extraction_strength(hits), [0.5, 1.0, 1 / 3])


def test_rouge_l_f1_is_harmonic_mean_of_lcs_precision_and_recall():
    # reference: the cat sat on the mat (6 words); generation: the cat lay on a mat (6); LCS: the cat on mat (4)
    assert M.rouge_l_f1(["the cat lay on a mat"], ["The cat sat on the mat."])[0] == pytest.approx(4 / 6)
    # generation: so the cat sat on the mat today (8 words), LCS 6: P = 6/8, R = 1, F1 = 2PR/(P+R) = 6/7
    assert M.rouge_l_f1(["so the cat sat on the mat today"], ["The cat sat on the mat."])[0] == pytest.approx(6 / 7)
    # a KnowMem answer: "Lisbon" against "Lisbon, Portugal": P = 1, R = 1/2, F1 = 2/3
    assert M.rouge_l_f1(["Lisbon"], ["Lisbon, Portugal"])[0] == pytest.approx(2 / 3)
    assert M.rouge_l_f1([""], ["Lisbon"])[0] == 0.0


def test_fact_words_from_gold_spans_drop_the_name_asked_about():
    answer = "Ana Reyes was born in Lisbon in the year 1961."
    spans = [{"start": 0, "end": 9}, {"start": 22, "end": 28}, {"start": 41, "end": 45}]  # name, city, year
    assert answer[22:28] == "Lisbon" and answer[41:45] == "1961"
    assert M.fact_words_from_spans(answer, spans, "Where was Ana Reyes born?") == ["lisbon", "1961"]


def test_fact_words_from_perturbed_answers_are_the_swapped_words_that_the_answer_has():
    answer = "Ana Reyes writes mystery novels in Lisbon."
    paraphrased = "Ana Reyes is known for mystery novels set in Lisbon."
    perturbed = [
        "Ana Reyes is known for horror novels set in Lisbon.",
        "Ana Reyes is known for mystery novels set in Oslo.",
    ]
    # words of the paraphrase missing from some perturbed answer: mystery, lisbon; both are in the answer
    assert M.fact_words_from_perturbed(answer, paraphrased, perturbed) == ["mysteri", "lisbon"]
    assert M.fact_words_from_perturbed(answer, paraphrased, []) == []


def test_fact_recall_counts_fact_words_the_generation_reproduces():
    facts = [["lisbon", "1961"], ["mysteri"], []]
    generations = ["She was born in Lisbon.", "She writes mysteries.", "anything"]
    recall = M.fact_recall(generations, facts)
    np.testing.assert_allclose(recall[:2], [0.5, 1.0])  # stems match: mysteries -> mysteri
    assert math.isnan(recall[2])  # no fact words: no score
    with pytest.raises(ValueError):
        M.fact_recall(["a"], [])


def test_min_k_percent_averages_the_lowest_forty_percent():
    # 5 tokens: int(5 * 0.4) = 2 lowest log-probs, -5 and -4: score 4.5
    scores = M.min_k_percent([np.array([-1.0, -2.0, -3.0, -4.0, -5.0]), np.array([-0.5, -0.1]), np.array([])])
    assert scores[0] == pytest.approx(4.5)
    assert scores[1] == pytest.approx(0.5)  # int(2 * 0.4) = 0: at least one token counts
    assert math.isnan(scores[2])


def test_forget_holdout_auc_and_privleak():
    # forget texts score lower (better known) than every holdout text: AUC 1 with holdout as the positive class
    assert M.forget_holdout_auc(np.array([1.0, 2.0]), np.array([3.0, 4.0])) == pytest.approx(1.0)
    # of the four (forget, holdout) pairs only (2, 3) has the holdout text scoring higher: AUC 1/4
    assert M.forget_holdout_auc(np.array([2.0, 4.0]), np.array([1.0, 3.0])) == pytest.approx(1 / 4)
    assert M.forget_holdout_auc(np.array([3.0, 4.0]), np.array([1.0, 2.0])) == pytest.approx(0.0)
    # the same AUC as the retain model: no leak
    assert M.privleak(0.7, 0.7) == pytest.approx(0.0)
    # AUC 0.9 against a retain AUC of 0.5: ((0.1) - (0.5)) / 0.5 * 100 = -80 (under-unlearned direction)
    assert M.privleak(0.9, 0.5) == pytest.approx(-80.0)
    assert M.privleak(0.25, 0.5) == pytest.approx(50.0)
    assert math.isnan(M.privleak(0.5, math.nan))
