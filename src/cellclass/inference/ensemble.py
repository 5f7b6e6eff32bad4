"""An ensemble of trained models: their probabilities averaged, per task and class.

The members are run folders (or ``.ckpt`` files) of the same tasks and classes, typically
the fold models of a ``cellclass cv``. Each member reads and prepares an image as its own
training images were read (Z/T projection, channels, image size, fit, normalization), so
members trained with other image settings can be combined.

A ``cellclass cv --ensemble`` folder holds ``ensemble.yaml``, which names its members
(run folders relative to it) and the per-class thresholds its multi-label tasks apply to
the averaged probabilities::

    format: cellclass-ensemble/1
    members: [fold_0, fold_1, fold_2]
    combine: mean
    thresholds: {phenotype: [0.41, 0.37, ...]}
    thresholds_from: tuned on the pooled out-of-fold predictions of the fold models (f1)

Members given one by one (no ``ensemble.yaml``) apply the mean of their own thresholds.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cellclass.atomic import atomic_write_text
from cellclass.data.labels import TaskEncoder
from cellclass.errors import EnsembleError, ImageReadError
from cellclass.inference.predictor import Predictor, decide, describe
from cellclass.textfiles import load_yaml

log = logging.getLogger(__name__)

ENSEMBLE_FILE = "ensemble.yaml"
FORMAT = "cellclass-ensemble/1"
COMBINE = "mean"
"""The only combination: the mean of the members' probabilities, per task and class."""
MEAN_THRESHOLDS = "mean of the members' thresholds (each tuned on its own validation side)"


def ensemble_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run folders of an ensemble: each path a run folder, or a ``cellclass cv`` folder (the
    members its ``ensemble.yaml`` names, else its ``fold_*`` runs).

    Raises:
        EnsembleError: When a path is neither, or its ``ensemble.yaml`` cannot be read.
    """
    runs: list[Path] = []
    for path in map(Path, paths):
        expanded = _expand(path)
        if expanded is None:
            raise EnsembleError(f"ensemble member {str(path)!r} is neither a run folder (checkpoints/best.ckpt) nor "
                                "a `cellclass cv` folder (fold_*/checkpoints/best.ckpt)")
        runs += expanded
    return runs


def is_ensemble_folder(path: str | Path) -> bool:
    """Whether ``path`` is a ``cellclass cv`` folder (an ``ensemble.yaml``, or fold runs without a model of its own)."""
    path = Path(path)
    return (path / ENSEMBLE_FILE).is_file() or (
        not (path / "checkpoints" / "best.ckpt").is_file() and bool(_expand(path)))


def _expand(path: Path) -> list[Path] | None:
    """The runs of one path: itself (a run folder), its ensemble's or fold runs (a cv folder), or None."""
    if (path / ENSEMBLE_FILE).is_file():
        return list(read_ensemble_file(path)["members"])
    if (path / "checkpoints" / "best.ckpt").is_file():
        return [path]
    folds = sorted((p for p in path.glob("fold_*") if (p / "checkpoints" / "best.ckpt").is_file()),
                   key=lambda p: (len(p.name), p.name))  # fold_10 after fold_9
    return folds or None


def read_ensemble_file(folder: str | Path) -> dict[str, Any]:
    """``FOLDER/ensemble.yaml``, its members resolved to run folders.

    Returns:
        ``members`` (paths), ``thresholds`` (task to per-class list) and ``thresholds_from``
        (how they were chosen, or ``None``).

    Raises:
        EnsembleError: When the file is not an ensemble file, or a member is not a run folder.
    """
    path = Path(folder) / ENSEMBLE_FILE
    content = load_yaml(path, "ensemble file", EnsembleError)
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        got = content.get("format") if isinstance(content, dict) else type(content).__name__
        raise EnsembleError(f"{str(path)!r} has format {got!r}; valid: {FORMAT!r} (written by `cellclass cv "
                            "--ensemble`)")
    members = content.get("members")
    if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
        raise EnsembleError(f"{str(path)!r}: members is {members!r}; valid: a list of run folders relative to it")
    if content.get("combine", COMBINE) != COMBINE:
        raise EnsembleError(f"{str(path)!r}: combine is {content.get('combine')!r}; valid: {COMBINE}")
    runs = []
    for name in members:
        run = Path(folder) / name
        if not (run / "checkpoints" / "best.ckpt").is_file():
            raise EnsembleError(f"{str(path)!r}: member {name!r} is not a run folder (no {name}/checkpoints/best.ckpt "
                                "beside the file); valid: the fold runs of the cv folder")
        runs.append(run)
    thresholds = content.get("thresholds") or {}
    if not isinstance(thresholds, dict) or not all(
            isinstance(v, list) and all(isinstance(x, (int, float)) for x in v) for v in thresholds.values()):
        raise EnsembleError(f"{str(path)!r}: thresholds is {thresholds!r}; valid: a mapping of multi-label tasks "
                            "to one number per class")
    return {"members": runs, "thresholds": {t: [float(x) for x in v] for t, v in thresholds.items()},
            "thresholds_from": content.get("thresholds_from")}


