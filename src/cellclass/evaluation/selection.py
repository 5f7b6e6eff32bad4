"""Choose the images of a pool a person should label next, and write them as ``rank.csv``.

:func:`rank_run` reads a pool of images (any dataset form; labels not needed) as a run's
images were read, leaves out what must not be asked, scores the rest with a strategy of
:mod:`cellclass.evaluation.ranking` and writes the ``budget`` best, first = ask first.

Left out of the pool, so the test stays untouched and nobody labels twice:

- images of the run's **test groups** (its test plates, say: every pool row whose group
  column holds one of them), or, where the run was not split by group or the pool lacks the
  group column, the run's test images themselves. ``exclude_groups_of`` takes the test
  groups of another run instead (the reference run whose test set must stay fixed);
- the images the run was trained and validated on (they have labels).

``rank.csv`` (the interface the web labelling queue reads): ``rank`` (1 = ask first),
``image`` (the path as the pool gives it: relative to the pool's image root, or absolute;
the image id for multi-file channel sets), ``score`` (higher = ask first), ``strategy``,
then per task ``pred_<task>`` (the run's current guess; a multi-label guess is its classes
joined by ``;``, or by ``|`` where a class name holds ``;``) and ``p_<task>_<class>`` (its probabilities),
then ``id``, ``row`` (manifest row) and the pool's group columns. ``rank.json`` beside it
says how the ranking was made (pool, image root, exclusions, strategy, budget).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellclass.atomic import atomic_path, atomic_write_text
from cellclass.data.normalize import NormalizedView
from cellclass.data.prepared import PreparedData, PrepareSettings, prepare_pool
from cellclass.data.spec import ROW_COLUMN, DatasetSpec
from cellclass.errors import RankingError, SpecError
from cellclass.evaluation.ensemble import read_per_member, rows_probabilities
from cellclass.evaluation.evaluate import run_spec
from cellclass.evaluation.ranking import (
    DISAGREEMENT,
    check_budget,
    check_strategy,
    rank_images,
)
from cellclass.inference.embeddings import check_embeddable, model_outputs
from cellclass.inference.predictor import Predictor

log = logging.getLogger(__name__)

NEEDS_FEATURES = ("k-center", "hybrid")


@dataclasses.dataclass(frozen=True)
class Member:
    """A model of an ensemble: its run folder and the settings its images are read with."""

    run: Path
    settings: PrepareSettings


def rank_run(run: str | Path, settings: PrepareSettings, pool: DatasetSpec, out: str | Path, *, strategy: str,
             budget: int, task: str | None = None, tta: bool | None = None, exclude_groups_of: str | Path | None = None,
             keep_test: bool = False, members: Sequence[Member] = (), top_factor: int = 4,
             seed: int = 0) -> dict[str, Any]:
    """Rank a pool for labelling with a run's best checkpoint; write ``out`` (rank.csv) and its ``.json``.

    Args:
        run: Run folder whose model is to learn from the labels.
        settings: The run's configuration (how its images were read).
        pool: The images to choose from.
        out: CSV path.
        strategy: One of :data:`cellclass.evaluation.ranking.STRATEGIES`.
        budget: How many images to choose.
        task: Task to score (default: the run's first).
        tta: D4 test-time augmentation of the probabilities (default: the run's setting;
            always on for ``tta-bald``).
        exclude_groups_of: Run whose test groups are left out (default: ``run``).
        keep_test: Leave the test groups in the pool (the test then no longer stays untouched).
        members: The models of ``ensemble-bald`` (at least two).
        top_factor: ``hybrid``: how many times ``budget`` uncertain images it diversifies among.
        seed: Seed of ``random``.

    Returns:
        The ``rank.json`` content.

    Raises:
        RankingError: When the strategy, budget, task or ensemble is invalid (checked before
            any image is read), or nothing is left in the pool.
        EmbeddingError: When the strategy needs embeddings and the run is a baseline.
    """
    run, out = Path(run), Path(out)
    check_strategy(strategy)
    budget = check_budget(budget)
    if strategy == "ensemble-bald" and len(members) < 2:
        raise RankingError(f"strategy 'ensemble-bald' needs an ensemble of at least 2 models; got {len(members)} "
                           "(give --ensemble with a `cellclass cv` folder or several run folders)")
    if strategy != "ensemble-bald" and members:
        raise RankingError(f"an ensemble of {len(members)} model(s) was given to strategy {strategy!r}, which does "
                           "not use one; valid: --ensemble with --strategy ensemble-bald only")
    predictor = Predictor.from_checkpoint(run, tta=True if strategy == "tta-bald" else tta)
    task = _score_task(predictor, task)
    if strategy in NEEDS_FEATURES or strategy == "tta-bald":
        check_embeddable(predictor, f"run {str(run)!r}")
    # stacks are read as the training images were, unless the pool's spec says otherwise
    data = prepare_pool(dataclasses.replace(pool, image=pool.image.with_defaults(predictor.axes)), settings)
    left_out = (_Exclusion(len(data.ids)) if keep_test else
                test_exclusion(Path(exclude_groups_of) if exclude_groups_of else run, data))
    left_out.add_labelled(run, data)
    rows = np.flatnonzero(~left_out.mask)
    if not len(rows):
        raise RankingError(f"nothing is left to rank: the pool's {len(data.ids)} image(s) are all "
                           f"{left_out.describe()}; valid: a pool with images outside the run's test and training sets")
    inputs, probs = _score_inputs(predictor, data, rows, strategy, members, run, settings, task)
    encoder = predictor.encoders[task]
    ranking = rank_images(strategy, budget, probabilities=probs[task], multilabel=encoder.type == "multilabel",
                          top_factor=top_factor, seed=seed, **inputs)
    chosen = rows[ranking.order]
    frame = rank_frame(data, predictor, {t: p[ranking.order] for t, p in probs.items()}, chosen, ranking.scores,
                       strategy)
    with atomic_path(out) as tmp:
        frame.to_csv(tmp, index=False)
    summary = {
        "run": str(run), "pool": data.spec.name, "image_root": str(data.spec.image_root),
        "image_column": data.spec.image.column, "strategy": strategy, "task": task, "budget": budget,
        "tta": predictor.tta, "n_pool": len(data.ids), "n_ranked": len(frame), "left_out": left_out.summary(),
        "ensemble": [str(m.run) for m in members] if strategy == "ensemble-bald" else [], "csv": str(out),
    }
    atomic_write_text(out.with_suffix(".json"), json.dumps(summary, indent=2))
    return summary


def _score_task(predictor: Predictor, task: str | None) -> str:
    """The task to score: ``task``, or the run's first.

    Raises:
        RankingError: When the run has no such task.
    """
    tasks = list(predictor.encoders)
    if task is None:
        return tasks[0]
    if task not in tasks:
        raise RankingError(f"task {task!r} is not one of the run's; valid: {', '.join(tasks)}")
    return task


def _score_inputs(predictor: Predictor, data: PreparedData, rows: np.ndarray, strategy: str,
                  members: Sequence[Member], run: Path, settings: PrepareSettings, task: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """What the strategy scores (views, members, features, labelled), and the run's probabilities of ``rows``."""
    view = NormalizedView(data.images, predictor.normalizer, data.groups)
    inputs: dict[str, Any] = {}
    if predictor.kind == "baseline":
        probs = predictor.predict_normalized(view[rows])
    else:
        outputs = model_outputs(predictor, view.rows(rows))
        probs = outputs.probabilities
        if strategy == "tta-bald":
            inputs["views"] = outputs.views[task]
        if strategy in NEEDS_FEATURES:
            inputs["features"] = outputs.features
            inputs["labelled"] = labelled_features(run, predictor, settings)
    if strategy in DISAGREEMENT and DISAGREEMENT[strategy] == "members":
        inputs["members"] = member_probabilities(members, data, rows, task, predictor.encoders[task].classes)
    return inputs, probs


def labelled_features(run: Path, predictor: Predictor, settings: PrepareSettings) -> np.ndarray:
    """Features of the images the run was trained and validated on: the centres k-centre greedy starts from."""
    split = json.loads((run / "split.json").read_text())["split"]
    data = prepare_pool(run_spec(run), settings)
    rows = np.asarray(sorted(split["train"] + split["val"]), dtype=np.int64)
    rows = rows[rows < len(data.ids)]
    view = NormalizedView(data.images, predictor.normalizer, data.groups)
    return model_outputs(predictor, view.rows(rows), tta=predictor.tta).features


def member_probabilities(members: Sequence[Member], pool: PreparedData, rows: np.ndarray, task: str,
                         classes: Sequence[str]) -> np.ndarray:
    """``(M, N, K)`` probabilities of ``task`` for the pool's ``rows``, one slice per ensemble member.

    Raises:
        RankingError: When a member lacks the task or has other classes.
    """
    predictors = [Predictor.from_checkpoint(member.run, tta=False) for member in members]
    for member, predictor in zip(members, predictors, strict=True):
        encoder = predictor.encoders.get(task)
        if encoder is None or list(encoder.classes) != list(classes):
            raise RankingError(f"ensemble member {str(member.run)!r} has "
                               + (f"classes {encoder.classes} for task {task!r}" if encoder else f"no task {task!r}")
                               + f"; valid: models of the same task and classes as the run ({', '.join(classes)})")
    readings = read_per_member(predictors, [m.settings for m in members], pool.spec, prepare_pool)
    out = [rows_probabilities(p, data, rows)[task] for p, data in zip(predictors, readings, strict=True)]
    return np.stack(out)


# -- what is left out of the pool ------------------------------------------------------------
class _Exclusion:
    """Which pool rows are left out, and why."""

    def __init__(self, n: int) -> None:
        self.mask = np.zeros(n, dtype=bool)
        self.test = np.zeros(n, dtype=bool)
        self.labelled = np.zeros(n, dtype=bool)
        self.how = "the test was kept in the pool (asked)"
        self.groups: list[str] = []
        self.group_column: str | None = None

    def add_labelled(self, run: Path, data: PreparedData) -> None:
        """Leave out the pool images the run was trained or validated on."""
        own = _run_images(run, ("train", "val"))
        self.labelled = np.asarray([key in own for key in _pool_images(data)], dtype=bool) & ~self.mask
        self.mask |= self.labelled

    def describe(self) -> str:
        return f"left out ({int(self.test.sum())} of the test, {int(self.labelled.sum())} already labelled)"

    def summary(self) -> dict[str, Any]:
        return {"test": int(self.test.sum()), "labelled": int(self.labelled.sum()), "how": self.how,
                "group_column": self.group_column, "groups": self.groups}


def test_exclusion(reference: Path, data: PreparedData) -> _Exclusion:
    """The pool rows of ``reference``'s test groups (or its test images, without a group split)."""
    left_out = _Exclusion(len(data.ids))
    split = json.loads((reference / "split.json").read_text())["split"] if (reference / "split.json").is_file() \
        else None
    if split is None:
        raise RankingError(f"{str(reference)!r} has no split.json, so its test groups are unknown; valid: a run "
                           "folder made by `cellclass train` (or keep the test in the pool, knowingly)")
    group = split.get("group") if str(split.get("method", "")).startswith("group") else None
    if group and group in data.frame.columns:
        _, frame = _run_manifest(reference)
        groups = sorted(set(frame[group].astype(str).to_numpy()[np.asarray(split["test"], dtype=np.int64)]))
        left_out.test = data.frame[group].astype(str).isin(groups).to_numpy()
        left_out.groups, left_out.group_column = groups, group
        left_out.how = f"the {len(groups)} test {group} value(s) of run {str(reference)!r}"
    else:
        why = "the run was not split by group" if not group else f"the pool has no {group!r} column"
        test = _run_images(reference, ("test",))
        left_out.test = np.asarray([key in test for key in _pool_images(data)], dtype=bool)
        left_out.how = f"the test images of run {str(reference)!r} ({why})"
    left_out.mask |= left_out.test
    return left_out


def _run_images(run: Path, sides: Sequence[str]) -> set[tuple[str, ...]]:
    """The image files (absolute) of a run's split sides."""
    split = json.loads((run / "split.json").read_text())["split"] if (run / "split.json").is_file() else {}
    rows = np.asarray(sorted(r for side in sides for r in split.get(side, [])), dtype=np.int64)
    if not len(rows):
        return set()
    spec, frame = _run_manifest(run)
    records = frame.to_dict("records")
    return {tuple(str(p.resolve()) for p in spec.image_paths(records[r])) for r in rows if r < len(records)}


def _run_manifest(run: Path) -> tuple[DatasetSpec, pd.DataFrame]:
    """A run's dataset spec and manifest, as it was split (what its ``split.json`` positions index).

    Raises:
        RankingError: When the run's dataset cannot be read where it was trained.
    """
    spec = run_spec(run)
    try:
        return spec, spec.load_manifest()
    except SpecError as exc:
        raise RankingError(f"the dataset of run {str(run)!r} cannot be read, so its test and training images are "
                           f"unknown: {exc}; valid: the run's dataset where it was trained (or --include-test, "
                           "knowingly)") from None


def _pool_images(data: PreparedData) -> list[tuple[str, ...]]:
    return [tuple(str(p.resolve()) for p in data.spec.image_paths(r)) for r in data.frame.to_dict("records")]


# -- rank.csv --------------------------------------------------------------------------------
def rank_frame(data: PreparedData, predictor: Predictor, probs: dict[str, np.ndarray], chosen: np.ndarray,
               scores: np.ndarray, strategy: str) -> pd.DataFrame:
    """The rows of ``rank.csv`` for the ``chosen`` pool positions (see the module's description)."""
    column = data.spec.image.column
    frame = data.frame.iloc[chosen]
    images = frame[column].astype(str).to_numpy() if column else np.asarray([data.ids[i] for i in chosen])
    out = pd.DataFrame({"rank": np.arange(1, len(chosen) + 1), "image": images, "score": np.round(scores, 6),
                        "strategy": strategy})
    labels = predictor.decide(probs)
    for task, encoder in predictor.encoders.items():
        joiner = "|" if any(";" in name for name in encoder.classes) else ";"  # a multi-label guess, as the queue reads it
        out[f"pred_{task}"] = [joiner.join(v) if isinstance(v, list) else v for v in labels[task]]
        for j, name in enumerate(encoder.classes):
            out[f"p_{task}_{name}"] = np.round(probs[task][:, j], 6)
    out["id"] = [data.ids[i] for i in chosen]
    out["row"] = frame[ROW_COLUMN].to_numpy()
    for group in data.spec.groups:
        if group in frame.columns and group not in out.columns:
            out[group] = frame[group].astype(str).to_numpy()
    return out
