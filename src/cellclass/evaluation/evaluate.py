"""Re-evaluate a finished run: on its own test split, or on another dataset."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from cellclass.data.spec import DatasetSpec
from cellclass.errors import CellclassError


def run_spec(run: str | Path) -> DatasetSpec:
    """The dataset spec a run was trained on (from its ``config.yaml``)."""
    path = Path(run) / "config.yaml"
    if not path.is_file():
        raise CellclassError(f"{str(run)!r} is not a run folder: no config.yaml (made by `cellclass train`)")
    dataset = dict(yaml.safe_load(path.read_text())["dataset"])
    base = dataset.pop("base_dir")
    return DatasetSpec.from_dict(dataset, base_dir=base)


def run_config(run: str | Path) -> Any:
    """The resolved :class:`TrainConfig` of a run."""
    from cellclass.training.config import TrainConfig

    data = yaml.safe_load((Path(run) / "config.yaml").read_text())
    return TrainConfig.from_dict(data["train"])


def evaluate_run(run: str | Path, *, spec: DatasetSpec | None = None, out: str | Path | None = None,
                 tta: bool | None = None, progress: Any = None) -> dict[str, Any]:
    """Evaluate a run's best checkpoint and write metrics.json, predictions.csv, plots and a report.

    Without ``spec``: on the run's own test split (the saved row positions), with the
    thresholds tuned at training time. With ``spec``: on every row of that dataset,
    which must carry the same tasks and classes.

    Args:
        run: Run folder.
        spec: Another dataset to evaluate on.
        out: Output folder (default ``RUN/evaluation`` or ``RUN/evaluation-<dataset>``).
        tta: Override the run's test-time augmentation setting.
        progress: Progress callback ``(stage, done, total)``.
    """
    from cellclass.data.splits import Split
    from cellclass.evaluation.report import (
        evaluate_tasks,
        predictions_frame,
        write_plots,
        write_report,
    )
    from cellclass.serving.predictor import Predictor
    from cellclass.training.loop import prepare_data

    run = Path(run)
    config = run_config(run)
    predictor = Predictor.from_checkpoint(run, tta=tta)
    own = spec is None
    spec = (run_spec(run) if own else spec).select_tasks(list(predictor.encoders))
    if not own:  # stacks are read as the training images were, unless the spec says otherwise
        spec = dataclasses.replace(spec, image=spec.image.with_defaults(predictor.axes))
    if own:
        saved = json.loads((run / "split.json").read_text())["split"]
        override = {k: (np.asarray(v, dtype=np.int64) if k in ("train", "val", "test") else v)
                    for k, v in saved.items()}
    else:
        override = None
    data = prepare_data(spec, config, split_override=override, progress=progress) if own else None
    if data is None:
        from cellclass.data.cache import images_for_training
        from cellclass.data.labels import encode_frame
        from cellclass.training.loop import PreparedData

        frame = spec.load_manifest()
        targets = encode_frame(spec, frame, predictor.encoders)
        images = images_for_training(spec, frame, size=config.image_size, mode=config.fit,
                                     channels=config.channels or None, workers=config.workers,
                                     cache_dir=config.cache_dir)
        n = len(frame)
        split = Split(train=np.array([], dtype=np.int64), val=np.array([], dtype=np.int64),
                      test=np.arange(n), method="external dataset", group=None, seed=0, fractions={})
        ids = [spec.image_id(r) for r in frame.to_dict("records")]
        data = PreparedData(spec, frame, predictor.encoders, targets, None, split, None, images, ids)
    groups = data.groups
    from cellclass.data.loading import NormalizedView

    x = NormalizedView(data.images, predictor.normalizer, groups)
    idx = data.split.test if len(data.split.test) else data.split.val
    probs = predictor.predict_normalized(x[idx])
    targets = {t: v[idx] for t, v in data.targets.items()}
    tasks = evaluate_tasks(predictor, targets, probs, predictor.thresholds)
    out = Path(out) if out else run / ("evaluation" if own else f"evaluation-{spec.name}")
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "dataset": spec.name,
        "run": str(run),
        "split": data.describe_split() if own else {"method": "external dataset: every row evaluated",
                                                     "n_rows": int(len(idx))},
        "evaluation": {"on": "test" if own and len(data.split.test) else "all rows" if not own else "val",
                       "n_images": int(len(idx)), "checkpoint": predictor.identity.get("checkpoint"),
                       "tta": "D4 (8 flips/rotations averaged)" if predictor.tta else "none",
                       "thresholds": "per class, tuned on the run's validation split"
                       if predictor.thresholds else "argmax (single-label tasks)"},
        "model": config.model,
        "tasks": tasks,
    }
    from cellclass.atomic import atomic_path, atomic_write_text
    from cellclass.evaluation.report import _json_default

    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2, default=_json_default))
    frame = predictions_frame(predictor, [data.ids[i] for i in idx], data.frame["_row"].to_numpy()[idx],
                              targets, probs, "test")
    with atomic_path(out / "predictions.csv") as tmp:
        frame.to_csv(tmp, index=False)
    write_report(out, result, write_plots(out, predictor, targets, probs, tasks))
    return result


def compare_runs(runs: list[str | Path], *, task: str | None = None, metric: str = "macro_f1",
                 n_boot: int = 2000, seed: int = 0, out: str | Path | None = None) -> dict[str, Any]:
    """Compare finished runs on the same test images, task by task.

    For each task: every run's accuracy and macro F1 with bootstrap confidence intervals,
    and for every pair a paired bootstrap of the difference and McNemar's test. Runs
    scored on different test images are refused (see
    :func:`cellclass.evaluation.compare.align_predictions`).

    Raises:
        CellclassError: When fewer than two runs are given or they share no task.
    """
    import pandas as pd

    from cellclass.evaluation.compare import compare_predictions, model_table

    if len(runs) < 2:
        raise CellclassError(f"compare needs at least two run folders, got {len(runs)}")
    names, metas, preds = [], {}, {}
    for run in runs:
        run = Path(run)
        for required in ("metrics.json", "predictions.csv"):
            if not (run / required).is_file():
                raise CellclassError(f"{str(run)!r} has no {required}; is it a finished `cellclass train` run?")
        name = run.name if run.name not in names else str(run)
        names.append(name)
        metas[name] = json.loads((run / "metrics.json").read_text())
        preds[name] = pd.read_csv(run / "predictions.csv", dtype=str, keep_default_na=False)
    shared = [t for t in metas[names[0]]["tasks"] if all(t in m["tasks"] for m in metas.values())]
    if task is not None:
        if task not in shared:
            raise CellclassError(f"task {task!r} is not in every run; shared tasks: {', '.join(shared) or 'none'}")
        shared = [task]
    if not shared:
        raise CellclassError("the runs share no task")
    result: dict[str, Any] = {"metric": metric, "n_boot": n_boot, "runs": {n: str(r) for n, r in zip(names, runs)},
                              "tasks": {}}
    for t in shared:
        frames = {n: pd.DataFrame({"image": p["image"], "y_true": p[f"{t}__true"], "y_pred": p[f"{t}__pred"]})
                  for n, p in preds.items()}
        table = model_table(frames, metrics=("accuracy", "macro_f1"), n_boot=n_boot, seed=seed)
        table.insert(0, "run", table.pop("model"))
        table["model_name"] = [metas[n].get("model") for n in table["run"]]
        table["split"] = [_split_text(metas[n]["split"]) for n in table["run"]]
        pairs = compare_predictions(frames, metric=metric, n_boot=n_boot, seed=seed)
        result["tasks"][t] = {"n": int(table["n"].iloc[0]), "table": table.to_dict("records"),
                              "pairs": pairs.to_dict("records")}
    if out is not None:
        from cellclass.atomic import atomic_write_text
        from cellclass.evaluation.plots import plot_comparison
        from cellclass.evaluation.report import _json_default

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "compare.json", json.dumps(result, indent=2, default=_json_default))
        for t, block in result["tasks"].items():
            frame = pd.DataFrame(block["table"]).rename(columns={"run": "model"})
            plot_comparison(frame, "macro_f1", out / f"compare_{t}.png")
    return result


def _split_text(split: dict[str, Any]) -> str:
    method = split.get("method", "?")
    group = split.get("group_column")
    return f"{method} by {group}" if group else str(method)
