"""Embed a dataset with a trained network: features, a 2-D map a person can read, profiles
and a linear probe.

:func:`embed_run` reads every image of a dataset as the run's images were read, takes the
network's penultimate features (:mod:`cellclass.inference.embeddings`) and writes, in one
folder:

- ``features.npy``: ``(N, D)`` float32, one row per image, in the order of ``embeddings.csv``;
- ``embeddings.csv``: ``id``, ``row`` (manifest row), ``split`` (the run's side of the
  image, where the dataset is the run's own), the manifest's other columns (metadata),
  then per task ``label_<task>`` and ``pred_<task>``, and ``map_x``, ``map_y``;
- ``plots/map_by_<what>.png``: the 2-D map (UMAP by default) coloured by class, by
  prediction and by each group column (plate, well);
- ``profiles.csv`` (when asked): the features aggregated per value of a column (well,
  treatment) by mean or median, the representation image-based profiling works on;
- ``embed.json``: what was done, and the probe: k-nearest-neighbour and logistic-regression
  classifiers fitted on the features of the run's training images and scored (macro F1)
  on its test images, beside the network's own score on the same images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from cellclass.atomic import atomic_path, atomic_write_text
from cellclass.data.labels import TaskEncoder
from cellclass.data.normalize import NormalizedView
from cellclass.data.prepared import PreparedData, PrepareSettings, prepare_pool
from cellclass.data.spec import ROW_COLUMN, DatasetSpec
from cellclass.errors import EmbeddingError
from cellclass.evaluation import plots as P
from cellclass.evaluation.evaluate import run_spec
from cellclass.evaluation.metrics import task_metrics
from cellclass.inference.embeddings import ModelOutputs, check_embeddable, model_outputs
from cellclass.inference.predictor import Predictor

log = logging.getLogger(__name__)

MAPS = ("umap", "pca", "none")
"""How the 2-D map is made: UMAP (umap-learn), the first two principal components, or none."""
PROFILE_STATS = ("mean", "median")
UMAP_MIN_IMAGES = 10
"""Fewer images than this are mapped by PCA (UMAP needs neighbours to work with)."""
KNN_NEIGHBOURS = 5


# -- pure parts ------------------------------------------------------------------------------
def map_2d(features: np.ndarray, method: str = "umap", seed: int = 0) -> tuple[np.ndarray | None, str]:
    """A 2-D map of ``(N, D)`` features, and what made it.

    Returns:
        ``(N, 2)`` coordinates (``None`` for ``none``) and the method used: ``pca`` where
        UMAP was asked for fewer than :data:`UMAP_MIN_IMAGES` images.

    Raises:
        EmbeddingError: When ``method`` is not one of :data:`MAPS`.
    """
    check_map(method)
    x = np.asarray(features, dtype=np.float32)
    if method == "none":
        return None, "none"
    if method == "umap" and len(x) >= UMAP_MIN_IMAGES:
        # umap-learn compiles its numba kernels on import (seconds): imported only when a UMAP is made.
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, len(x) - 1), random_state=seed)
        with warnings.catch_warnings():  # "n_jobs overridden by random_state": a seeded map is wanted
            warnings.simplefilter("ignore", UserWarning)
            return np.asarray(reducer.fit_transform(x), dtype=np.float64), "umap"
    used = "pca" if method == "pca" else f"pca (UMAP needs at least {UMAP_MIN_IMAGES} images)"
    scaled = StandardScaler().fit_transform(x) if len(x) > 1 else x
    n_components = min(2, len(x), x.shape[1])
    coords = np.zeros((len(x), 2))
    if n_components:
        coords[:, :n_components] = PCA(n_components=n_components, random_state=seed).fit_transform(scaled)
    return coords, used


def check_map(method: str) -> str:
    """``method`` when it is one of :data:`MAPS`.

    Raises:
        EmbeddingError: When it is not.
    """
    if method not in MAPS:
        raise EmbeddingError(f"map {method!r} is unknown; valid: {', '.join(MAPS)}")
    return method


def check_profiles(columns: Sequence[str], by: Sequence[str], stat: str) -> None:
    """Refuse profiles by columns the dataset lacks, or by a statistic other than mean or median.

    Raises:
        EmbeddingError: When a column is absent or ``stat`` is not mean or median.
    """
    if stat not in PROFILE_STATS:
        raise EmbeddingError(f"profile statistic {stat!r} is unknown; valid: {', '.join(PROFILE_STATS)}")
    missing = [c for c in by if c not in columns]
    if missing or not by:
        raise EmbeddingError(f"profile column(s) {missing or list(by)} are not in the dataset; valid: "
                             f"{', '.join(c for c in columns if c != ROW_COLUMN)}")


def profiles(frame: pd.DataFrame, features: np.ndarray, by: Sequence[str], stat: str = "mean") -> pd.DataFrame:
    """Features aggregated per value of the ``by`` columns (well, treatment): one profile per row.

    Returns:
        A frame with the ``by`` columns, ``n_images`` and ``f0 ... f{D-1}``, sorted by ``by``.

    Raises:
        EmbeddingError: When a column is absent or ``stat`` is not mean or median.
    """
    check_profiles(list(frame.columns), by, stat)
    names = [f"f{j}" for j in range(features.shape[1])]
    table = pd.concat([frame[list(by)].astype(str).reset_index(drop=True),
                       pd.DataFrame(features, columns=names)], axis=1)
    grouped = table.groupby(list(by), sort=True)
    out = grouped[names].mean() if stat == "mean" else grouped[names].median()
    out.insert(0, "n_images", grouped.size())
    return out.reset_index()


def probe(features: np.ndarray, targets: Mapping[str, np.ndarray], encoders: Mapping[str, TaskEncoder],
          train: np.ndarray, test: np.ndarray, network: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """kNN and logistic regression on the features: fitted on ``train`` rows, macro F1 on ``test`` rows.

    Features are standardised with the training rows' statistics. ``network`` holds the
    network's own probabilities of every row, scored on the same test rows for contrast.
    Multi-label tasks are not probed (the entry says so).
    """
    out: dict[str, Any] = {}
    for task, encoder in encoders.items():
        if encoder.type == "multilabel":
            out[task] = {"note": "multi-label task: not probed"}
            continue
        y = targets[task]
        fit_rows, score_rows = train[y[train] >= 0], test[y[test] >= 0]
        if len(np.unique(y[fit_rows])) < 2 or not len(score_rows):
            out[task] = {"note": f"{len(fit_rows)} labelled training and {len(score_rows)} labelled test images "
                                 "with fewer than two training classes: not probed"}
            continue
        scores = {"n_train": len(fit_rows), "n_test": len(score_rows)}
        k = min(KNN_NEIGHBOURS, len(fit_rows))
        classifiers = {
            "knn": make_pipeline(StandardScaler(), KNeighborsClassifier(n_neighbors=k)),
            "logreg": make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        }
        for name, classifier in classifiers.items():
            classifier.fit(features[fit_rows], y[fit_rows])
            proba = np.zeros((len(score_rows), encoder.n_outputs))
            proba[:, classifier.classes_] = classifier.predict_proba(features[score_rows])
            scores[f"{name}_macro_f1"] = _macro_f1(encoder, y[score_rows], proba)
        scores["network_macro_f1"] = _macro_f1(encoder, y[score_rows], network[task][score_rows])
        scores["knn_neighbours"] = k
        out[task] = scores
    return out


def _macro_f1(encoder: TaskEncoder, y: np.ndarray, proba: np.ndarray) -> float:
    return round(float(task_metrics(encoder.type, y, proba, encoder.classes)["macro_f1"]), 4)


# -- a run's embedding -----------------------------------------------------------------------
def embed_run(run: str | Path, settings: PrepareSettings, spec: DatasetSpec, out: str | Path, *,
              tta: bool = False, map_method: str = "umap", profile_by: Sequence[str] = (),
              profile_stat: str = "mean", seed: int = 0) -> dict[str, Any]:
    """Embed every image of ``spec`` with a run's best checkpoint and write the folder ``out``.

    Args:
        run: Run folder.
        settings: The run's configuration (how its images were read).
        spec: The dataset to embed (labels optional; the run's own dataset gives the probe).
        out: Output folder.
        tta: Average features and probabilities over the 8 D4 views.
        map_method: ``umap``, ``pca`` or ``none``.
        profile_by: Columns to aggregate profiles by (none: no ``profiles.csv``).
        profile_stat: ``mean`` or ``median``.
        seed: Seed of the map.

    Returns:
        The ``embed.json`` content.

    Raises:
        EmbeddingError: When the run is a baseline, or a map or profile option is invalid
            (checked before any image is read).
    """
    run, out = Path(run), Path(out)
    predictor = Predictor.from_checkpoint(run, tta=tta)
    check_embeddable(predictor, f"run {str(run)!r}")
    check_map(map_method)
    if profile_by:
        check_profiles(list(spec.load_manifest(labels=False).columns), profile_by, profile_stat)
    # stacks are read as the training images were, unless the dataset's spec says otherwise
    spec = dataclasses.replace(spec, image=spec.image.with_defaults(predictor.axes))
    data = prepare_pool(spec, settings, predictor.encoders)
    outputs = model_outputs(predictor, NormalizedView(data.images, predictor.normalizer, data.groups), tta=tta)
    sides = run_sides(run, data)
    coords, used = map_2d(outputs.features, map_method, seed)
    frame = embeddings_frame(data, predictor, outputs, sides, coords)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "features.npy") as tmp, open(tmp, "wb") as handle:
        np.save(handle, outputs.features)
    with atomic_path(out / "embeddings.csv") as tmp:
        frame.to_csv(tmp, index=False)
    plots = [] if coords is None else map_plots(out / "plots", coords, frame, data, predictor, used)
    summary: dict[str, Any] = {
        "run": str(run), "dataset": data.spec.name, "n_images": len(frame),
        "feature_dim": int(outputs.features.shape[1]), "model": predictor.identity.get("model"),
        "checkpoint": predictor.identity.get("checkpoint"), "tta": bool(tta), "map": used,
        "files": ["features.npy", "embeddings.csv", *plots], "probe": None,
    }
    if profile_by:
        table = profiles(data.frame, outputs.features, profile_by, profile_stat)
        with atomic_path(out / "profiles.csv") as tmp:
            table.to_csv(tmp, index=False)
        summary["profiles"] = {"by": list(profile_by), "stat": profile_stat, "n_profiles": len(table)}
        summary["files"].append("profiles.csv")
    if sides is None:
        summary["probe_note"] = ("not probed: the dataset is not the run's own (its training and test images "
                                 "are not all in it)")
    else:
        summary["probe"] = probe(outputs.features, data.targets, data.encoders, sides["train"], sides["test"],
                                 outputs.probabilities)
    atomic_write_text(out / "embed.json", json.dumps(summary, indent=2))
    return summary


def run_sides(run: Path, data: PreparedData) -> dict[str, np.ndarray] | None:
    """Positions in ``data`` of the run's training, validation and test images, when ``data`` is
    the run's own dataset (same image folder, every training and test image in it); else ``None``."""
    split_file = run / "split.json"
    if not split_file.is_file() or run_spec(run).image_root != data.spec.image_root:
        return None
    saved = json.loads(split_file.read_text()).get("ids", {})
    position = {image_id: i for i, image_id in reversed(list(enumerate(data.ids)))}
    sides = {}
    for side in ("train", "val", "test"):
        ids = saved.get(side, [])
        if side != "val" and (not ids or any(i not in position for i in ids)):
            return None
        sides[side] = np.asarray([position[i] for i in ids if i in position], dtype=np.int64)
    return sides


def embeddings_frame(data: PreparedData, predictor: Predictor, outputs: ModelOutputs,
                     sides: Mapping[str, np.ndarray] | None, coords: np.ndarray | None) -> pd.DataFrame:
    """``embeddings.csv``: ids, the run's side, metadata, labels and predictions per task, map coordinates."""
    split = np.full(len(data.ids), "", dtype=object)
    for side, rows in (sides or {}).items():
        split[rows] = side
    label_columns = {c for t in data.spec.tasks for c in t.columns}
    metadata = [c for c in data.frame.columns if c != ROW_COLUMN and c not in label_columns]
    frame = pd.DataFrame({"id": data.ids, "row": data.frame[ROW_COLUMN].to_numpy(), "split": split})
    for column in metadata:
        frame[column if column not in frame.columns else f"meta_{column}"] = data.frame[column].to_numpy()
    predictions = predictor.decide(outputs.probabilities)
    for task, encoder in predictor.encoders.items():
        if task in data.targets:
            decoded = encoder.decode(data.targets[task]) if encoder.type == "multilabel" else \
                [encoder.classes[i] if i >= 0 else "" for i in data.targets[task]]
        else:
            decoded = [""] * len(frame)
        frame[f"label_{task}"] = [_text(v) for v in decoded]
        frame[f"pred_{task}"] = [_text(v) for v in predictions[task]]
    if coords is not None:
        frame["map_x"], frame["map_y"] = np.round(coords[:, 0], 5), np.round(coords[:, 1], 5)
    return frame


def _text(value: Any) -> str:
    return ";".join(value) if isinstance(value, list) else str(value)


def map_plots(folder: Path, coords: np.ndarray, frame: pd.DataFrame, data: PreparedData, predictor: Predictor,
              method: str) -> list[str]:
    """The map coloured by class and by prediction (first task) and by each group column."""
    task = next(iter(predictor.encoders))
    name = method.split(" ")[0].upper()
    colourings = {"class": (frame[f"label_{task}"], f"{name} of the features, by class ({task})"),
                  "prediction": (frame[f"pred_{task}"], f"{name} of the features, by prediction ({task})")}
    for group in [g for g in data.spec.groups if g in data.frame.columns]:
        colourings[group] = (data.frame[group].astype(str), f"{name} of the features, by {group}")
    written = []
    for what, (categories, title) in colourings.items():
        path = folder / f"map_by_{re.sub(r'[^A-Za-z0-9_.-]', '_', what)}.png"
        P.plot_embedding_map(coords, list(categories), path, title=title)
        written.append(path.relative_to(folder.parent).as_posix())
    return written
