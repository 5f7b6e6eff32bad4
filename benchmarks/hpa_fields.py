"""Simulated HPA fields end to end: a cell model aggregated to fields vs a model of whole fields.

The weak-label setting of the HPA single-cell challenge. ``simulate_hpa_fields`` renders
fields of 20 to 45 cells, each cell showing a subset of its field's 1 to 3 labels. One
split of the fields (cellclass's group split, each field its own group, stratified on the
labels; seed ``--seed``) is shared by both models:

(a) **cell model**: the fields are segmented (``segment_fields``: nuclei by the default
    backend on the blue channel, whole cells grown on the red microtubule channel; or, with
    ``--true-masks``, the simulator's true cell masks), cut into 64 x 64 crops centred on
    each cell, neighbours masked (``make_crops``), each crop inheriting its field's labels
    and split side; LeNet-5 is trained on the training fields' cells, predicts every cell
    of the validation and test fields, and the cells' probabilities are aggregated to their
    field (``aggregate_multilabel``: mean, max, top-3 mean);
(b) **field model**: LeNet-5 trained on the whole fields (resized to ``--field-size``).

Both train for the same number of epochs with the same settings (``TrainConfig`` defaults:
AdamW, one-cycle, D4 + intensity augmentation, automatic batch size; float32, no TTA), and
both are scored the same way: per-class thresholds tuned for F1 on the validation fields,
then field-level macro F1 on the test fields (over the classes present or predicted).
``ratio`` is a cell model's test macro F1 over the field model's.

    python benchmarks/hpa_fields.py            # 200 fields of 512 x 512, 10 epochs: ~10 min on 2 cores
    python benchmarks/hpa_fields.py --quick    # 24 fields of 256 x 256, 2 epochs: a smoke run, not a figure
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from _common import machine
from cellclass.data.crops import make_crops
from cellclass.data.io import read_image
from cellclass.data.masks import segment_fields
from cellclass.data.presets import HPA_CLASSES, hpa
from cellclass.data.segment import SkimageBackend
from cellclass.data.simulate_hpa_fields import simulate_hpa_fields
from cellclass.data.spec import DatasetSpec
from cellclass.data.splits import make_split
from cellclass.evaluation.aggregate import aggregate_multilabel
from cellclass.evaluation.metrics import multilabel_metrics
from cellclass.evaluation.segmentation_metrics import match_objects, mean_over_fields
from cellclass.evaluation.thresholds import tune_thresholds
from cellclass.inference.predictor import Predictor
from cellclass.training.config import TrainConfig
from cellclass.training.loop import train

TASK = "localization"
CROP = 64
NUCLEUS_CHANNEL, CELL_CHANNEL = 2, 0  # HPA: blue nuclei, red microtubules
AGGREGATIONS = (("mean", {}), ("max", {}), ("topk_mean", {"k": 3}))
BATCH = 256  # images predicted at once


def make_fields(root: Path, n: int, size: int, seed: int, workers: int) -> tuple[DatasetSpec, float]:
    """Simulate the fields, then write ``fields.csv``: ``train.csv`` plus the split of each field."""
    start = time.perf_counter()
    simulate_hpa_fields(root, n_fields=n, size=size, seed=seed, workers=workers)
    seconds = time.perf_counter() - start
    frame = pd.read_csv(root / "train.csv", dtype=str, keep_default_na=False)
    spec = hpa(root)
    labels = indicator(spec.labels(spec.load_manifest(), TASK))
    split = make_split(frame, labels=labels, groups=frame["Id"].to_numpy(), method="group", seed=seed,
                       group_column="Id")
    side = np.empty(len(frame), dtype=object)
    for name in ("train", "val", "test"):
        side[split.side(name)] = name
    frame.assign(split=side).to_csv(root / "fields.csv", index=False)
    return dataclasses.replace(hpa(root, manifest="fields.csv"), split_column="split"), seconds


def indicator(labels: list[list[str]]) -> np.ndarray:
    """Class lists as an ``(N, K)`` 0/1 matrix over HPA's classes."""
    index = {c: k for k, c in enumerate(HPA_CLASSES)}
    y = np.zeros((len(labels), len(HPA_CLASSES)), np.int64)
    for i, classes in enumerate(labels):
        y[i, [index[c] for c in classes]] = 1
    return y


def predict(run: Path, images: list[np.ndarray]) -> np.ndarray:
    """The run's best checkpoint's probabilities of the task for raw images, in batches."""
    predictor = Predictor.from_checkpoint(run, tta=False)
    out = []
    for start in range(0, len(images), BATCH):
        x = predictor.normalize(predictor.prepare(images[start:start + BATCH]))
        out.append(predictor.predict_normalized(x)[TASK])
    return np.concatenate(out)


