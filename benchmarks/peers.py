"""Peers benchmark: cellclass's defaults against what a user would pick instead, same split.

For each data set, in one run, three contenders train on the same train / val / test files:

1. **cellclass**: ``cellclass train MANIFEST ... --model resnet18 --out RUN``, every other
   setting its default (epochs, automatic batch size, augmentation, class weights, best
   epoch by validation macro F1, D4 test-time augmentation at evaluation). Its run folder's
   ``split.json`` is the split every peer gets, and its ``config.yaml`` / ``metrics.json``
   the epochs and batch size they get.
2. **fastai**: ``vision_learner(resnet18, pretrained=False)``, ``fit_one_cycle(EPOCHS, 3e-3)``,
   ``aug_transforms(flip_vert=True)``; tested plainly and with ``learn.tta``
   (benchmarks/_peer_fastai.py says exactly what, and how Jurkat's uint16 TIFFs become PNGs).
3. **timm**: a plain PyTorch loop over timm's ``resnet18`` from scratch, AdamW, cosine
   decay, random flips, cross-entropy; best epoch by validation macro F1
   (benchmarks/_peer_timm.py).

Data sets (under ../shared/data, or --data; a missing one is skipped with a message):
``mitocheck`` (16 phenotypes, split by plate), ``jurkat`` (7 phases, stratified random
split: no group split can hold every phase on both sides) and ``mitocheck_random``
(MitoCheck with a random cell-level split, which lets cells of one plate sit on both
sides: what that leakage is worth).

Every contender runs as its own process; the table gives test macro F1, accuracy, weighted
F1 and balanced accuracy (all scored here, from each contender's test predictions, with
cellclass's definitions), the training time (the epochs, with their validation passes),
the end-to-end time of the process, training images per second (train images x epochs /
training time), and peak memory: the peak resident set of the largest single process
(``ru_maxrss`` from ``wait4``) and of the process tree with its loader workers (``VmRSS``
summed, sampled every 0.5 s). The last line is JSON: per data set the figures, ``ratio`` =
cellclass macro F1 / best peer macro F1 (the best over fastai, fastai + TTA, timm
best-epoch and timm last-epoch) and ``time_ratio`` = cellclass training time / that peer's;
the top-level ``ratio`` is the worst (lowest) over mitocheck and jurkat, ``time_ratio``
the highest; mitocheck_random (a leaky split) is reported, not counted in them.

    python benchmarks/peers.py --out bench-runs/peers                 # full: cellclass's epochs (auto) for each
    python benchmarks/peers.py --out bench-runs/peers --only jurkat
    python benchmarks/peers.py --quick --out /tmp/peers-quick         # 2 epochs, a fifth of the data: a smoke run

The peers run in their own environment, never cellclass's (``--peers-python``; default
``.venv-peers/bin/python`` at the repository root):

    python3.11 -m venv .venv-peers && .venv-peers/bin/pip install -r benchmarks/requirements-peers.txt

Finished contenders are reused from --out (a contender is finished when its result and its
``bench.json`` are there), so an interrupted run resumes; a folder made with other
``--epochs`` / ``--fraction`` is refused. ``--epochs`` applies to all contenders.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml
from _common import machine, tree_rss_mb

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PEERS = {"fastai": HERE / "_peer_fastai.py", "timm": HERE / "_peer_timm.py"}
COUNTED = ("mitocheck", "jurkat")  # the data sets the top-level ratios are taken over


def datasets(data: Path) -> dict[str, dict]:
    """Name -> manifest, its image and label columns, and the options of `cellclass train`."""
    mito = data / "mitocheck_h2b_phenotypes" / "labels.csv"
    ifc = data / "ifc_cellcycle_jurkat_mlcp" / "labels.csv"
    mito_spec = [mito, "--image-col", "filename", "--task", "phenotype", "--group", "plate"]
    return {
        "mitocheck": {"manifest": mito, "label": "phenotype", "spec": mito_spec},
        "jurkat": {"manifest": ifc, "label": "phase",
                   "spec": [ifc, "--image-col", "filename", "--task", "phase", "--group", "experiment",
                            "--split", "random"]},
        "mitocheck_random": {"manifest": mito, "label": "phenotype", "spec": [*mito_spec, "--split", "random"]},
    }


def subsample(exp: dict, fraction: float, folder: Path) -> dict:
    """``exp`` on a manifest of ``fraction`` of each class's rows (at least 10), image paths absolute.

    The manifest is written to ``folder`` (never beside the data); the same rows for every
    data set that reads the same manifest.
    """
    with exp["manifest"].open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    rng = np.random.default_rng(0)
    by_class: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_class.setdefault(r[exp["label"]], []).append(i)
    keep = sorted(j for idx in by_class.values()
                  for j in rng.permutation(idx)[:max(min(len(idx), 10), round(len(idx) * fraction))])
    path = folder / f"{exp['manifest'].parent.name}-{fraction:g}.csv"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for j in keep:
            writer.writerow({**rows[j], "filename": str((exp["manifest"].parent / rows[j]["filename"]).resolve())})
    tmp.replace(path)
    return {**exp, "manifest": path, "spec": [path, *exp["spec"][1:]]}


def measure(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> dict:
    """Run ``cmd`` as a child process: exit status, wall time and peak memory (see the docstring)."""
    peak = [0.0]
    stop = threading.Event()
    started = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], tree_rss_mb(proc.pid))
                stop.wait(0.5)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        stop.set()
        sampler.join()
    return {"rc": proc.returncode, "wall_seconds": round(time.perf_counter() - started, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "peak_tree_rss_mb": round(peak[0], 1),
            "cmd": [str(c) for c in cmd]}


def failed(name: str, log: Path, bench: dict) -> SystemExit:
    tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
    return SystemExit(f"{name} failed (exit {bench['rc']}): {' '.join(bench['cmd'])}\n"
                      f"log: {log}\n{tail}")


def run_cellclass(folder: Path, spec: list, epochs: int | None) -> dict:
    """Train cellclass's defaults into ``folder/cellclass`` (reused when finished); its figures."""
    run, bench_path = folder / "cellclass", folder / "cellclass.bench.json"
    if not ((run / "metrics.json").is_file() and bench_path.is_file()):
        if run.exists():  # an interrupted run: train it again, so its times are whole
            shutil.rmtree(run)
        cmd = [sys.executable, "-m", "cellclass.cli", "train", *map(str, spec), "--model", "resnet18",
               *(["--epochs", str(epochs)] if epochs else []), "--out", str(run)]
        print("$", " ".join(cmd[2:]), flush=True)
        bench = measure(cmd, folder / "cellclass.log")
        if bench["rc"] != 0:
            raise failed("cellclass", folder / "cellclass.log", bench)
        bench_path.write_text(json.dumps(bench))
    metrics = json.loads((run / "metrics.json").read_text())
    config = yaml.safe_load((run / "config.yaml").read_text())
    return {"metrics": metrics, "bench": json.loads(bench_path.read_text()),
            "epochs": config["train"]["epochs"], "batch_size": metrics["batch_size"]}


