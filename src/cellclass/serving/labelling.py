"""The labelling queue: the images a ranking puts first, shown one by one for people to label.

A ranking is the CSV ``cellclass rank RUN POOL`` writes: ``rank`` (1 = ask first),
``image`` (the file's path relative to the pool folder, or absolute), ``score``,
``strategy``, then for each task of the model ``pred_<task>`` (the model's guess; a
multi-label guess is its classes joined by ``;``, or by ``|`` when a class name holds
``;``) and ``p_<task>_<class>`` (its probabilities). Other columns named after the
training spec's groups (plate, well) are kept with each label.

Labelling an item makes a contribution in the :class:`ContributionStore` (pending until a
curator reviews it) and, in the same transaction, a row of ``queue_labels`` saying which
key labelled which item. An item is known by its path relative to the pool folder
(absolute when outside it) and the dataset definition of the served model, so the state
survives restarts, and a new ranking of the same pool (after retraining) still knows what
was labelled.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from cellclass.errors import ConflictError, NotFoundError, QueueError
from cellclass.serving.database import Database, Transaction
from cellclass.serving.keys import now

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("rank", "image", "score", "strategy")
"""Columns every ranking has, besides the per-task ``pred_<task>`` and ``p_<task>_<class>``."""

UNLABELLED_BY = ("anyone", "me")
"""Which items a listing leaves out: those anyone labelled, or those the calling key labelled."""


@dataclass(frozen=True)
class QueueItem:
    """One ranked image.

    Attributes:
        rank: Its place in the ranking (1 = ask first); the item's id in the API.
        image: Its path as the ranking gives it.
        key: Its identity in the database: the path relative to the pool (POSIX
            separators), or the absolute path of a file outside it.
        path: The file.
        score: The ranking strategy's score (None where the CSV has none).
        strategy: The strategy that ranked it.
        tasks: Task name to ``{"label": guess, "probabilities": {class: p}}``.
        groups: The training spec's group columns the ranking carries (plate, well).
    """

    rank: int
    image: str
    key: str
    path: Path
    score: float | None
    strategy: str
    tasks: dict[str, dict[str, Any]]
    groups: dict[str, str] = field(default_factory=dict)

    def metadata(self, source: str) -> dict[str, Any]:
        """What a contribution of this item records besides its labels: its groups and where it came from."""
        return {**self.groups, "queue": {
            "ranking": source, "rank": self.rank, "image": self.image, "strategy": self.strategy,
            "score": self.score, "predicted": {task: value["label"] for task, value in self.tasks.items()}}}


def read_ranking(csv: Path, pool: Path, tasks: Sequence[Mapping[str, Any]],
                 groups: Sequence[str] = ()) -> list[QueueItem]:
    """The items of a ranking CSV, in rank order, checked against the served model's tasks.

    Args:
        csv: The ranking.
        pool: Folder the relative ``image`` paths are under.
        tasks: The model's tasks (``name``, ``type``, ``classes``), as in
            :func:`~cellclass.serving.contributions.dataset_definition`.
        groups: Group columns to keep with each item where the CSV has them.

    Raises:
        QueueError: When the file cannot be read, lacks a column, holds a rank that is not
            a distinct positive integer, a probability outside [0, 1], a guess that is not
            a class, or names images that are not in the pool; the message names the
            culprits and what is valid.
    """
    try:
        frame = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise QueueError(f"cannot read the ranking {str(csv)!r}: {exc}") from None
    columns = {t["name"]: (f"pred_{t['name']}", [f"p_{t['name']}_{c}" for c in t["classes"]]) for t in tasks}
    needed = [*REQUIRED_COLUMNS, *(c for pred, probs in columns.values() for c in (pred, *probs))]
    missing = [c for c in needed if c not in frame.columns]
    if missing:
        raise QueueError(f"the ranking {str(csv)!r} lacks column(s) {missing} for the served model's tasks "
                         f"({', '.join(columns)}); valid: the CSV `cellclass rank RUN POOL` writes for the served run")
    if frame.empty:
        raise QueueError(f"the ranking {str(csv)!r} has no rows; valid: at least one ranked image")
    ranks = _ranks(frame["rank"], csv)
    pool_root = Path(os.path.abspath(pool))
    items, absent = [], []
    for i, row in enumerate(frame.to_dict("records")):
        where = f"row {i + 2} of {str(csv)!r}"
        image = row["image"].strip()
        if not image:
            raise QueueError(f"{where} has an empty 'image'; valid: a path relative to the pool folder, or absolute")
        path = Path(os.path.abspath(pool_root / image))
        if not path.is_file():
            absent.append(image)
        items.append(QueueItem(
            rank=ranks[i], image=image, key=item_key(path, pool_root), path=path,
            score=_number(row["score"], "score", where, bounded=False), strategy=row["strategy"].strip(),
            tasks={t["name"]: _guess(row, t, *columns[t["name"]], where) for t in tasks},
            groups={g: row[g] for g in groups if g in row and row[g] != ""}))
    if absent:
        raise QueueError(f"{len(absent)} image(s) of the ranking {str(csv)!r} are not files under the pool folder "
                         f"{str(pool_root)!r}, e.g. {absent[:3]}; valid: paths relative to the pool folder "
                         f"(--pool, default the CSV's folder), or absolute")
    return sorted(items, key=lambda item: item.rank)


def item_key(path: Path, pool_root: Path) -> str:
    """An item's identity: its path relative to the pool (POSIX separators), else its absolute path."""
    try:
        return path.relative_to(pool_root).as_posix()
    except ValueError:
        return path.as_posix()


