"""Ranking unlabelled images for labelling: which images would teach a model most.

Pure functions on probabilities and embeddings, so each score can be checked by hand.
Every score is *higher = ask first*:

- ``least-confidence``: ``1 - max_k p_k``;
- ``margin``: ``1 - (p_(1) - p_(2))``, one minus the gap between the two most probable classes;
- ``entropy``: ``-sum_k p_k log p_k`` (nats);
- ``tta-bald`` and ``ensemble-bald``: the mutual information between the label and the
  member (a D4 view of the image, or a model of an ensemble such as the fold models of a
  cross-validation): ``H(mean_m p_m) - mean_m H(p_m)``, the BALD score (Houlsby et al.
  2011) with views or models as the members. It is high where the members disagree, not
  where each of them is unsure;
- ``k-center``: diversity, k-centre greedy on the embeddings (Sener and Savarese 2018):
  each pick is the image farthest from every image already chosen or labelled; its score
  is that distance;
- ``hybrid``: the ``top_factor x budget`` images of highest entropy, then k-centre greedy
  within them (uncertain, and not all alike); its score is the entropy;
- ``random``: a seeded uniform order, the baseline every strategy is judged against.

Multi-label tasks (independent sigmoids) score each class as a two-class problem and
average over classes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from cellclass.errors import RankingError

STRATEGIES: dict[str, str] = {
    "least-confidence": "1 - the highest probability",
    "margin": "1 - (highest - second highest probability)",
    "entropy": "entropy of the probabilities (nats)",
    "tta-bald": "disagreement of the 8 D4 views: mutual information (BALD)",
    "ensemble-bald": "disagreement of the models of an ensemble (CV folds): mutual information (BALD)",
    "k-center": "diversity: k-centre greedy on the embeddings",
    "hybrid": "the top_factor x budget most uncertain (entropy), then k-centre greedy within them",
    "random": "a seeded uniform order (the baseline)",
}
"""Strategy name to what it ranks by."""
UNCERTAINTY = ("least-confidence", "margin", "entropy")
DISAGREEMENT = {"tta-bald": "views", "ensemble-bald": "members"}
_EPS = 1e-12


@dataclass
class Ranking:
    """Images chosen for labelling, in the order to ask.

    Attributes:
        order: Positions into the pool, first = ask first.
        scores: Each chosen image's score (higher = ask first; see the module's list).
        strategy: The strategy that chose them.
    """

    order: np.ndarray
    scores: np.ndarray
    strategy: str


def check_strategy(strategy: str) -> str:
    """``strategy`` when it is one of :data:`STRATEGIES`.

    Raises:
        RankingError: When it is not; the message lists the valid ones.
    """
    if strategy not in STRATEGIES:
        raise RankingError(f"strategy {strategy!r} is unknown; valid: {', '.join(STRATEGIES)}")
    return strategy


def check_budget(budget: int) -> int:
    """``budget`` when it is a whole number of images, at least 1.

    Raises:
        RankingError: When it is not.
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise RankingError(f"budget {budget!r} is invalid; valid: a whole number of images >= 1")
    return int(budget)


# -- uncertainty of one model ----------------------------------------------------------------
def _per_class(p: np.ndarray, multilabel: bool) -> np.ndarray:
    """``(..., N, K)`` probabilities as ``(..., N, G, C)``: one distribution of ``C`` classes per
    ``G`` problems (one ``K``-class problem; ``K`` two-class problems for multi-label)."""
    p = np.asarray(p, dtype=np.float64)
    if p.ndim < 2 or p.shape[-1] < (1 if multilabel else 2):
        raise RankingError(f"probabilities of shape {p.shape} are invalid; valid: (N, K) with K >= 2 classes "
                           "(K >= 1 for a multi-label task)")
    if not np.isfinite(p).all() or p.min(initial=0.0) < 0 or p.max(initial=0.0) > 1 + 1e-6:
        raise RankingError("probabilities hold values outside [0, 1] or non-finite ones; valid: probabilities")
    if multilabel:
        return np.stack([1.0 - p, p], axis=-1)
    return p[..., None, :]