def write_files(folder: Path, manifest: Path, label: str, run: Path) -> tuple[Path, dict[str, int]]:
    """The cellclass run's split as ``path,label,side`` (absolute paths), for the peers."""
    labels = {r["filename"]: r[label] for r in csv.DictReader(manifest.open(newline=""))}
    ids = json.loads((run / "split.json").read_text())["ids"]
    rows = [(str((manifest.parent / i).resolve()), labels[i], side) for side in ("train", "val", "test")
            for i in ids[side]]
    path = folder / "files.csv"
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "side"])
        writer.writerows(rows)
    tmp.replace(path)
    return path, {side: len(ids[side]) for side in ("train", "val", "test")}


def run_peer(name: str, folder: Path, files: Path, python: Path, epochs: int, batch: int) -> dict:
    """Train one peer on ``files`` in the peers' environment (reused when finished); its result."""
    result, bench_path = folder / f"{name}.json", folder / f"{name}.bench.json"
    if not (result.is_file() and bench_path.is_file()):
        cmd = [str(python), str(PEERS[name]), str(files), str(result), "--epochs", str(epochs),
               "--batch-size", str(batch)]
        print("$", " ".join(cmd), flush=True)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of cellclass's
        bench = measure(cmd, folder / f"{name}.log", env)
        if bench["rc"] != 0:
            raise failed(name, folder / f"{name}.log", bench)
        bench_path.write_text(json.dumps(bench))
    return {"result": json.loads(result.read_text()), "bench": json.loads(bench_path.read_text())}


