"""Each TOFU metric against a value worked out by hand on a tiny case."""

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
        "exact_memorisation",
        "extraction_strength",
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
    np.testing.assert_allclose(M.exact_memorisation(hits), [0.75, 1.0, 2 / 3])
    # k* = 2, 0, 3 → 1 - k*/|y|
    np.testing.assert_allclose(M.extraction_strength(hits), [0.5, 1.0, 0.0])
