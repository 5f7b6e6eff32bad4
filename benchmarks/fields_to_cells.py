"""Fields to single cells: segment and crop simulated 512 x 512 fields, throughput and peak memory.

Simulates ``max(--fields)`` fields of nuclei (``simulate_nuclei_field``: 12-bit in uint16,
about 80 nuclei each, 30% in touching pairs) as TIFF files with a manifest, outside the
timed part. Then, for each count in ``--fields`` (default 100, 300 and 1,000), a fresh
child process runs ``make_crops`` on the first N fields with the default segmentation
backend (``SkimageBackend``: each worker segments a field, then cuts and writes its 64 x 64
crops, neighbours masked, border windows zero-padded) and ``--workers`` worker processes.
A thread samples the resident memory (``VmRSS``) of the child and of its workers every
50 ms.

Reports fields/s, cells/s and the peak resident memory of each run; ``ratio`` is the peak
at the largest count over the peak at the smallest: about 1.0 when memory does not grow with
the number of fields (fields are cut one at a time per worker, the manifest is streamed).

    python benchmarks/fields_to_cells.py            # 100, 300, 1,000 fields: ~10 min on 2 cores
    python benchmarks/fields_to_cells.py --quick    # 4 and 8 fields of 128 x 128, seconds
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pandas as pd

from _common import RssSampler, machine
from cellclass.data.crops import make_crops
from cellclass.data.io import write_tiff
from cellclass.data.segment import SkimageBackend
from cellclass.data.simulate_fields import simulate_nuclei_field
from cellclass.data.spec import spec_from_manifest

CROP = 64
FIELDS_PER_PLATE = 96


def _write_field(args: tuple[Path, int, int, int]) -> dict[str, str]:
    folder, index, size, nuclei = args
    image, _ = simulate_nuclei_field((size, size), n=nuclei, seed=index)
    plate, well = index // FIELDS_PER_PLATE, index % FIELDS_PER_PLATE // 4
    name = f"images/P{plate:02d}/w{well:02d}_s{index % 4}_{index:05d}.tif"
    write_tiff(folder / name, image)
    return {"filename": name, "treatment": f"t{well % 4}", "plate": f"P{plate:02d}", "well": f"W{well:02d}"}


def simulate(folder: Path, n: int, size: int, nuclei: int, workers: int) -> float:
    """Write ``n`` fields and ``fields.csv``; returns the seconds it took."""
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        rows = list(pool.map(_write_field, [(folder, i, size, nuclei) for i in range(n)], chunksize=8))
    pd.DataFrame(rows).to_csv(folder / "fields.csv", index=False)
    return time.perf_counter() - start


def run_one(data: Path, out: Path, n: int, workers: int) -> dict[str, object]:
    """Segment and crop the first ``n`` fields (in this child process); time and memory."""
    spec = spec_from_manifest(data / "fields.csv", image_col="filename", tasks=["treatment"], groups=["plate", "well"])
    frame = spec.load_manifest().iloc[:n]
    with RssSampler() as rss:
        start = time.perf_counter()
        result = make_crops(spec, SkimageBackend(), out, CROP, frame=frame, mask_neighbours=True, border="pad",
                            workers=workers)
        seconds = time.perf_counter() - start
    return {"fields": n, "cells": result.n_cells, "seconds": round(seconds, 1),
            "fields_per_s": round(n / seconds, 2), "cells_per_s": round(result.n_cells / seconds, 1),
            "peak_rss_mb": round(rss.peak_mb, 1), "flagged_fields": result.n_flagged}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 and 8 fields of 128 x 128 (seconds)")
    parser.add_argument("--fields", type=int, nargs="+", help="field counts (default 100 300 1000)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of make_crops (default 2)")
    parser.add_argument("--workdir", type=Path, help="folder for the fields and crops (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the simulated fields")
    parser.add_argument("--run-one", nargs=3, metavar=("DATA", "OUT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_one:
        data, out, n = args.run_one
        print(json.dumps(run_one(Path(data), Path(out), int(n), args.workers)))
        return

    counts = sorted(args.fields or ([4, 8] if args.quick else [100, 300, 1000]))
    size, nuclei = (128, 10) if args.quick else (512, 80)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cellclass-fields-"))
    data = work / "fields"
    info = machine()
    print(f"machine: {info}", flush=True)
    runs = []
    try:
        if not (data / "fields.csv").is_file() or len(pd.read_csv(data / "fields.csv")) < counts[-1]:
            data.mkdir(parents=True, exist_ok=True)
            sim_s = simulate(data, counts[-1], size, nuclei, max(1, args.workers))
            print(f"simulated {counts[-1]} fields of {size} x {size} (~{nuclei} nuclei) in {sim_s:.0f} s", flush=True)
        for n in counts:
            out = work / f"crops-{n}"
            shutil.rmtree(out, ignore_errors=True)
            child = subprocess.run(
                [sys.executable, __file__, "--run-one", str(data), str(out), str(n), "--workers", str(args.workers)],
                check=True, capture_output=True, text=True)
            run = json.loads(child.stdout.strip().splitlines()[-1])
            runs.append(run)
            print(f"{n:>5} fields: {run['cells']:>7} cells in {run['seconds']:>6.1f} s = {run['fields_per_s']:.2f} "
                  f"fields/s, {run['cells_per_s']:.0f} cells/s; peak RSS (child + workers) {run['peak_rss_mb']:.0f} MB",
                  flush=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    ratio = runs[-1]["peak_rss_mb"] / runs[0]["peak_rss_mb"]
    print(f"ratio (peak RSS at {counts[-1]} fields / at {counts[0]}): {ratio:.3f} (target about 1.0)")
    print(json.dumps({
        "benchmark": "fields_to_cells", "quick": args.quick, "ratio": round(ratio, 3), "target": "about 1.0",
        "machine": info, "field_size": size, "nuclei_per_field": nuclei, "crop": CROP, "workers": args.workers,
        "backend": "skimage", "runs": runs,
    }))


if __name__ == "__main__":
    sys.exit(main())
