"""A peer of benchmarks/peers.py: what a fastai user would write.

Not cellclass (it imports none of it): fastai 2.8's ``vision_learner(dls, resnet18,
pretrained=False)`` (torchvision's ResNet18 body, fastai's head), trained with
``fit_one_cycle(EPOCHS, 3e-3)`` at batch 64 (or ``--batch-size``), fastai's default
optimizer (Adam with true weight decay 0.01) and loss (cross-entropy), and
``aug_transforms(flip_vert=True)`` as batch transforms: dihedral flips (``Dihedral``, p=0.5),
rotation up to 10 degrees, zoom up to 1.1, warp 0.2 and lighting 0.2, fastai's defaults.
No Normalize (``vision_learner`` adds ImageNet statistics only to pretrained models). It
trains on the train side, validates on val after each epoch, keeps the last epoch (what
``fit_one_cycle`` leaves) and predicts test, once plainly and once with ``learn.tta``
(fastai's default: the mean of 4 augmented passes, blended 0.25 : 0.75 with the plain one).

Images are what fastai reads: ``PILImage`` opens a PNG and converts it to 3-channel RGB
(MitoCheck's grayscale PNGs become 3 equal channels), at the stored size (no resizing).
A TIFF fastai cannot read as stored (Jurkat: 3 x 40 x 40 uint16) is first written as an
8-bit RGB PNG to a temporary folder, the three stored channels as R, G and B, scaled with
``--scale global`` (the default) per channel by the 1st and 99.8th percentiles over the
training images (to 0 and 255, clipped; one scale for every image, so intensities stay
comparable between cells), or ``--scale image`` by each image's own percentiles. The
conversion counts in the end-to-end time, not the training time.

    python benchmarks/_peer_fastai.py FILES.csv RESULT.json --epochs 20

FILES.csv has the columns ``path,label,side`` (side: train, val or test). RESULT.json gets
the test predictions (path, label, prediction, TTA prediction) with the timings;
benchmarks/peers.py scores them with the same metrics for every contender. Runs in the
peers' environment (``.venv-peers``, benchmarks/requirements-peers.txt).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import fastai
import numpy as np
import pandas as pd
import tifffile
import torch
from fastai.vision.all import (
    CategoryBlock,
    ColReader,
    ColSplitter,
    DataBlock,
    F1Score,
    ImageBlock,
    accuracy,
    aug_transforms,
    resnet18,
    set_seed,
    vision_learner,
)
from PIL import Image

LOW, HIGH = 1.0, 99.8


def to_png(frame: pd.DataFrame, folder: Path, scale: str) -> pd.DataFrame:
    """TIFFs as 8-bit PNGs in ``folder`` (see the module docstring); the frame with the new paths."""
    stack = np.stack([tifffile.imread(p) for p in frame["path"]]).astype(np.float32)
    if stack.ndim == 3:
        stack = stack[:, None]
    if stack.shape[1] not in (1, 3):
        raise SystemExit(f"cannot make an RGB or grayscale PNG of {stack.shape[1]} channels")
    if scale == "global":
        train = stack[(frame["side"] == "train").to_numpy()]
        lo = np.percentile(train, LOW, axis=(0, 2, 3), keepdims=True)
        hi = np.percentile(train, HIGH, axis=(0, 2, 3), keepdims=True)
    else:
        lo = np.percentile(stack, LOW, axis=(2, 3), keepdims=True)
        hi = np.percentile(stack, HIGH, axis=(2, 3), keepdims=True)
    u8 = np.round(np.clip((stack - lo) / np.maximum(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8)
    paths = []
    for i, img in enumerate(u8):
        path = folder / f"{i:06d}.png"
        Image.fromarray(img[0] if img.shape[0] == 1 else np.moveaxis(img, 0, -1)).save(path)
        paths.append(str(path))
    return frame.assign(path=paths)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files")
    parser.add_argument("result")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--scale", choices=["image", "global"], default="global")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    set_seed(args.seed)
    frame = pd.read_csv(args.files, dtype=str)
    original = frame["path"].tolist()
    with tempfile.TemporaryDirectory(prefix="peer-fastai-") as tmp:
        converted = frame["path"].str.lower().str.endswith((".tif", ".tiff")).any()
        if converted:
            frame = to_png(frame, Path(tmp), args.scale)
        classes = sorted(frame["label"].unique())
        fit = frame[frame["side"] != "test"].assign(is_valid=lambda f: f["side"] == "val").reset_index(drop=True)
        block = DataBlock(blocks=(ImageBlock, CategoryBlock(vocab=classes)), get_x=ColReader("path"),
                          get_y=ColReader("label"), splitter=ColSplitter("is_valid"),
                          batch_tfms=aug_transforms(flip_vert=True))
        dls = block.dataloaders(fit, bs=args.batch_size)
        learn = vision_learner(dls, resnet18, pretrained=False, metrics=[accuracy, F1Score(average="macro")])
        t0 = time.perf_counter()
        with learn.no_bar():
            learn.fit_one_cycle(args.epochs, 3e-3)
        train_seconds = time.perf_counter() - t0
        names = learn.recorder.metric_names[1:-1]  # read now: get_preds starts the recorder anew
        log = [dict(zip(names, map(float, v))) for v in learn.recorder.values]
        test = frame[frame["side"] == "test"].reset_index(drop=True)
        test_dl = learn.dls.test_dl(test, with_labels=True)
        with learn.no_bar():
            probs, _ = learn.get_preds(dl=test_dl)
            tta_probs, _ = learn.tta(dl=test_dl)
        vocab = list(learn.dls.vocab)
    idx = np.flatnonzero((pd.read_csv(args.files, dtype=str)["side"] == "test").to_numpy())
    result = {
        "contender": "fastai", "model": "fastai vision_learner resnet18, pretrained=False",
        "fastai": fastai.__version__, "torch": torch.__version__, "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(), "epochs": args.epochs, "batch_size": args.batch_size,
        "converted_to_png": bool(converted), "scale": args.scale if converted else None,
        "n_train": int((fit["side"] == "train").sum()), "n_val": int(fit["is_valid"].sum()), "n_test": len(test),
        "selection": "last epoch (fit_one_cycle)", "epochs_log": log,
        "train_seconds": round(train_seconds, 2), "script_seconds": round(time.perf_counter() - started, 2),
        "predictions": {"path": [original[i] for i in idx], "label": test["label"].tolist(),
                        "pred": [vocab[k] for k in probs.argmax(1).tolist()],
                        "pred_tta": [vocab[k] for k in tta_probs.argmax(1).tolist()]},
    }
    tmp_path = args.result + ".tmp"
    with open(tmp_path, "w") as f:
        json.dump(result, f)
    os.replace(tmp_path, args.result)


if __name__ == "__main__":
    main()
