"""Train/validation/test splits and k-folds that keep groups (plates, wells) on one side.

Cells of one plate share its staining, focus and background, so a model can learn to
recognise the plate. A random image-level split then rewards plate recognition: the
same plate sits on both sides. Where a dataset declares groups, every split here keeps
each group whole on one side, stratified by class where that is possible, and records
how it was made (:meth:`Split.describe`), which goes verbatim into every ``metrics.json``.

Stratified group folds balance classes only approximately: a class held by a few large
groups can miss a side altogether (MitoCheck's OutOfFocus, 7 plates, drew no validation
plate). After a group split is drawn, every class found in at least as many groups as
there are sides gets a group on each side: whole groups move from train to validation
(or to test, or back to train), the test side only changing where it lacks a class itself
or no other side can spare a group. Each move is recorded in :attr:`Split.moves`.

Positions returned are integer positions (``iloc``) into the manifest frame, sorted.
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from iterstrat.ml_stratifiers import (
    MultilabelStratifiedKFold,
    MultilabelStratifiedShuffleSplit,
)
from sklearn.model_selection import (
    GroupKFold,
    KFold,
    ShuffleSplit,
    StratifiedGroupKFold,
    StratifiedKFold,
    StratifiedShuffleSplit,
)

from cellclass.data.spec import ROW_COLUMN
from cellclass.errors import SplitError

log = logging.getLogger(__name__)

METHODS = ("group", "random", "predefined")
"""Split methods: keep groups whole, image-level (stratified), or from a split column."""

SPLIT_VALUES = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
"""Accepted values of a predefined split column (case-insensitive) and the side they mean."""

RANDOM_ON_GROUPS_WARNING = (
    "random image-level split of grouped data: cells of one plate land on both sides, "
    "so the score can reward plate recognition"
)

_SIDES = ("train", "val", "test")
_EMPTY = np.zeros(0, dtype=np.int64)
_SIDE_WORDS = {"train": "training", "val": "validation", "test": "test"}
_DONORS = {"test": ("train", "val"), "val": ("train", "test"), "train": ("val", "test")}
"""Sides a group may come from to give a side a class it lacks, in order of preference:
test gives only where no other side can spare one, so test figures stay comparable."""


@dataclass
class Split:
    """Row positions of each side of a split and how they were chosen.

    Attributes:
        train: Sorted ``int64`` positions into the manifest frame.
        val: Sorted positions of the validation side (may be empty).
        test: Sorted positions of the test side (may be empty).
        method: ``group``, ``random`` or ``predefined``.
        group: Group column the split kept whole (or carved validation by), if any.
        seed: Random seed the split was drawn with.
        fractions: Requested ``val`` and ``test`` fractions of all rows.
        groups: Group value of every row (used by :meth:`describe`), if known.
        labels: Labels the split was stratified on (used by :meth:`describe`), if any.
        moves: Groups moved after the draw so that a class is on every side, in order:
            ``group``, ``images`` (its rows), ``class_images`` (its rows of the class),
            ``from``, ``to`` and ``class`` (name, or index where names were not given).
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    method: str
    group: str | None = None
    seed: int = 0
    fractions: dict[str, float] = field(default_factory=dict)
    groups: np.ndarray | None = field(default=None, repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)
    moves: list[dict[str, Any]] = field(default_factory=list)

    def side(self, name: str) -> np.ndarray:
        """Positions of side ``train``, ``val`` or ``test``."""
        if name not in _SIDES:
            raise SplitError(f"split side {name!r} is invalid; valid: {', '.join(_SIDES)}")
        return getattr(self, name)

    @property
    def n_rows(self) -> int:
        """Number of rows over all sides."""
        return int(len(self.train) + len(self.val) + len(self.test))

    def describe(
        self,
        labels: np.ndarray | Mapping[str, np.ndarray] | None = None,
        classes: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    ) -> dict[str, Any]:
        """JSON-ready record of how the split was made and what each side holds.

        Args:
            labels: Encoded labels of every row, one array (single ``(N,)`` or
                multi-label ``(N, K)``) or a mapping task → array; defaults to the
                labels the split was stratified on.
            classes: Class names, a list for one array or a mapping task → list;
                class indices are used where absent.

        Returns:
            ``method``, ``group_column``, ``seed``, ``requested_fractions``, ``sizes``
            and achieved ``fractions`` per side, ``groups`` (number per side),
            ``groups_overlap`` and ``overlapping_groups`` (``None`` without groups),
            ``moved_groups`` (:attr:`moves`, each with its ``note``), and ``class_counts``
            per side when labels are known (per task for a mapping).
        """
        n = max(self.n_rows, 1)
        out: dict[str, Any] = {
            "method": self.method,
            "group_column": self.group,
            "seed": int(self.seed),
            "requested_fractions": {k: float(v) for k, v in self.fractions.items()},
            "sizes": {s: int(len(self.side(s))) for s in _SIDES},
            "fractions": {s: round(len(self.side(s)) / n, 4) for s in _SIDES},
            "groups": None,
            "groups_overlap": None,
            "overlapping_groups": None,
            "moved_groups": [{**m, "note": n} for m, n in zip(self.moves, self.move_notes(), strict=True)],
        }
        if self.groups is not None:
            per_side = {s: set(np.asarray(self.groups)[self.side(s)].tolist()) for s in _SIDES}
            shared = (
                (per_side["train"] & per_side["val"])
                | (per_side["train"] & per_side["test"])
                | (per_side["val"] & per_side["test"])
            )
            out["groups"] = {s: len(g) for s, g in per_side.items()}
            out["groups_overlap"] = bool(shared)
            out["overlapping_groups"] = len(shared)
        labels = self.labels if labels is None else labels
        if isinstance(labels, Mapping):
            names = classes if isinstance(classes, Mapping) else {}
            out["class_counts"] = {
                task: self._class_counts(np.asarray(y), names.get(task))
                for task, y in labels.items()
            }
        elif labels is not None:
            out["class_counts"] = self._class_counts(
                np.asarray(labels), None if isinstance(classes, Mapping) else classes
            )
        return out

    def move_notes(self) -> list[str]:
        """One sentence per moved group, e.g. ``moved plate P7 (47 images) from training to
        validation so OutOfFocus is represented``."""
        what = self.group or "group"
        return [
            f"moved {what} {m['group']} ({m['images']} images, {m['class_images']} of class {m['class']}) "
            f"from {_SIDE_WORDS[m['from']]} to {_SIDE_WORDS[m['to']]} so {m['class']} is represented "
            f"on the {_SIDE_WORDS[m['to']]} side"
            for m in self.moves
        ]

    def _class_counts(
        self, labels: np.ndarray, classes: Sequence[str] | None
    ) -> dict[str, dict[str, int]]:
        # A split may leave rows out (a cross-validation's held-out test), never index past the labels.
        reach = max((int(self.side(s).max()) + 1 for s in _SIDES if len(self.side(s))), default=0)
        if len(labels) < max(self.n_rows, reach):
            raise SplitError(
                f"labels have {len(labels)} rows but the split covers {self.n_rows} (positions up to "
                f"{reach - 1}); pass the labels of the whole frame"
            )
        if labels.ndim == 2:
            k = labels.shape[1]
        else:
            k = int(labels.max()) + 1 if len(labels) else 0
        if classes is not None:
            k = max(k, len(classes))
        names = [
            str(classes[i]) if classes is not None and i < len(classes) else str(i)
            for i in range(k)
        ]
        out: dict[str, dict[str, int]] = {}
        for s in _SIDES:
            y = labels[self.side(s)]
            if labels.ndim == 2:
                counts = np.asarray(y, dtype=np.int64).sum(axis=0) if len(y) else np.zeros(k, int)
                out[s] = {names[i]: int(counts[i]) for i in range(k)}
            else:
                counts = np.bincount(y[y >= 0].astype(np.int64), minlength=k)
                out[s] = {names[i]: int(counts[i]) for i in range(k)}
                if (y < 0).any():
                    out[s]["(no label)"] = int((y < 0).sum())
        return out