def field_f1(y_val: np.ndarray, p_val: np.ndarray, y_test: np.ndarray, p_test: np.ndarray) -> dict[str, float]:
    """Thresholds tuned for F1 on validation fields, then the test fields' macro F1."""
    thresholds = tune_thresholds(y_val, p_val, "f1")
    test = multilabel_metrics(y_test, p_test, list(HPA_CLASSES), thresholds)
    val = multilabel_metrics(y_val, p_val, list(HPA_CLASSES), thresholds)
    return {"test_macro_f1": round(test["macro_f1"], 4), "test_micro_f1": round(test["micro_f1"], 4),
            "val_macro_f1": round(val["macro_f1"], 4)}


def segmentation_score(fields: Path, seg: Path, ids: list[str]) -> dict[str, float]:
    """Object F1 at IoU 0.5 of the segmented cells against the true cells, mean over fields."""
    scores = [match_objects(read_image(fields / "masks" / f"{i}.tif")[0], read_image(seg / "masks" / f"{i}.tif")[0])
              for i in ids]
    return {k: round(v, 4) for k, v in mean_over_fields(scores).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="24 fields of 256 x 256, 2 epochs (a smoke run)")
    parser.add_argument("--fields", type=int, help="number of fields (default 200; quick 24)")
    parser.add_argument("--size", type=int, help="field side in pixels (default 512; quick 256)")
    parser.add_argument("--epochs", type=int, help="epochs of each model (default 10; quick 2)")
    parser.add_argument("--field-size", type=int, default=256, help="side the field model sees (default 256)")
    parser.add_argument("--model", default="lenet5", help="network of both models (default lenet5)")
    parser.add_argument("--true-masks", action="store_true", help="crop around the true cells, not segmented ones")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fields, the split and training")
    parser.add_argument("--workers", type=int, default=2, help="processes simulating, segmenting and cropping")
    parser.add_argument("--workdir", type=Path, help="folder for fields, crops and runs (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    logging.getLogger("cellclass.evaluation.thresholds").setLevel(logging.WARNING)  # classes the fields never show
    n = args.fields or (24 if args.quick else 200)
    size = args.size or (256 if args.quick else 512)
    epochs = args.epochs or (2 if args.quick else 10)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cellclass-hpa-fields-"))
    if args.workdir is not None and any(work.iterdir() if work.is_dir() else []):
        sys.exit(f"--workdir {work} is not empty; give a new or empty folder")
    info = machine()
    print(f"machine: {info}", flush=True)
    timings: dict[str, float] = {}
    try:
        # -- the fields and their split ----------------------------------------------------
        fields_dir = work / "fields"
        spec, timings["simulate_s"] = make_fields(fields_dir, n, size, args.seed, args.workers)
        frame = spec.load_manifest()
        y_fields = indicator(spec.labels(frame, TASK))
        sides = frame["split"].to_numpy()
        counts = {s: int((sides == s).sum()) for s in ("train", "val", "test")}
        n_cells_true = len(pd.read_csv(fields_dir / "cells_truth.csv"))
        print(f"{n} fields of {size} x {size} ({n_cells_true} cells) in {timings['simulate_s']:.0f} s; split by "
              f"field: {counts}", flush=True)

        # -- (a) cells: segment (or the true masks), crop, train, predict, aggregate ----------
        start = time.perf_counter()
        if args.true_masks:
            masks, seg_score = fields_dir, None
        else:
            masks = work / "seg"
            segment_fields(spec, SkimageBackend(channel=NUCLEUS_CHANNEL), masks, cell_channel=CELL_CHANNEL,
                           workers=args.workers)
            seg_score = segmentation_score(fields_dir, masks, frame["Id"].tolist())
        timings["segment_s"] = time.perf_counter() - start
        start = time.perf_counter()
        crops = make_crops(spec, masks, work / "cells", CROP, mask_neighbours=True, border="pad",
                           workers=args.workers)
        timings["crop_s"] = time.perf_counter() - start
        print(f"cells: {'true masks' if args.true_masks else f'segmented, object F1 {seg_score}'}; "
              f"{crops.n_cells} crops in {timings['segment_s'] + timings['crop_s']:.0f} s", flush=True)

        common = TrainConfig(model=args.model, epochs=epochs, split="predefined", tta=False, precision="32-true",
                             seed=args.seed, workers=2)
        cell_spec = DatasetSpec.from_yaml(crops.spec)
        cell_run = work / "runs" / "cells"
        cell_metrics = train(cell_spec, dataclasses.replace(common, image_size=CROP), cell_run)
        cells = cell_spec.load_manifest()
        cell_sides = cells["split"].to_numpy()
        if not set(cells.loc[cell_sides == "train", "field_id"]).isdisjoint(cells.loc[cell_sides != "train",
                                                                                         "field_id"]):
            sys.exit("a field has cells on both sides of the split: the comparison would not be fair")
        keep = cell_sides != "train"
        held = cells[keep]
        p_cells = predict(cell_run, [read_image(work / "cells" / c) for c in held["crop"]])
        print(f"cell model: {cell_metrics['train_seconds']:.0f} s training, cell-level test macro F1 "
              f"{cell_metrics['tasks'][TASK]['macro_f1']:.3f} (against the inherited field labels)", flush=True)

        # -- (b) whole fields -------------------------------------------------------------
        field_run = work / "runs" / "fields"
        field_metrics = train(spec, dataclasses.replace(common, image_size=args.field_size, fit="resize"), field_run)
        held_fields = frame[sides != "train"].reset_index(drop=True)
        p_fields = predict(field_run, [spec.read_image(r) for r in held_fields.to_dict("records")])
        print(f"field model: {field_metrics['train_seconds']:.0f} s training", flush=True)

        # -- scored alike: thresholds on validation fields, macro F1 on test fields ----------
        y_of = {i: y_fields[k] for k, i in enumerate(frame["Id"])}
        side_of = dict(zip(frame["Id"], sides, strict=True))
        rows = []
        for method, kwargs in AGGREGATIONS:
            agg = aggregate_multilabel(held["field_id"].to_numpy(), p_cells, method=method, **kwargs)
            on = {s: np.array([side_of[f] == s for f in agg.fields]) for s in ("val", "test")}
            y = np.stack([y_of[f] for f in agg.fields])
            scores = field_f1(y[on["val"]], agg.proba[on["val"]], y[on["test"]], agg.proba[on["test"]])
            rows.append({"model": f"cells + {method}" + (f" (k={kwargs['k']})" if kwargs else ""), **scores,
                         "n_test_fields": int(on["test"].sum())})
        on = {s: (held_fields["split"] == s).to_numpy() for s in ("val", "test")}
        y = np.stack([y_of[f] for f in held_fields["Id"]])
        field_scores = field_f1(y[on["val"]], p_fields[on["val"]], y[on["test"]], p_fields[on["test"]])
        rows.append({"model": f"whole fields ({args.field_size} px)", **field_scores,
                     "n_test_fields": int(on["test"].sum())})
        base = field_scores["test_macro_f1"]
        for row in rows:
            row["ratio"] = round(row["test_macro_f1"] / base, 3) if base else None
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep:
            print(f"kept {work}")

    print(f"\n{'model':<28} {'test macro F1':>13} {'test micro F1':>13} {'val macro F1':>12} {'ratio':>6}")
    for row in rows:
        print(f"{row['model']:<28} {row['test_macro_f1']:>13.3f} {row['test_micro_f1']:>13.3f} "
              f"{row['val_macro_f1']:>12.3f} {row['ratio'] if row['ratio'] is not None else '':>6}")
    print(f"train images: {cell_metrics['steps']['train_images']} cells vs "
          f"{field_metrics['steps']['train_images']} fields; {epochs} epochs each; batch sizes "
          f"{cell_metrics['batch_size']} and {field_metrics['batch_size']}; train seconds "
          f"{cell_metrics['train_seconds']:.0f} and {field_metrics['train_seconds']:.0f}")
    print(json.dumps({
        "benchmark": "hpa_fields", "quick": args.quick, "machine": info, "fields": n, "field_size": size,
        "split": counts, "cells": crops.n_cells, "true_cells": n_cells_true,
        "masks": "true" if args.true_masks else "segmented (skimage nuclei on blue, cells grown on red)",
        "segmentation_vs_truth": seg_score, "crop": CROP, "field_model_size": args.field_size, "model": args.model,
        "epochs": epochs, "seed": args.seed, "rows": rows,
        "cell_level_test_macro_f1": round(cell_metrics["tasks"][TASK]["macro_f1"], 4),
        "train_seconds": {"cells": cell_metrics["train_seconds"], "fields": field_metrics["train_seconds"]},
        "batch_size": {"cells": cell_metrics["batch_size"], "fields": field_metrics["batch_size"]},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }))


if __name__ == "__main__":
    sys.exit(main())