def write_ensemble_file(folder: str | Path, runs: Sequence[Path], thresholds: Mapping[str, Sequence[float]],
                        thresholds_from: str | None) -> Path:
    """Write ``FOLDER/ensemble.yaml`` naming ``runs`` relative to ``folder`` (``thresholds``: of the
    multi-label tasks, none without one)."""
    folder = Path(folder)
    content: dict[str, Any] = {
        "format": FORMAT,
        "members": [Path(r).resolve().relative_to(folder.resolve()).as_posix() for r in runs],
        "combine": COMBINE,
        "thresholds": {t: [round(float(x), 6) for x in v] for t, v in thresholds.items()},
    }
    if thresholds_from:
        content["thresholds_from"] = thresholds_from
    path = folder / ENSEMBLE_FILE
    text = yaml.safe_dump(content, sort_keys=False, default_flow_style=None, width=110)
    atomic_write_text(path, "# the models of this cross-validation, their probabilities averaged (`cellclass "
                            "predict` takes this folder)\n" + text)
    return path


@dataclass
class Ensemble:
    """Models whose probabilities are averaged, with the thresholds applied to the average.

    Attributes:
        members: One predictor per model.
        runs: Where each was loaded from.
        thresholds: Per-class thresholds of multi-label tasks, applied to the mean.
        thresholds_from: How they were chosen (said with every evaluation).
        field_thresholds: Multi-label field thresholds by task then aggregation: the mean of
            the members' where every member has them.
    """

    members: list[Predictor]
    runs: list[Path]
    thresholds: dict[str, list[float]] = field(default_factory=dict)
    thresholds_from: str = MEAN_THRESHOLDS
    field_thresholds: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    @classmethod
    def load(cls, paths: Sequence[str | Path], *, tta: bool | None = None) -> Ensemble:
        """The ensemble of run folders, ``.ckpt`` files and ``cellclass cv`` folders.

        A single cv folder with ``ensemble.yaml`` brings its thresholds; otherwise the mean
        of the members' thresholds is applied.

        Args:
            paths: The models; a cv folder stands for its members.
            tta: D4 test-time augmentation of every member (default: each member's setting).

        Raises:
            EnsembleError: When the members' tasks or classes differ (the message names the member).
            CheckpointError: When a path holds no checkpoint.
        """
        paths = [Path(p) for p in paths]
        runs = [r for p in paths for r in (_expand(p) or [p])]
        members = [Predictor.from_checkpoint(r, tta=tta) for r in runs]
        if len(paths) == 1 and (paths[0] / ENSEMBLE_FILE).is_file():
            saved = read_ensemble_file(paths[0])
            how = saved["thresholds_from"]
            return cls.of(members, runs, saved["thresholds"], f"{how} ({ENSEMBLE_FILE})" if how else ENSEMBLE_FILE)
        return cls.of(members, runs)

    @classmethod
    def of(cls, members: Sequence[Predictor], runs: Sequence[Path],
           thresholds: Mapping[str, Sequence[float]] | None = None, thresholds_from: str | None = None) -> Ensemble:
        """The ensemble of loaded predictors (``runs`` name them in messages).

        Args:
            members: The predictors.
            runs: Where each was loaded from.
            thresholds: Multi-label thresholds for the mean (default: the mean of the members').
            thresholds_from: How ``thresholds`` were chosen.

        Raises:
            EnsembleError: When there is no member, or the members' tasks or classes differ.
        """
        members, runs = list(members), [Path(r) for r in runs]
        if not members:
            raise EnsembleError("an ensemble needs at least one model; got none")
        check_members(members, runs)
        if thresholds is None:
            thresholds = mean_thresholds(members)
            thresholds_from = thresholds_from or ("the run's (tuned on its validation side)" if len(members) == 1
                                                  else MEAN_THRESHOLDS)
        encoders = members[0].encoders
        for task, values in thresholds.items():
            encoder = encoders.get(task)
            if encoder is None or encoder.type != "multilabel" or len(values) != encoder.n_outputs:
                raise EnsembleError(f"thresholds of task {task!r} ({len(values)} value(s)) do not fit the members"
                                    f"; valid: one per class of a multi-label task of theirs "
                                    f"({_describe_tasks(encoders)})")
        return cls(members, runs, {t: [float(x) for x in v] for t, v in thresholds.items()},
                   thresholds_from or "given", _mean_field_thresholds(members))

    # -- what the ensemble is -----------------------------------------------------------
    @property
    def encoders(self) -> dict[str, TaskEncoder]:
        """Task name to encoder: the members' (they are checked to agree)."""
        return self.members[0].encoders

    @property
    def tta(self) -> bool:
        """Whether every member averages over the D4 transforms."""
        return all(m.tta for m in self.members)

    @property
    def identity(self) -> dict[str, Any]:
        """What the predictions were made by: the members' model names and run folders."""
        names = sorted({str(m.identity.get("model")) for m in self.members})
        return {"model": f"ensemble of {len(self.members)} ({', '.join(names)})",
                "members": [str(r) for r in self.runs], "checkpoint": None}

    # -- predicting -----------------------------------------------------------------------
    def prepare(self, load: Callable[[Predictor], np.ndarray], name: str) -> list[np.ndarray]:
        """One image fitted to each member's input: ``(1, C, S, S)`` per member.

        Args:
            load: Reads the raw image as a member's training images were read
                (:meth:`Predictor.read_image`); called once per distinct way of reading.
            name: How error messages name the image.

        Raises:
            ImageReadError: When the image cannot be read or does not fit a member (named).
        """
        read: list[tuple[Any, np.ndarray]] = []
        out = []
        for run, member in zip(self.runs, self.members, strict=True):
            raw = next((image for axes, image in read if axes == member.axes), None)
            if raw is None:
                raw = load(member)
                read.append((member.axes, raw))
            try:
                out.append(member.prepare([raw], names=[name]))
            except ImageReadError as exc:
                if len(self.members) == 1:
                    raise
                raise ImageReadError(f"{exc} (ensemble member {str(run)!r})") from None
        return out

    def predict_prepared(self, prepared: Sequence[Sequence[np.ndarray]]) -> tuple[dict[str, np.ndarray],
                                                                                 list[dict[str, np.ndarray]]]:
        """Probabilities of images made by :meth:`prepare`: the mean, and each member's.

        Args:
            prepared: Per image, its arrays per member.
        """
        each = []
        for j, member in enumerate(self.members):
            x = member.normalize(np.concatenate([p[j] for p in prepared]))
            each.append(member.predict_normalized(x))
        return self.combine(each), each

    def combine(self, member_probabilities: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The mean of the members' probabilities, per task (the members' order kept)."""
        return {t: np.mean(np.stack([np.asarray(p[t], dtype=np.float64) for p in member_probabilities]), axis=0)
                for t in self.encoders}

    def decide(self, probabilities: Mapping[str, np.ndarray]) -> dict[str, list[Any]]:
        """Labels per task: argmax for single/binary, the ensemble's thresholds for multi-label."""
        return decide(self.encoders, self.thresholds, probabilities)

    def describe(self, probabilities: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
        """Per-image results (label and named probabilities per task) of probability arrays."""
        return describe(self.encoders, self.thresholds, probabilities)

    def agreement(self, member_probabilities: Sequence[Mapping[str, np.ndarray]],
                  probabilities: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Per task, the share of members whose own decision (with their own thresholds) is the
        ensemble's: 1 where all agree with it. A multi-label decision agrees when its whole set does."""
        ours = self.decide(probabilities)
        out = {}
        for task in self.encoders:
            votes = [m.decide({task: p[task]})[task] for m, p in zip(self.members, member_probabilities, strict=True)]
            out[task] = np.mean([[a == b for a, b in zip(v, ours[task], strict=True)] for v in votes], axis=0)
        return out


def check_members(members: Sequence[Predictor], runs: Sequence[Path]) -> None:
    """Every member has the first's tasks, task types and classes.

    Raises:
        EnsembleError: Naming the first member that differs, and how.
    """
    first = members[0].encoders
    for member, run in zip(members[1:], runs[1:], strict=True):
        tasks = member.encoders
        if set(tasks) != set(first):
            raise EnsembleError(f"ensemble member {str(run)!r} has tasks {', '.join(tasks)}; the first member "
                                f"{str(runs[0])!r} has {', '.join(first)}; valid: models of the same tasks and classes")
        for name, encoder in first.items():
            other = tasks[name]
            if other.type != encoder.type or list(other.classes) != list(encoder.classes):
                raise EnsembleError(
                    f"ensemble member {str(run)!r} has task {name!r} of type {other.type} with classes "
                    f"{', '.join(other.classes)}; the first member {str(runs[0])!r} has type {encoder.type} with "
                    f"classes {', '.join(encoder.classes)}; valid: models of the same tasks and classes")


def mean_thresholds(members: Sequence[Predictor]) -> dict[str, list[float]]:
    """Per multi-label task, the mean of the members' per-class thresholds (0.5 where one has none)."""
    out = {}
    for task, encoder in members[0].encoders.items():
        if encoder.type == "multilabel":
            values = [m.thresholds.get(task, [0.5] * encoder.n_outputs) for m in members]
            out[task] = [float(x) for x in np.mean(np.asarray(values, dtype=np.float64), axis=0)]
    return out


def _mean_field_thresholds(members: Sequence[Predictor]) -> dict[str, dict[str, list[float]]]:
    """Field thresholds every member has, averaged (a cell model's, by task then aggregation)."""
    out: dict[str, dict[str, list[float]]] = {}
    for task, by in members[0].field_thresholds.items():
        for key in by:
            values = [m.field_thresholds.get(task, {}).get(key) for m in members]
            if all(v is not None and len(v) == len(by[key]) for v in values):
                out.setdefault(task, {})[key] = [float(x) for x in np.mean(np.asarray(values), axis=0)]
    return out


def _describe_tasks(encoders: Mapping[str, TaskEncoder]) -> str:
    return "; ".join(f"{t} ({e.type}, {e.n_outputs} classes)" for t, e in encoders.items())