def choose_split_method(
    spec_groups: Sequence[str],
    split_by: str | None,
    split: str | None,
    *,
    split_column: str | None = None,
) -> tuple[str, str | None, str | None]:
    """Decide how to split from the spec and the command line.

    Rules, in order: ``split_by`` (``--split-by COL``) forces a group split by that
    column; ``split`` (``--split``) is obeyed, a ``random`` split of grouped data with a
    warning; with neither, a spec's split column gives a ``predefined`` split (validation
    carved by the first group where the column has none), declared groups give a group
    split by the *first* group, and otherwise the split is ``random``.

    Args:
        spec_groups: Group columns the spec declares, in order.
        split_by: Column the user asked to keep whole.
        split: Method the user asked for: ``group``, ``random`` or ``predefined``.
        split_column: The spec's predefined split column, if any.

    Returns:
        ``(method, group_column, warning)``; ``warning`` is ``None`` unless the choice
        is known to flatter the score.

    Raises:
        SplitError: When the request is invalid or contradicts the spec.
    """
    first_group = spec_groups[0] if spec_groups else None
    if split is not None and split not in METHODS:
        raise SplitError(f"split method {split!r} is invalid; valid: {', '.join(METHODS)}")
    if split_by is not None:
        if split not in (None, "group"):
            raise SplitError(
                f"--split-by {split_by!r} keeps groups whole, which contradicts --split {split!r}; "
                "drop one of them"
            )
        return "group", split_by, None
    if split == "random":
        return "random", None, RANDOM_ON_GROUPS_WARNING if spec_groups else None
    if split == "group":
        if first_group is None:
            raise SplitError(
                "a group split needs a group column; the spec declares none: "
                "add 'groups' to the spec or pass --split-by COLUMN"
            )
        return "group", first_group, None
    if split == "predefined":
        if split_column is None:
            raise SplitError(
                "a predefined split needs the spec's 'split_column'; the spec declares none"
            )
        return "predefined", first_group, None
    if split_column is not None:
        return "predefined", first_group, None
    if first_group is not None:
        return "group", first_group, None
    return "random", None, None


