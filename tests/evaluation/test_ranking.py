"""Ranking for labelling: every score on cases small enough to compute by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cellclass.errors import RankingError
from cellclass.evaluation.ranking import (
    STRATEGIES,
    check_budget,
    entropy,
    hybrid,
    k_center_greedy,
    least_confidence,
    margin,
    mutual_information,
    rank_images,
    top,
)

P = np.array([[1.0, 0.0, 0.0],      # certain
              [0.5, 0.5, 0.0],      # a tie of two classes
              [1 / 3, 1 / 3, 1 / 3],  # uniform
              [0.7, 0.2, 0.1]])


def test_least_confidence_is_one_minus_the_top_probability() -> None:
    np.testing.assert_allclose(least_confidence(P), [0.0, 0.5, 2 / 3, 0.3])


def test_margin_is_one_minus_the_gap_of_the_two_best() -> None:
    np.testing.assert_allclose(margin(P), [0.0, 1.0, 1.0, 0.5])


def test_entropy_in_nats_with_zero_log_zero() -> None:
    expected = [0.0, math.log(2), math.log(3), -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))]
    np.testing.assert_allclose(entropy(P), expected, atol=1e-9)


def test_multilabel_scores_each_class_as_two_classes_and_averages() -> None:
    p = np.array([[0.5, 1.0], [0.9, 0.1]])
    np.testing.assert_allclose(entropy(p, multilabel=True), [math.log(2) / 2, -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))],
                               atol=1e-9)
    np.testing.assert_allclose(least_confidence(p, multilabel=True), [0.25, 0.1])
    np.testing.assert_allclose(margin(p, multilabel=True), [0.5, 0.2])


def test_mutual_information_is_zero_for_agreement_and_log2_for_confident_opposites() -> None:
    agree = np.stack([P, P, P])
    np.testing.assert_allclose(mutual_information(agree), 0.0, atol=1e-12)
    # two members, each certain, of opposite classes: H(mean) = log 2, mean H = 0
    opposite = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    np.testing.assert_allclose(mutual_information(opposite), [math.log(2)])
    # both unsure in the same way: uncertain but no disagreement
    unsure = np.array([[[0.5, 0.5]], [[0.5, 0.5]]])
    np.testing.assert_allclose(mutual_information(unsure), [0.0], atol=1e-12)


def test_mutual_information_needs_two_members() -> None:
    with pytest.raises(RankingError, match=r"M >= 2 members .*got shape \(1, 4, 3\)"):
        mutual_information(P[None])


def test_k_center_greedy_picks_the_farthest_each_time() -> None:
    x = np.array([[0.0], [1.0], [10.0], [11.0], [5.0]])  # mean 5.4
    order, distances = k_center_greedy(x, 3)
    # first: farthest from the mean (11, 5.6 away); then 0 (11 from 11); then 5 (min(5, 6) = 5)
    assert order.tolist() == [3, 0, 4]
    np.testing.assert_allclose(distances, [5.6, 11.0, 5.0])


def test_k_center_greedy_starts_from_the_labelled_images() -> None:
    x = np.array([[0.0], [1.0], [10.0]])
    order, distances = k_center_greedy(x, 2, labelled=np.array([[9.0]]))
    assert order.tolist() == [0, 1]  # 0 is 9 away from the labelled 9; then 1 is 1 from 0 (10 is 1 from 9)
    np.testing.assert_allclose(distances, [9.0, 1.0])


def test_k_center_greedy_never_picks_a_row_twice_and_stops_at_the_pool() -> None:
    order, _ = k_center_greedy(np.zeros((3, 2)), 10)
    assert sorted(order.tolist()) == [0, 1, 2]


def test_top_breaks_ties_by_position() -> None:
    assert top(np.array([0.1, 0.5, 0.5, 0.9]), 3).tolist() == [3, 1, 2]


def test_hybrid_diversifies_among_the_most_uncertain() -> None:
    scores = np.array([0.9, 0.89, 0.88, 0.1, 0.87])
    features = np.array([[0.0], [0.1], [5.0], [100.0], [0.2]])
    # top 2 x 2 = 4 uncertain: rows 0, 1, 2, 4 (row 3 is far but certain, never asked)
    order, chosen = hybrid(scores, features, 2, top_factor=2)
    # among them (mean 1.325) row 2 is farthest, then row 0 (5 from it; rows 1 and 4 are nearer)
    assert order.tolist() == [2, 0]
    np.testing.assert_allclose(chosen, scores[order])


def test_rank_images_orders_by_score_highest_first() -> None:
    ranking = rank_images("least-confidence", 2, probabilities=P)
    assert ranking.order.tolist() == [2, 1]
    np.testing.assert_allclose(ranking.scores, [2 / 3, 0.5])


def test_rank_images_tta_bald_reads_the_views() -> None:
    views = np.stack([P, P[[0, 1, 2, 3]][:, [1, 0, 2]]])  # the second view swaps classes 0 and 1
    ranking = rank_images("tta-bald", 1, probabilities=P, views=views)
    assert ranking.order.tolist() == [0]  # row 0 flips from certain class 0 to certain class 1


def test_random_is_seeded_and_a_permutation() -> None:
    a = rank_images("random", 4, probabilities=P, seed=3)
    b = rank_images("random", 4, probabilities=P, seed=3)
    assert a.order.tolist() == b.order.tolist() and sorted(a.order.tolist()) == [0, 1, 2, 3]


@pytest.mark.parametrize("budget", [0, -1, 2.5, True])
def test_budget_below_one_is_refused(budget: object) -> None:
    with pytest.raises(RankingError, match=r"budget .* is invalid; valid: a whole number of images >= 1"):
        check_budget(budget)  # type: ignore[arg-type]


def test_unknown_strategy_is_refused_with_the_valid_ones() -> None:
    with pytest.raises(RankingError, match=r"strategy 'bald' is unknown; valid: least-confidence, margin"):
        rank_images("bald", 1, probabilities=P)
    assert set(STRATEGIES) >= {"entropy", "hybrid", "k-center", "tta-bald", "ensemble-bald", "random"}


@pytest.mark.parametrize(("strategy", "missing"), [("k-center", "features"), ("ensemble-bald", "members"),
                                                   ("hybrid", "features"), ("tta-bald", "views")])
def test_a_strategy_without_its_input_says_what_it_needs(strategy: str, missing: str) -> None:
    with pytest.raises(RankingError, match=f"strategy '{strategy}' needs {missing}"):
        rank_images(strategy, 1, probabilities=P)


def test_inputs_of_different_pool_sizes_are_refused() -> None:
    with pytest.raises(RankingError, match="pools of different sizes"):
        rank_images("hybrid", 1, probabilities=P, features=np.zeros((3, 2)))


def test_probabilities_out_of_range_are_refused() -> None:
    with pytest.raises(RankingError, match=r"outside \[0, 1\]"):
        entropy(np.array([[1.5, -0.5]]))
