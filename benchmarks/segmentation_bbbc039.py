"""Nuclear segmentation benchmark: the default (scikit-image) backend against Otsu + connected components.

On the 50 hand-annotated BBBC039 fields in ../shared/data/bbbc039_nuclei_segmentation
(U2OS, Hoechst, 12-bit in uint16), split by well with cellclass's group split (seed 0): half
the wells are tuning fields, on which the defaults of ``NucleusParams`` were chosen, the
other half are held out. Reports object F1 at IoU 0.5 (mean over fields), and average
precision at IoU 0.5 to 0.9, for:

- the default ``segment_nuclei`` on the held-out fields (the figure that counts; target
  >= 0.87) and on the tuning fields (for reference);
- ``otsu_baseline`` (Otsu threshold, connected components) on both;
- both on simulated fields (``simulate_nuclei_field``) with 30% and 60% of the nuclei in
  touching pairs.

Ends with one JSON line; ``ratio`` is the default's held-out F1 over the baseline's.

    python benchmarks/segmentation_bbbc039.py            # about 1 min on 2 cores
    python benchmarks/segmentation_bbbc039.py --tune     # the search that chose the defaults (~15 min)

``--tune`` searches the tuning fields only, in three stages (threshold and smoothing; seeds;
then one option at a time, kept where it gains), and prints the best settings; the defaults
in code were fixed from its output.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from _common import machine
from cellclass.data.io import read_image
from cellclass.data.segment import NucleusParams, otsu_baseline, segment_nuclei
from cellclass.data.simulate_fields import simulate_nuclei_field
from cellclass.data.splits import make_split
from cellclass.evaluation.segmentation_metrics import score_fields

HERE = Path(__file__).resolve().parent
Field = tuple[np.ndarray, np.ndarray]


def load_fields(folder: Path) -> tuple[list[Field], list[Field], dict[str, list[str]]]:
    """Tuning and held-out ``(image, mask)`` fields, split by well, and the wells of each side."""
    manifest = pd.read_csv(folder / "labels.csv", dtype={"well": str})
    wells = manifest["well"].to_numpy()
    split = make_split(manifest, groups=wells, method="group", val_fraction=0.0, test_fraction=0.5,
                       seed=0, group_column="well")
    fields = [(read_image(folder / row.filename), read_image(folder / row.mask)[0])
              for row in manifest.itertuples()]
    tune = [fields[i] for i in split.side("train")]
    held = [fields[i] for i in split.side("test")]
    sides = {"tuning": sorted(set(wells[split.side("train")])), "held_out": sorted(set(wells[split.side("test")]))}
    return tune, held, sides


def score(fields: list[Field], segment: Callable[[np.ndarray], np.ndarray]) -> dict:
    """Mean-over-fields F1 and AP of ``segment`` on ``fields``, and the seconds per field."""
    started = time.perf_counter()
    pairs = [(mask, segment(image)) for image, mask in fields]
    seconds = (time.perf_counter() - started) / len(fields)
    result = score_fields(pairs)
    return {
        "f1": round(result["f1"], 4),
        "precision": round(result["mean"]["0.5"]["precision"], 4),
        "recall": round(result["mean"]["0.5"]["recall"], 4),
        "average_precision_by_iou": {k: round(v["average_precision"], 4) for k, v in result["mean"].items()},
        "mean_average_precision": round(result["mean_average_precision"], 4),
        "n_fields": result["n_fields"],
        "n_true": sum(f["n_true"] for f in result["fields"]),
        "seconds_per_field": round(seconds, 3),
    }


def simulated(touching: float, n_fields: int = 8) -> list[Field]:
    return [simulate_nuclei_field((256, 256), n=30, seed=seed, touching_fraction=touching)
            for seed in range(n_fields)]


def tune(fields: list[Field]) -> NucleusParams:
    """Staged search over NucleusParams on the tuning fields; returns the best settings."""
    trials: dict[NucleusParams, float] = {}

    def f1(params: NucleusParams) -> float:
        if params not in trials:
            trials[params] = score_fields(
                ((mask, segment_nuclei(image, 0, params)) for image, mask in fields), thresholds=(0.5,)
            )["f1"]
            print(f"  {trials[params]:.4f}  {_describe(params)}", flush=True)
        return trials[params]

    best = NucleusParams(sigma=1.0, threshold="otsu", threshold_scale=1.0, h=1.0, distance_sigma=1.0,
                         min_area=30, compactness=0.0, intensity_weight=0.0, seeds="hmaxima",
                         background_size=None)
    print("stage 1: smoothing and threshold", flush=True)
    thresholds = [("otsu", s) for s in (0.6, 0.7, 0.8, 1.0)] + [("li", s) for s in (0.8, 1.0, 1.2)]
    candidates = [replace(best, sigma=sigma, threshold=t, threshold_scale=s)
                  for sigma, (t, s) in itertools.product((0.0, 0.5, 1.0, 2.0), thresholds)]
    best = max(candidates, key=f1)
    print("stage 2: seeds (h-maxima height, distance smoothing)", flush=True)
    candidates = [replace(best, h=h, distance_sigma=d) for h, d in itertools.product((0.5, 1.0, 2.0), (0.5, 1.0, 2.0))]
    best = max(candidates, key=f1)
    print("stage 3: one option at a time, kept where it gains more than 0.001", flush=True)
    options = [
        [{"seeds": "peaks", "min_distance_factor": f} for f in (0.5, 0.7)],
        [{"compactness": c} for c in (0.01, 0.1)],
        [{"intensity_weight": w} for w in (0.3, 0.6)],
        [{"min_area": a} for a in (10, 50)],
        [{"background_size": 61}],
        [{"threshold": "local", "block_size": b, "threshold_scale": 0.5} for b in (101, 151)],
    ]
    for choices in options:
        challenger = max((replace(best, **c) for c in choices), key=f1)
        if f1(challenger) > f1(best) + 0.001:
            best = challenger
    print(f"best on the tuning fields: F1 {f1(best):.4f} with {_describe(best)}", flush=True)
    return best


def _describe(params: NucleusParams) -> str:
    return ", ".join(f"{k}={v}" for k, v in params.to_dict().items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--tune", action="store_true", help="Run the search that chose the defaults.")
    args = parser.parse_args()
    folder = args.data / "bbbc039_nuclei_segmentation"
    if not (folder / "labels.csv").is_file():
        print(f"skipping: {folder / 'labels.csv'} is absent (this benchmark needs ../shared/data)")
        print(json.dumps({"benchmark": "segmentation_bbbc039", "skipped": f"{folder} is absent", "ratio": None}))
        return
    tuning, held_out, wells = load_fields(folder)
    print(f"BBBC039: {len(tuning)} tuning fields ({len(wells['tuning'])} wells), "
          f"{len(held_out)} held-out fields ({len(wells['held_out'])} wells)", flush=True)
    if args.tune:
        best = tune(tuning)
        print(json.dumps({"benchmark": "segmentation_bbbc039", "tuned": best.to_dict()}))
        return

    default = NucleusParams()
    methods = {"default": lambda image: segment_nuclei(image, 0, default), "otsu_baseline": otsu_baseline}
    sets = {"bbbc039_held_out": held_out, "bbbc039_tuning": tuning,
            "simulated_touching_0.3": simulated(0.3), "simulated_touching_0.6": simulated(0.6)}
    figures: dict[str, dict] = {}
    print(f"\n{'fields':<24} {'method':<14} {'F1@0.5':>7} {'prec':>6} {'recall':>6} {'mAP.5:.9':>8}  s/field")
    for set_name, fields in sets.items():
        figures[set_name] = {}
        for method, segment in methods.items():
            r = score(fields, segment)
            figures[set_name][method] = r
            print(f"{set_name:<24} {method:<14} {r['f1']:>7.3f} {r['precision']:>6.3f} {r['recall']:>6.3f} "
                  f"{r['mean_average_precision']:>8.3f}  {r['seconds_per_field']:.2f}", flush=True)
    held = figures["bbbc039_held_out"]
    ratio = held["default"]["f1"] / held["otsu_baseline"]["f1"]
    print(f"\nheld-out F1: default {held['default']['f1']:.3f} vs Otsu + CC {held['otsu_baseline']['f1']:.3f} "
          f"(ratio {ratio:.2f}; target: default >= 0.87)")
    print(json.dumps({"benchmark": "segmentation_bbbc039", "ratio": round(ratio, 3),
                      "target": "default held-out F1 >= 0.87", "machine": machine(),
                      "split": {"method": "group by well, seed 0", **wells},
                      "default_params": default.to_dict(), "figures": figures}))


if __name__ == "__main__":
    sys.exit(main())