def make_split(
    frame: pd.DataFrame,
    *,
    labels: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    method: str = "group",
    val_fraction: float = 0.15,
    test_fraction: float = 0.25,
    seed: int = 0,
    predefined: np.ndarray | None = None,
    group_column: str | None = None,
    classes: Sequence[str] | None = None,
    represent_classes: bool = True,
) -> Split:
    """Split the rows of ``frame`` into train, validation and test.

    Args:
        frame: The manifest; its length sets ``N`` and its ``_row`` column names rows in
            errors.
        labels: Encoded labels to stratify on: single ``(N,)`` integers (``-1`` empty)
            or multi-label ``(N, K)`` 0/1.
        groups: Group value of every row; required by ``group``. With ``random`` they
            are only recorded, so :meth:`Split.describe` shows the overlap.
        method: ``group`` (each group on one side, stratified where possible),
            ``random`` (image-level, stratified where possible) or ``predefined``.
        val_fraction: Approximate share of all rows for validation (0 for none).
        test_fraction: Approximate share of all rows for test (0 for none). A group
            split holds out one of ``round(1 / fraction)`` folds, so the share achieved
            follows the group sizes.
        seed: Seed of every random choice.
        predefined: Split column values (``train``, ``val``/``valid``/``validation``,
            ``test``, any case) for ``predefined``. Without a validation side, one is
            carved from train (by group when ``groups`` are given).
        group_column: Name of the column ``groups`` came from, for the record.
        classes: Names of the label indices (or columns), for :attr:`Split.moves` and logs.
        represent_classes: After a group split is drawn (or a validation side carved by
            group from a predefined train side), move whole groups so that every class
            found in at least as many groups as there are sides is on each side
            (:attr:`Split.moves` records them; a side still lacking a class is logged as a
            warning). ``False`` gives the plain draw.

    Raises:
        SplitError: On an unknown method, invalid fractions, arrays of the wrong length,
            too few groups or rows, or unknown predefined values.
    """
    if method not in METHODS:
        raise SplitError(f"split method {method!r} is invalid; valid: {', '.join(METHODS)}")
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= value < 1.0:
            raise SplitError(f"{name} must be in [0, 1); got {value}")
    if val_fraction + test_fraction >= 1.0:
        raise SplitError(
            f"val_fraction + test_fraction must leave rows to train on; got "
            f"{val_fraction} + {test_fraction} = {val_fraction + test_fraction}"
        )
    n = len(frame)
    labels = None if labels is None else np.asarray(labels)
    groups = None if groups is None else np.asarray(groups).astype(str)
    for name, array in (("labels", labels), ("groups", groups), ("predefined", predefined)):
        if array is not None and len(array) != n:
            raise SplitError(f"{name} have {len(array)} rows but the frame has {n}")
    if groups is not None and (groups == "").any():
        log.warning(
            "%d row(s) have an empty group value; they are kept together as one group",
            int((groups == "").sum()),
        )
    rng = np.random.default_rng(seed)
    if method == "predefined":
        if predefined is None:
            raise SplitError(
                "method 'predefined' needs the split column's values (predefined=...)"
            )
        return _predefined_split(frame, predefined, labels, groups, val_fraction, rng, seed, group_column,
                                 classes=classes, represent=represent_classes)
    return _drawn_split(n, labels, groups, method, val_fraction, test_fraction, rng, seed, group_column,
                        classes=classes, represent=represent_classes)