def _entropy(dist: np.ndarray) -> np.ndarray:
    """Entropy (nats) over the last axis, with ``0 log 0 = 0``."""
    return -(dist * np.log(np.clip(dist, _EPS, None))).sum(axis=-1)


def least_confidence(p: np.ndarray, multilabel: bool = False) -> np.ndarray:
    """``1 - max_k p_k`` per image, ``(N,)``."""
    return (1.0 - _per_class(p, multilabel).max(axis=-1)).mean(axis=-1)


def margin(p: np.ndarray, multilabel: bool = False) -> np.ndarray:
    """``1 - (p_(1) - p_(2))`` per image, ``(N,)``: 1 when the two best classes tie."""
    top = np.sort(_per_class(p, multilabel), axis=-1)
    return (1.0 - (top[..., -1] - top[..., -2])).mean(axis=-1)


def entropy(p: np.ndarray, multilabel: bool = False) -> np.ndarray:
    """Entropy of the probabilities per image (nats), ``(N,)``."""
    return _entropy(_per_class(p, multilabel)).mean(axis=-1)


def mutual_information(members: np.ndarray, multilabel: bool = False) -> np.ndarray:
    """BALD: ``H(mean_m p_m) - mean_m H(p_m)`` per image, ``(N,)``, from ``(M, N, K)`` probabilities.

    Zero where every member gives the same probabilities; at most ``log K`` (``log 2`` per
    class for multi-label).

    Raises:
        RankingError: When fewer than two members are given.
    """
    members = np.asarray(members, dtype=np.float64)
    if members.ndim != 3 or members.shape[0] < 2:
        raise RankingError(f"disagreement needs (M, N, K) probabilities of M >= 2 members (views or models); "
                           f"got shape {members.shape}")
    dist = _per_class(members, multilabel)
    total = _entropy(dist.mean(axis=0))
    expected = _entropy(dist).mean(axis=0)
    return np.clip(total - expected, 0.0, None).mean(axis=-1)


def uncertainty(strategy: str, p: np.ndarray, multilabel: bool = False) -> np.ndarray:
    """The score of ``least-confidence``, ``margin`` or ``entropy`` per image."""
    return {"least-confidence": least_confidence, "margin": margin, "entropy": entropy}[strategy](p, multilabel)


# -- diversity -------------------------------------------------------------------------------
def k_center_greedy(features: np.ndarray, budget: int,
                    labelled: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k-centre greedy: pick ``budget`` rows of ``features``, each the farthest from those picked.

    The distance of a row to the centres is its Euclidean distance to the nearest of the rows
    picked so far and of ``labelled``. With nothing labelled, the first pick is the row
    farthest from the mean of ``features``.

    Args:
        features: ``(N, D)`` embeddings of the candidates.
        budget: Rows to pick (all ``N`` when larger).
        labelled: ``(L, D)`` embeddings of images already labelled (centres from the start).

    Returns:
        The picked positions, in pick order, and each one's distance to the centres when picked.
    """
    budget = check_budget(budget)
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise RankingError(f"embeddings of shape {x.shape} are invalid; valid: (N, D)")
    n = len(x)
    nearest = np.full(n, np.inf)
    for centre in np.asarray(labelled if labelled is not None else np.zeros((0, x.shape[1])), dtype=np.float64):
        nearest = np.minimum(nearest, np.linalg.norm(x - centre, axis=1))
    # with no centre yet, the mean stands in for one: for the first pick only
    first = np.linalg.norm(x - x.mean(axis=0), axis=1) if n and np.isinf(nearest).all() else nearest
    order, scores = [], []
    for _ in range(min(budget, n)):
        pick = int(np.argmax(first if not order else nearest))  # the first of equals: deterministic
        order.append(pick)
        scores.append(float((first if len(order) == 1 else nearest)[pick]))
        nearest = np.minimum(nearest, np.linalg.norm(x - x[pick], axis=1))
        nearest[pick] = -np.inf  # never picked twice, even where rows coincide
    return np.asarray(order, dtype=np.int64), np.asarray(scores, dtype=np.float64)


def top(scores: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` highest scores, highest first; equal scores in position order."""
    return np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:k]


