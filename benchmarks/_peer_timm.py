"""A peer of benchmarks/peers.py: the plain timm + PyTorch loop a user would write.

Not cellclass (it imports none of it): timm's ``resnet18`` from scratch with ``in_chans`` =
the images' channels, AdamW with torch's defaults (lr 1e-3, weight decay 0.01), a cosine learning-rate decay
stepped per batch over the whole run, random horizontal and vertical flips (each p=0.5,
per image), plain cross-entropy, batch 64 (or ``--batch-size``), shuffled, for
``--epochs``. Validation macro F1 after every epoch picks the best epoch, whose weights
are tested (the way cellclass selects its checkpoint); the last epoch's test figures are
recorded too.

Images are read whole into memory at their stored size (no resizing) as float32:

* uint8 (MitoCheck PNG, one channel): divided by 255.
* uint16 (Jurkat TIFF, 3 x 40 x 40): ``--scale image`` (the default), per image and per
  channel, the 1st and 99.8th percentiles mapped to 0 and 1 and clipped; ``--scale global``
  the same with the percentiles of each channel over the training images.

    python benchmarks/_peer_timm.py FILES.csv RESULT.json --epochs 20

FILES.csv has the columns ``path,label,side`` (side: train, val or test). RESULT.json gets
the test predictions (path, label, prediction) with the timings; benchmarks/peers.py
scores them with the same metrics for every contender. Runs in the peers' environment
(``.venv-peers``: torch, timm, tifffile, scikit-learn), or any with those installed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import time

import numpy as np
import tifffile
import timm
import torch
from PIL import Image
from sklearn.metrics import f1_score
from torch import nn

LOW, HIGH = 1.0, 99.8


def read(path: str) -> np.ndarray:
    """One image as (C, H, W) in its stored dtype."""
    if path.lower().endswith((".tif", ".tiff")):
        img = tifffile.imread(path)
    else:
        img = np.asarray(Image.open(path))
    if img.ndim == 2:
        img = img[None]
    elif img.shape[-1] in (3, 4) and img.shape[0] not in (1, 3, 4):  # (H, W, C) PNG
        img = np.moveaxis(img, -1, 0)
    return img


def to_float(images: np.ndarray, train: np.ndarray, scale: str) -> np.ndarray:
    """(N, C, H, W) in the stored dtype -> float32 in about [0, 1]."""
    if images.dtype == np.uint8:
        return images.astype(np.float32) / 255.0
    x = images.astype(np.float32)
    if scale == "global":
        lo = np.percentile(x[train], LOW, axis=(0, 2, 3), keepdims=True)
        hi = np.percentile(x[train], HIGH, axis=(0, 2, 3), keepdims=True)
    else:
        lo = np.percentile(x, LOW, axis=(2, 3), keepdims=True)
        hi = np.percentile(x, HIGH, axis=(2, 3), keepdims=True)
    return np.clip((x - lo) / np.maximum(hi - lo, 1e-6), 0.0, 1.0)


def predict(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)]).numpy()


def train(model, x, y, val_x, val_y, epochs: int, batch: int, seed: int):
    """The loop; returns the best-epoch weights, the best epoch and the per-epoch log."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    loss_fn = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(seed)
    best, best_f1, best_state, log = 0, -1.0, None, []
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(x), generator=gen)
        total = 0.0
        for i in range(0, len(x), batch):
            idx = order[i:i + batch]
            xb, yb = x[idx].clone(), y[idx]
            flip_h = torch.rand(len(idx), generator=gen) < 0.5
            flip_v = torch.rand(len(idx), generator=gen) < 0.5
            xb[flip_h] = xb[flip_h].flip(-1)
            xb[flip_v] = xb[flip_v].flip(-2)
            loss = loss_fn(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        val_f1 = float(f1_score(val_y.numpy(), predict(model, val_x), average="macro"))
        log.append({"epoch": epoch, "train_loss": round(total / len(x), 4), "val_macro_f1": round(val_f1, 4)})
        print(json.dumps(log[-1]), flush=True)
        if val_f1 > best_f1:
            best, best_f1 = epoch, val_f1
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return best_state, best, log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files")
    parser.add_argument("result")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--scale", choices=["image", "global"], default="image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    with open(args.files, newline="") as f:
        rows = list(csv.DictReader(f))
    classes = sorted({r["label"] for r in rows})
    side = np.array([r["side"] for r in rows])
    images = np.stack([read(r["path"]) for r in rows])
    x = torch.from_numpy(to_float(images, side == "train", args.scale))
    y = torch.tensor([classes.index(r["label"]) for r in rows])
    tr, va, te = (torch.from_numpy(np.flatnonzero(side == s)) for s in ("train", "val", "test"))
    model = timm.create_model("resnet18", pretrained=False, num_classes=len(classes), in_chans=x.shape[1])
    t0 = time.perf_counter()
    best_state, best_epoch, log = train(model, x[tr], y[tr], x[va], y[va], args.epochs, args.batch_size, args.seed)
    train_seconds = time.perf_counter() - t0
    last = predict(model, x[te])
    model.load_state_dict(best_state)
    pred = predict(model, x[te])
    test = [rows[i] for i in te.tolist()]
    result = {
        "contender": "timm", "model": "timm resnet18, from scratch", "torch": torch.__version__,
        "timm": timm.__version__, "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "epochs": args.epochs, "batch_size": args.batch_size, "scale": args.scale, "image_shape": list(x.shape[1:]),
        "n_train": len(tr), "n_val": len(va), "n_test": len(te), "best_epoch": best_epoch,
        "selection": "best epoch by validation macro F1", "epochs_log": log,
        "train_seconds": round(train_seconds, 2), "script_seconds": round(time.perf_counter() - started, 2),
        "predictions": {"path": [r["path"] for r in test], "label": [r["label"] for r in test],
                        "pred": [classes[k] for k in pred], "pred_last_epoch": [classes[k] for k in last]},
    }
    tmp = args.result + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, args.result)


if __name__ == "__main__":
    main()