def _predefined_split(frame: pd.DataFrame, predefined: np.ndarray, labels: np.ndarray | None,
                      groups: np.ndarray | None, val_fraction: float, rng: np.random.Generator, seed: int,
                      group_column: str | None, *, classes: Sequence[str] | None = None,
                      represent: bool = True) -> Split:
    """The sides a split column gives, with a validation side carved from train where it has
    none (see :func:`make_split`)."""
    n = len(frame)
    everything = np.arange(n, dtype=np.int64)
    sides = _parse_predefined(frame, predefined)
    train, val, test = (everything[sides == s] for s in _SIDES)
    carved = len(val) == 0 and val_fraction > 0 and len(train) > 0
    if carved:
        share = val_fraction * n / len(train)
        if share >= 1.0:
            raise SplitError(
                f"val_fraction {val_fraction} of {n} rows exceeds the {len(train)} "
                "predefined training rows it would be carved from"
            )
        train, val = _hold_out(train, labels, groups, share, rng, "validation")
    if groups is not None:
        shared = set(groups[train]) & set(groups[test])
        if shared:
            log.warning(
                "the predefined split puts %d group(s) on both train and test, e.g. %s",
                len(shared), sorted(shared)[:3],
            )
    fractions = {
        "val": round(len(val) / max(n, 1), 4),
        "test": round(len(test) / max(n, 1), 4),
    }
    split = Split(
        np.sort(train), np.sort(val), np.sort(test), "predefined",
        group_column if groups is not None else None, seed, fractions, groups, labels,
    )
    if represent and carved and groups is not None and labels is not None:
        # only the carved validation side is balanced: the split column fixed the test side
        held = val_fraction * n
        split = _represent_classes(split, {"train": len(train) + len(val) - held, "val": held}, classes)
    return split