def scores(labels: list[str], preds: list[str]) -> dict[str, float]:
    """Accuracy, macro / weighted F1 and balanced accuracy, as cellclass defines them.

    Macro F1 averages over the classes that are true or predicted for some image (a class
    neither true nor predicted has no F1); balanced accuracy is the mean recall over the
    classes present in ``labels``.
    """
    classes = sorted(set(labels) | set(preds))
    y = np.array([classes.index(v) for v in labels])
    p = np.array([classes.index(v) for v in preds])
    k = len(classes)
    cm = np.bincount(y * k + p, minlength=k * k).reshape(k, k)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    f1 = 2 * tp / np.maximum(support + predicted, 1)
    recall = tp[support > 0] / support[support > 0]
    return {"macro_f1": float(f1.mean()), "accuracy": float(tp.sum() / len(y)),
            "weighted_f1": float((f1 * support).sum() / support.sum()), "balanced_accuracy": float(recall.mean())}


def cellclass_row(cc: dict, run: Path, n_train: int) -> dict:
    """cellclass's figures, scored here from its predictions.csv (and checked against its metrics.json)."""
    task = next(iter(cc["metrics"]["tasks"]))
    with (run / "predictions.csv").open(newline="") as f:
        preds = [r for r in csv.DictReader(f) if r["split"] == "test"]
    row = {k: round(v, 4) for k, v in scores([r[f"{task}__true"] for r in preds],
                                              [r[f"{task}__pred"] for r in preds]).items()}
    own = cc["metrics"]["tasks"][task]["macro_f1"]
    if abs(own - row["macro_f1"]) > 1e-3:
        print(f"  note: cellclass's metrics.json has macro F1 {own:.4f}, scored here {row['macro_f1']:.4f}")
    train_s = cc["metrics"]["train_seconds"]
    return {**row, "train_seconds": train_s, **_times(cc["bench"], n_train, cc["epochs"], train_s),
            "selection": f"best epoch by validation macro F1 ({cc['metrics']['best_epoch']}), D4 TTA"}


def _times(bench: dict, n_train: int, epochs: int, train_s: float) -> dict:
    return {"end_to_end_seconds": bench["wall_seconds"], "images_per_s": round(n_train * epochs / train_s, 1),
            "peak_rss_mb": bench["peak_rss_mb"], "peak_tree_rss_mb": bench["peak_tree_rss_mb"]}


def peer_rows(name: str, peer: dict) -> dict[str, dict]:
    """One row per way of testing the peer (fastai: plain and TTA; timm: best and last epoch)."""
    res, preds = peer["result"], peer["result"]["predictions"]
    variants = {"fastai": {"fastai": ("pred", res["selection"]), "fastai_tta": ("pred_tta", "learn.tta")},
                "timm": {"timm": ("pred", f"{res['selection']} ({res.get('best_epoch')})"),
                         "timm_last": ("pred_last_epoch", "last epoch")}}[name]
    timing = {"train_seconds": res["train_seconds"],
              **_times(peer["bench"], res["n_train"], res["epochs"], res["train_seconds"])}
    return {row: {**{k: round(v, 4) for k, v in scores(preds["label"], preds[key]).items()}, **timing,
                  "selection": what} for row, (key, what) in variants.items()}


def run_dataset(name: str, exp: dict, args: argparse.Namespace) -> dict:
    """Every contender on one data set; its figures."""
    folder = args.out / name
    folder.mkdir(parents=True, exist_ok=True)
    settings = {"epochs": args.epochs, "fraction": args.fraction, "manifest": str(exp["manifest"])}
    saved = folder / "settings.json"
    if saved.is_file() and json.loads(saved.read_text()) != settings:
        raise SystemExit(f"{folder} holds results made with other settings ({saved.read_text()}); "
                         "choose another --out, or delete it")
    saved.write_text(json.dumps(settings))
    if args.fraction < 1:
        exp = subsample(exp, args.fraction, args.out / "manifests")
    cc = run_cellclass(folder, exp["spec"], args.epochs)
    files, sizes = write_files(folder, exp["manifest"], exp["label"], folder / "cellclass")
    rows = {"cellclass": cellclass_row(cc, folder / "cellclass", sizes["train"])}
    for peer in PEERS:
        rows.update(peer_rows(peer, run_peer(peer, folder, files, args.peers_python, cc["epochs"],
                                             cc["batch_size"])))
    best = max((r for r in rows if r != "cellclass"), key=lambda r: rows[r]["macro_f1"])
    split = cc["metrics"]["split"]
    out = {"split": f"{split['method']}" + (f" by {split['group_column']}" if split.get("group_column") else ""),
           "sizes": sizes, "epochs": cc["epochs"], "batch_size": cc["batch_size"], "contenders": rows,
           "best_peer": best,
           "ratio": round(rows["cellclass"]["macro_f1"] / rows[best]["macro_f1"], 3),
           "time_ratio": round(rows["cellclass"]["train_seconds"] / rows[best]["train_seconds"], 3)}
    print_table(name, out)
    return out