def hybrid(scores: np.ndarray, features: np.ndarray, budget: int, *, top_factor: int = 4,
           labelled: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_factor x budget`` highest ``scores``, then k-centre greedy among them.

    Returns:
        The picked positions (into all rows), in pick order, and their ``scores``.
    """
    budget = check_budget(budget)
    if isinstance(top_factor, bool) or not isinstance(top_factor, (int, np.integer)) or top_factor < 1:
        raise RankingError(f"top_factor {top_factor!r} is invalid; valid: a whole number >= 1")
    candidates = top(scores, top_factor * budget)
    picked, _ = k_center_greedy(np.asarray(features)[candidates], budget, labelled)
    order = candidates[picked]
    return order, np.asarray(scores, dtype=np.float64)[order]


# -- one call per strategy -------------------------------------------------------------------
def rank_images(strategy: str, budget: int, *, probabilities: np.ndarray | None = None, multilabel: bool = False,
                views: np.ndarray | None = None, members: np.ndarray | None = None,
                features: np.ndarray | None = None, labelled: np.ndarray | None = None,
                top_factor: int = 4, seed: int = 0) -> Ranking:
    """The ``budget`` images to label first by ``strategy`` (see the module's list).

    Args:
        strategy: One of :data:`STRATEGIES`.
        budget: Images to choose (all when the pool is smaller).
        probabilities: ``(N, K)`` probabilities of the scored task (uncertainty, hybrid).
        multilabel: Whether the task is multi-label (independent sigmoids).
        views: ``(8, N, K)`` probabilities of each D4 view (``tta-bald``).
        members: ``(M, N, K)`` probabilities of each model of an ensemble (``ensemble-bald``).
        features: ``(N, D)`` embeddings (``k-center``, ``hybrid``).
        labelled: ``(L, D)`` embeddings of already labelled images (``k-center``, ``hybrid``).
        top_factor: How many times ``budget`` uncertain images ``hybrid`` diversifies among.
        seed: Seed of ``random``.

    Raises:
        RankingError: When the strategy or budget is invalid or an input it needs is missing.
    """
    check_strategy(strategy)
    budget = check_budget(budget)
    given = {"probabilities": probabilities, "views": views, "members": members, "features": features}
    needs = {"k-center": ["features"], "hybrid": ["probabilities", "features"], "random": [],
             **{s: ["probabilities"] for s in UNCERTAINTY}, **{s: [k] for s, k in DISAGREEMENT.items()}}[strategy]
    missing = [k for k in needs if given[k] is None]
    if missing:
        raise RankingError(f"strategy {strategy!r} needs {' and '.join(missing)}; got none")
    n = _pool_size(given)
    if strategy == "random":
        draws = np.random.default_rng(seed).random(n)
        order = top(draws, budget)
        return Ranking(order, draws[order], strategy)
    if strategy == "k-center":
        order, scores = k_center_greedy(features, budget, labelled)
        return Ranking(order, scores, strategy)
    if strategy == "hybrid":
        order, scores = hybrid(entropy(probabilities, multilabel), features, budget, top_factor=top_factor,
                               labelled=labelled)
        return Ranking(order, scores, strategy)
    if strategy in DISAGREEMENT:
        scores = mutual_information(given[DISAGREEMENT[strategy]], multilabel)
    else:
        scores = uncertainty(strategy, probabilities, multilabel)
    order = top(scores, budget)
    return Ranking(order, scores[order], strategy)


def _pool_size(given: Mapping[str, np.ndarray | None]) -> int:
    """The number of pool images the inputs describe (they must agree).

    Raises:
        RankingError: When they disagree, or nothing describes the pool.
    """
    sizes = {k: (np.asarray(v).shape[1] if k in ("views", "members") else len(v))
             for k, v in given.items() if v is not None}
    if not sizes:
        raise RankingError("nothing describes the pool: give probabilities or features")
    if len(set(sizes.values())) > 1:
        raise RankingError(f"the inputs describe pools of different sizes: {sizes}; valid: one row per pool image")
    return next(iter(sizes.values()))