def _drawn_split(n: int, labels: np.ndarray | None, groups: np.ndarray | None, method: str, val_fraction: float,
                 test_fraction: float, rng: np.random.Generator, seed: int, group_column: str | None, *,
                 classes: Sequence[str] | None = None, represent: bool = True) -> Split:
    """A ``group`` or ``random`` split of ``n`` rows: the test side held out first, then the
    validation side from the rest, then, for ``group``, groups moved so that every class
    with enough groups is on each side (see :func:`make_split`)."""
    if method == "group" and groups is None:
        raise SplitError("method 'group' needs the group value of every row (groups=...)")
    split_groups = groups if method == "group" else None
    if method == "group":
        needed = 1 + (val_fraction > 0) + (test_fraction > 0)
        n_groups = len(np.unique(groups))
        if n_groups < needed:
            raise SplitError(
                f"a group split into {needed} non-empty sides needs at least {needed} groups; "
                f"column {group_column or 'groups'!r} has {n_groups}"
            )
    elif n < 1 + (val_fraction > 0) + (test_fraction > 0):
        raise SplitError(f"cannot split {n} row(s) into train, validation and test")

    everything = np.arange(n, dtype=np.int64)
    rest, test = everything, _EMPTY
    if test_fraction > 0:
        rest, test = _hold_out(everything, labels, split_groups, test_fraction, rng, "test")
    train, val = rest, _EMPTY
    if val_fraction > 0:
        share = min(val_fraction * n / len(rest), 0.5)
        train, val = _hold_out(rest, labels, split_groups, share, rng, "validation")
    fractions = {"val": float(val_fraction), "test": float(test_fraction)}
    split = Split(
        np.sort(train), np.sort(val), np.sort(test), method,
        group_column if method == "group" else None, seed, fractions, groups, labels,
    )
    if represent and method == "group" and labels is not None:
        targets = {"train": n * (1.0 - val_fraction - test_fraction)}
        targets |= {s: f * n for s, f in (("val", val_fraction), ("test", test_fraction)) if f > 0}
        split = _represent_classes(split, targets, classes)
    return split