def _ranks(values: pd.Series, csv: Path) -> list[int]:
    ranks = []
    for i, text in enumerate(values):
        try:
            rank = int(text.strip())
        except ValueError:
            rank = 0
        if rank < 1 or rank > 2**31 - 1:
            raise QueueError(f"row {i + 2} of {str(csv)!r} has rank {text!r}; valid: an integer from 1 "
                             f"(ask first) to {2**31 - 1}")
        ranks.append(rank)
    repeated = sorted(r for r, n in Counter(ranks).items() if n > 1)
    if repeated:
        raise QueueError(f"the ranking {str(csv)!r} gives rank(s) {repeated[:5]} to several images; valid: "
                         f"each rank once")
    return ranks


def _number(text: str, column: str, where: str, *, bounded: bool) -> float | None:
    """A CSV cell as a finite float (None when empty); in [0, 1] when ``bounded``."""
    if text.strip() == "" and not bounded:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or (bounded and not 0.0 <= value <= 1.0):
        valid = "a probability from 0 to 1" if bounded else "a finite number, or empty"
        raise QueueError(f"{where} has {column} {text!r}; valid: {valid}")
    return value


def _guess(row: Mapping[str, str], task: Mapping[str, Any], pred: str, probs: Sequence[str],
           where: str) -> dict[str, Any]:
    """One task's guess and probabilities from a ranking row."""
    classes = list(task["classes"])
    probabilities = {c: _number(row[p], p, where, bounded=True) for c, p in zip(classes, probs, strict=True)}
    text = row[pred].strip()
    if task["type"] == "multilabel":
        delimiter = "|" if any(";" in c for c in classes) else ";"
        label: str | list[str] = [v.strip() for v in text.split(delimiter) if v.strip()] if text else []
        bad = [v for v in label if v not in classes]
    else:
        label = text
        bad = [] if text in classes else [text]
    if bad:
        raise QueueError(f"{where} has {pred} {text!r}, naming class(es) {bad} the served model does not have; "
                         f"valid: {', '.join(classes)}")
    return {"label": label, "probabilities": probabilities}