def print_table(name: str, fig: dict) -> None:
    sizes = fig["sizes"]
    print(f"\n{name}: {fig['split']}, {sizes['train']} / {sizes['val']} / {sizes['test']} images, "
          f"{fig['epochs']} epochs, batch {fig['batch_size']}")
    print(f"  {'contender':<11} {'macro F1':>8} {'acc':>6} {'wF1':>6} {'bal acc':>7} {'train s':>8} "
          f"{'total s':>8} {'img/s':>7} {'RSS MB':>7} {'tree MB':>7}  selection")
    for row, v in fig["contenders"].items():
        print(f"  {row:<11} {v['macro_f1']:>8.3f} {v['accuracy']:>6.3f} {v['weighted_f1']:>6.3f} "
              f"{v['balanced_accuracy']:>7.3f} {v['train_seconds']:>8.1f} {v['end_to_end_seconds']:>8.1f} "
              f"{v['images_per_s']:>7.1f} {v['peak_rss_mb']:>7.0f} {v['peak_tree_rss_mb']:>7.0f}  {v['selection']}")
    print(f"  cellclass / best peer ({fig['best_peer']}): macro F1 {fig['ratio']:.3f}, "
          f"training time {fig['time_ratio']:.3f}")


def leakage(figures: dict) -> dict | None:
    """Per contender: test figures on MitoCheck's random split minus those of its plate split."""
    if "mitocheck" not in figures or "mitocheck_random" not in figures:
        return None
    plate, rand = figures["mitocheck"]["contenders"], figures["mitocheck_random"]["contenders"]
    out = {row: {k: round(rand[row][k] - plate[row][k], 4) for k in ("macro_f1", "weighted_f1", "accuracy")}
           for row in plate}
    print("\nleakage: MitoCheck random split minus plate split (macro F1 / weighted F1 / accuracy)")
    for row, v in out.items():
        print(f"  {row:<11} {v['macro_f1']:+.3f} / {v['weighted_f1']:+.3f} / {v['accuracy']:+.3f}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=Path("bench-runs/peers"))
    parser.add_argument("--only", action="append", choices=list(datasets(Path("."))),
                        help="Run only this data set (repeatable).")
    parser.add_argument("--quick", action="store_true",
                        help="2 epochs per contender on a fifth of each data set (a smoke run, not figures).")
    parser.add_argument("--fraction", type=float,
                        help="Use this fraction of each class's rows, at least 10 (default: 1; --quick: 0.2).")
    parser.add_argument("--epochs", type=int,
                        help="Epochs for every contender (default: what cellclass's epochs: auto gives).")
    parser.add_argument("--peers-python", type=Path, default=ROOT / ".venv-peers" / "bin" / "python",
                        help="Python of the peers' environment (default: .venv-peers/bin/python at the repo root).")
    args = parser.parse_args()
    if args.quick and args.epochs is None:
        args.epochs = 2
    if args.fraction is None:
        args.fraction = 0.2 if args.quick else 1.0
    if not 0 < args.fraction <= 1:
        raise SystemExit(f"--fraction {args.fraction} is invalid; valid: a number in (0, 1]")
    if not args.peers_python.is_file():
        raise SystemExit(f"the peers' environment is missing: {args.peers_python} does not exist. Create it "
                         "(python3.11 -m venv .venv-peers && .venv-peers/bin/pip install -r "
                         "benchmarks/requirements-peers.txt) or pass --peers-python PATH")
    info = machine()
    print("machine:", json.dumps(info), flush=True)
    figures: dict[str, dict] = {}
    for name, exp in datasets(args.data).items():
        if args.only and name not in args.only:
            continue
        if not exp["manifest"].is_file():
            print(f"skipping {name}: {exp['manifest']} is absent (needs ../shared/data or --data)")
            continue
        figures[name] = run_dataset(name, exp, args)
    counted = [figures[n] for n in COUNTED if n in figures]
    print(json.dumps({"benchmark": "peers", "quick": args.quick, "fraction": args.fraction, "machine": info,
                      "figures": figures,
                      "leakage": leakage(figures),
                      "ratio": min(f["ratio"] for f in counted) if counted else None,
                      "time_ratio": max(f["time_ratio"] for f in counted) if counted else None}))


if __name__ == "__main__":
    main()