def kfold(
    labels: np.ndarray | None,
    groups: np.ndarray | None,
    *,
    n_splits: int = 5,
    seed: int = 0,
    multilabel: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """K-fold cross-validation folds; with groups, each group is in one test fold only.

    Uses ``StratifiedGroupKFold`` (groups, single labels), ``GroupKFold`` (groups with
    multi-label or no labels), ``MultilabelStratifiedKFold`` (multi-label) or
    ``StratifiedKFold`` (single labels), all shuffled with ``seed``.

    Args:
        labels: Single ``(N,)`` integer labels or multi-label ``(N, K)``; ``None`` for
            unstratified folds (then ``groups`` must be given).
        groups: Group value of every row, or ``None``.
        n_splits: Number of folds.
        seed: Shuffling seed.
        multilabel: Treat ``labels`` as multi-label (implied by a 2-D array).

    Returns:
        ``n_splits`` pairs of sorted ``(train_positions, test_positions)``; every row is
        in exactly one test fold.

    Raises:
        SplitError: When ``n_splits < 2``, or there are fewer groups or rows than folds.
    """
    if labels is None and groups is None:
        raise SplitError("kfold needs labels or groups (or both); got neither")
    n = len(labels) if labels is not None else len(groups)
    if labels is not None and groups is not None and len(groups) != n:
        raise SplitError(f"groups have {len(groups)} rows but labels have {n}")
    if n_splits < 2:
        raise SplitError(f"k-fold needs n_splits >= 2; got {n_splits}")
    y = None if labels is None else np.asarray(labels)
    multilabel = multilabel or (y is not None and y.ndim == 2)
    if groups is not None:
        folds = _group_folds(y, np.asarray(groups).astype(str), n_splits, seed, multilabel)
    else:
        folds = _row_folds(y, n, n_splits, seed, multilabel)
    return [(np.sort(tr).astype(np.int64), np.sort(te).astype(np.int64)) for tr, te in folds]


def _group_folds(y: np.ndarray | None, groups: np.ndarray, n_splits: int, seed: int,
                 multilabel: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Folds that keep each group in one test fold: stratified by single labels where that
    leaves no fold empty, else plain group folds."""
    x = np.zeros((len(groups), 1))
    n_groups = len(np.unique(groups))
    if n_groups < n_splits:
        raise SplitError(
            f"group k-fold with {n_splits} folds needs at least {n_splits} groups; "
            f"got {n_groups} groups"
        )
    if y is not None and not multilabel:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            cv = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
            folds = list(cv.split(x, y, groups))
        if all(len(test) for _, test in folds):
            return folds
        log.warning("stratified group k-fold left a fold empty; using GroupKFold")
    return list(GroupKFold(n_splits, shuffle=True, random_state=seed).split(x, groups=groups))


def _row_folds(y: np.ndarray | None, n: int, n_splits: int, seed: int,
               multilabel: bool) -> list[tuple[np.ndarray, np.ndarray]]:
    """Image-level folds, stratified by the labels where every fold can be."""
    if n < n_splits:
        raise SplitError(
            f"k-fold with {n_splits} folds needs at least {n_splits} rows; got {n}"
        )
    x = np.zeros((n, 1))
    if multilabel:
        cv = MultilabelStratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        return list(cv.split(x, y))
    if np.bincount(_class_codes(y)).max() >= n_splits:
        small = _small_classes(y, n_splits)
        if small:
            log.warning(
                "class(es) %s have fewer than %d rows: not every fold can hold them",
                small, n_splits,
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            cv = StratifiedKFold(n_splits, shuffle=True, random_state=seed)
            return list(cv.split(x, y))
    log.warning("no class has %d rows; k-fold is not stratified", n_splits)
    return list(KFold(n_splits, shuffle=True, random_state=seed).split(x))


# -- every class on every side ----------------------------------------------------------
def _represent_classes(split: Split, targets: Mapping[str, float], classes: Sequence[str] | None) -> Split:
    """``split`` with whole groups moved so that every class found in at least
    ``len(targets)`` groups is on each side named in ``targets`` (their target row counts).

    For each class in index order and each side lacking it (test, validation, train), one
    group holding it moves from the first side of :data:`_DONORS` that has two or more
    groups of it and can spare one: the donor keeps at least one group of every class it
    holds. Among those, the group leaving the side sizes nearest their targets moves (ties:
    the first by name), so the result depends on the draw alone.
    """
    names = list(targets)
    pool = np.concatenate([split.side(s) for s in names])
    unique, inverse = np.unique(np.asarray(split.groups)[pool], return_inverse=True)
    labels = np.asarray(split.labels)[pool]
    present = _group_presence(labels, inverse, len(unique))
    group_side = np.zeros(len(unique), dtype=np.int64)
    group_side[inverse] = np.repeat(np.arange(len(names)), [len(split.side(s)) for s in names])
    counts = np.stack([present[group_side == i].sum(axis=0) for i in range(len(names))])
    rows = np.bincount(inverse, minlength=len(unique))
    target = np.array([targets[s] for s in names], dtype=float)
    moves: list[dict[str, Any]] = []
    for k in np.flatnonzero(present.sum(axis=0) >= len(names)):
        for to in (names.index(s) for s in ("test", "val", "train") if s in names):
            if counts[to, k]:
                continue
            move = _best_move(k, to, names, group_side, present, counts, rows, target)
            if move is None:
                continue
            g, frm = move
            group_side[g] = to
            counts[frm] -= present[g]
            counts[to] += present[g]
            moves.append({"group": str(unique[g]), "images": int(rows[g]),
                          "class_images": _rows_of_class(labels[inverse == g], k),
                          "from": names[frm], "to": names[to], "class": _class_name(classes, k)})
    _warn_missing(names, present, counts, classes)
    if not moves:
        return split
    sides = {s: np.sort(pool[group_side[inverse] == i]) for i, s in enumerate(names)}
    return dataclasses.replace(split, **sides, moves=moves)


def _best_move(k: int, to: int, names: list[str], group_side: np.ndarray, present: np.ndarray,
               counts: np.ndarray, rows: np.ndarray, target: np.ndarray) -> tuple[int, int] | None:
    """``(group, side it leaves)`` of the group of class ``k`` to move to side ``to``, or
    ``None`` where no side can spare one (see :func:`_represent_classes`)."""
    sizes = np.bincount(group_side, weights=rows, minlength=len(names))
    for donor in _DONORS[names[to]]:
        if donor not in names or counts[d := names.index(donor), k] < 2:
            continue
        candidates = np.flatnonzero((group_side == d) & present[:, k])
        # a group may leave only if the donor keeps a group of every class it holds
        spare = np.array([(counts[d][present[g]] >= 2).all() for g in candidates], dtype=bool)
        candidates = candidates[spare]
        if len(candidates):
            drift = (np.abs(sizes[d] - rows[candidates] - target[d])
                     + np.abs(sizes[to] + rows[candidates] - target[to]))
            return int(candidates[np.argmin(drift)]), d
    return None


def _group_presence(y: np.ndarray, inverse: np.ndarray, n_groups: int) -> np.ndarray:
    """``(groups, classes)`` booleans: the group holds a row of the class (a single label's
    index, or a multi-label column with a positive); the empty label (-1) is no class."""
    if y.ndim == 2:
        out = np.zeros((n_groups, y.shape[1]), dtype=np.int64)
        np.add.at(out, inverse, (np.asarray(y) > 0).astype(np.int64))
        return out > 0
    known = y >= 0
    out = np.zeros((n_groups, int(y[known].max()) + 1 if known.any() else 0), dtype=bool)
    out[inverse[known], y[known].astype(np.int64)] = True
    return out


def _rows_of_class(y: np.ndarray, k: int) -> int:
    return int((y[:, k] > 0).sum()) if y.ndim == 2 else int((y == k).sum())


def _class_name(classes: Sequence[str] | None, k: int) -> str:
    return str(classes[k]) if classes is not None and k < len(classes) else str(k)


def _warn_missing(names: list[str], present: np.ndarray, counts: np.ndarray,
                  classes: Sequence[str] | None) -> None:
    """Warn of each side still lacking a class: too few groups, or none could move."""
    n_groups = present.sum(axis=0)
    for i, side in enumerate(names):
        missing = np.flatnonzero((n_groups > 0) & (counts[i] == 0))
        if not len(missing):
            continue
        few = [f"{_class_name(classes, k)} ({n_groups[k]} group(s))" for k in missing if n_groups[k] < len(names)]
        stuck = [_class_name(classes, k) for k in missing if n_groups[k] >= len(names)]
        reasons = ([f"{', '.join(few)}: a class needs {len(names)} groups to be on every side"] if few else []) + (
            [f"{', '.join(stuck)}: no group of it could move there without leaving another class off its side"]
            if stuck else [])
        log.warning("the %s side holds no row of %s", _SIDE_WORDS[side], "; nor of ".join(reasons))


# -- helpers ------------------------------------------------------------------------------
def _parse_predefined(frame: pd.DataFrame, values: np.ndarray) -> np.ndarray:
    """Map split-column values to ``train``/``val``/``test``; name rows holding others."""
    raw = pd.Series(np.asarray(values).astype(str))
    sides = raw.str.strip().str.lower().map(SPLIT_VALUES)
    bad = sides.isna().to_numpy()
    if bad.any():
        rows = (
            frame[ROW_COLUMN].to_numpy()[bad]
            if ROW_COLUMN in frame.columns
            else np.flatnonzero(bad) + 1
        )
        shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
        found = sorted(set(raw[bad].tolist()))
        raise SplitError(
            f"split column has unknown value(s) {found[:10]} in {int(bad.sum())} row(s) "
            f"(rows {shown}); valid: {', '.join(SPLIT_VALUES)} (any case)"
        )
    return sides.to_numpy()


def _class_codes(y: np.ndarray) -> np.ndarray:
    """Non-negative codes of single labels, the empty label (-1) being a class of its own."""
    return np.unique(y, return_inverse=True)[1].ravel()


def _small_classes(y: np.ndarray, minimum: int) -> list[int]:
    values, counts = np.unique(y, return_counts=True)
    return [int(v) for v, c in zip(values, counts, strict=True) if c < minimum]


def _hold_out(
    pool: np.ndarray,
    labels: np.ndarray | None,
    groups: np.ndarray | None,
    fraction: float,
    rng: np.random.Generator,
    what: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``pool`` into ``(rest, held)`` with about ``fraction`` of its rows held out."""
    seed = int(rng.integers(2**31 - 1))
    y = None if labels is None else labels[pool]
    if groups is not None:
        rest, held = _hold_out_groups(y, groups[pool], fraction, seed, what)
    else:
        rest, held = _hold_out_rows(y, len(pool), fraction, seed, what)
    return pool[rest], pool[held]


def _hold_out_groups(
    y: np.ndarray | None, groups: np.ndarray, fraction: float, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    n = len(groups)
    unique = np.unique(groups)
    if len(unique) < 2:
        raise SplitError(
            f"cannot hold out a {what} side by group: the rows left hold {len(unique)} group(s)"
        )
    n_splits = max(2, round(1.0 / fraction))
    target = fraction * n
    positions = np.arange(n)
    reason = None
    if y is None:
        reason = "no labels given"
    elif y.ndim == 2:
        reason = "multi-label labels"
    elif len(unique) < n_splits:
        reason = f"{len(unique)} groups for {n_splits} folds"
    if reason is None:
        few = _classes_in_few_groups(y, groups, n_splits)
        if few:
            log.info(
                "%s split: class(es) %s occur in fewer than %d groups and cannot be on "
                "every side", what, few, n_splits,
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            cv = StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed)
            folds = [test for _, test in cv.split(np.zeros((n, 1)), y, groups) if len(test)]
        held = min(folds, key=lambda f: abs(len(f) - target))
        log.info(
            "%s side: one of %d stratified group folds (%d rows, target %.0f)",
            what, n_splits, len(held), target,
        )
        return np.setdiff1d(positions, held), held
    log.info("%s side: groups drawn at random, not stratified (%s)", what, reason)
    order = np.random.default_rng(seed).permutation(unique)
    sizes = pd.Series(groups).value_counts().reindex(order).to_numpy()
    cumulative = np.cumsum(sizes)[:-1]  # leave at least one group on the other side
    k = int(np.argmin(np.abs(cumulative - target))) + 1
    held = np.flatnonzero(np.isin(groups, order[:k]))
    return np.setdiff1d(positions, held), held


def _classes_in_few_groups(y: np.ndarray, groups: np.ndarray, minimum: int) -> list[int]:
    pairs = pd.DataFrame({"y": y, "g": groups}).drop_duplicates()
    per_class = pairs.groupby("y")["g"].nunique()
    return [int(c) for c, k in per_class.items() if k < minimum]


def _hold_out_rows(
    y: np.ndarray | None, n: int, fraction: float, seed: int, what: str
) -> tuple[np.ndarray, np.ndarray]:
    x = np.zeros((n, 1))
    n_held = int(np.ceil(fraction * n))
    if n_held >= n:
        raise SplitError(f"cannot hold out a {what} side of {fraction:.0%} from {n} row(s)")
    if y is None:
        return next(ShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(x))
    if y.ndim == 2:
        cv = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        rest, held = next(cv.split(x, y))
        return rest, held
    counts = np.bincount(_class_codes(y))
    if counts.min() >= 2 and n_held >= len(counts) and n - n_held >= len(counts):
        cv = StratifiedShuffleSplit(n_splits=1, test_size=fraction, random_state=seed)
        return next(cv.split(x, y))
    log.info(
        "%s side: rows drawn at random, not stratified (smallest class has %d row(s), "
        "%d classes for %d held-out rows)", what, counts.min(), len(counts), n_held,
    )
    return next(ShuffleSplit(n_splits=1, test_size=fraction, random_state=seed).split(x))