class LabellingQueue:
    """A ranking being labelled: its items, and who labelled which (in the database).

    Args:
        items: The ranked items, in rank order (:func:`read_ranking`).
        source: The ranking's file (its name is recorded with each label).
        pool: The pool folder.
        db: The service's database.
        dataset: Dataset id of the served model's definition.
    """

    def __init__(self, items: Sequence[QueueItem], source: Path, pool: Path, db: Database, dataset: str) -> None:
        self.items = list(items)
        self.source = source
        self.pool = pool
        self.db = db
        self.dataset = dataset
        self._by_rank = {item.rank: item for item in self.items}

    @classmethod
    def load(cls, csv: Path, pool: Path, definition: Mapping[str, Any], db: Database, dataset: str) -> LabellingQueue:
        """Read and check a ranking for the model of ``definition`` (see :func:`read_ranking`)."""
        items = read_ranking(csv, pool, definition["tasks"], definition.get("groups") or ())
        log.info("labelling queue of %d image(s) from %s (pool %s)", len(items), csv, pool)
        return cls(items, csv, pool, db, dataset)

    @property
    def strategies(self) -> list[str]:
        """The ranking strategies of the items, in order of first appearance."""
        return list(dict.fromkeys(item.strategy for item in self.items))

    def item(self, rank: int) -> QueueItem:
        """The item of ``rank``.

        Raises:
            NotFoundError: When the ranking has no such rank.
        """
        try:
            return self._by_rank[rank]
        except KeyError:
            raise NotFoundError(f"the labelling queue has no item of rank {rank}; valid: ranks "
                                f"{self.items[0].rank} to {self.items[-1].rank} ({len(self.items)} items)") from None

    def labellers(self) -> dict[str, set[str]]:
        """Item key to the ids of the keys that labelled it."""
        rows = self.db.query("SELECT item, contributor FROM queue_labels WHERE dataset_id = ?", (self.dataset,))
        out: dict[str, set[str]] = {}
        for row in rows:
            out.setdefault(row["item"], set()).add(row["contributor"])
        return out

    def label_of(self, item: QueueItem, contributor: str) -> str | None:
        """The contribution ``contributor`` labelled ``item`` with, if any."""
        rows = self.db.query("SELECT contribution_id FROM queue_labels WHERE dataset_id = ? AND item = ? "
                             "AND contributor = ?", (self.dataset, item.key, contributor))
        return rows[0]["contribution_id"] if rows else None

    def page(self, contributor: str, *, unlabelled_by: str = "anyone", after: int = 0, offset: int = 0,
             limit: int = 20) -> dict[str, Any]:
        """Items still to label, in rank order: a page of them and the counts.

        Args:
            contributor: The calling key's id.
            unlabelled_by: ``anyone`` leaves out items anyone labelled; ``me`` only those
                ``contributor`` labelled.
            after: Only items ranked after this rank (a cursor: the last rank seen).
            offset: Items to pass over first.
            limit: Most items returned.

        Returns:
            ``total`` (items left after ``after``), ``labelled`` (items left out as labelled)
            and ``items``: dicts of ``item`` (the :class:`QueueItem`), ``labels`` (how many
            keys labelled it) and ``labelled_by_me``.
        """
        if unlabelled_by not in UNLABELLED_BY:
            raise QueueError(f"unlabelled_by {unlabelled_by!r} is invalid; valid: {', '.join(UNLABELLED_BY)}")
        labellers = self.labellers()

        def done(item: QueueItem) -> bool:
            who = labellers.get(item.key, set())
            return bool(who) if unlabelled_by == "anyone" else contributor in who

        left = [item for item in self.items if not done(item)]
        ahead = [item for item in left if item.rank > after]
        return {"total": len(ahead), "labelled": len(self.items) - len(left),
                "items": [self.describe(item, labellers, contributor) for item in ahead[offset : offset + limit]]}

    def describe(self, item: QueueItem, labellers: Mapping[str, set[str]] | None, contributor: str) -> dict[str, Any]:
        """``item`` with how many keys labelled it and whether ``contributor`` did."""
        who = (self.labellers() if labellers is None else labellers).get(item.key, set())
        return {"item": item, "labels": len(who), "labelled_by_me": contributor in who}

    def recorder(self, item: QueueItem, contributor: str) -> Callable[[Transaction, dict[str, Any]], None]:
        """What :meth:`ContributionStore.add` runs in its transaction: record that ``contributor`` labelled ``item``.

        Raises (when run):
            ConflictError: When ``contributor`` already labelled ``item`` (the contribution is then undone).
        """

        def record(tx: Transaction, contribution: dict[str, Any]) -> None:
            tx.execute("INSERT INTO queue_labels (dataset_id, item, contributor, contribution_id, created_at) "
                       "VALUES (?, ?, ?, ?, ?) ON CONFLICT (dataset_id, item, contributor) DO NOTHING",
                       (self.dataset, item.key, contributor, contribution["id"], now()))
            if tx.rowcount != 1:
                raise self.already_labelled(item, contributor, self._recorded(tx, item, contributor))

        return record

    def _recorded(self, tx: Transaction, item: QueueItem, contributor: str) -> str | None:
        rows = tx.execute("SELECT contribution_id FROM queue_labels WHERE dataset_id = ? AND item = ? "
                          "AND contributor = ?", (self.dataset, item.key, contributor))
        return rows[0]["contribution_id"] if rows else None

    @staticmethod
    def already_labelled(item: QueueItem, contributor: str, contribution_id: str | None) -> ConflictError:
        """The error of a second label of ``item`` by ``contributor``."""
        return ConflictError(f"queue item {item.rank} ({item.image!r}) was already labelled by key {contributor} "
                             f"(contribution {contribution_id}); valid: an item this key has not labelled "
                             f"(GET /v1/queue?unlabelled_by=me)")
