"""Scale benchmark: peak memory while preparing and streaming a BPS-sized set.

Simulates the size of the real NASA BPS benchmark (77,177 single-channel 200 x 200 uint16
TIFFs, about 6 GB of pixels; ``--quick``: 5,000), then in this process:

1. **prepare**: ``prepare_cache`` at the native size (200 px, uint16 kept), so the cache
   is as large as the data;
2. **fit**: the normalizer fitted over every cached image, one chunk at a time, as
   ``train`` does on its training split;
3. **stream**: one epoch of shuffled batches of 64 through the
   :class:`~cellclass.data.batches.BatchLoader` (worker processes as the default config
   picks them, batch augmentation on), with its memory bound set to ``--memory-mb``, under
   the allocator setting training runs under (:func:`~cellclass.allocator.steady_allocator`).

A thread samples the resident memory (``VmRSS`` from ``/proc``, no psutil) of this process
and all its children (the loader workers) every 50 ms; ``ratio`` (the target: <= 0.5) is
the highest sum seen over the three phases divided by the size of the pixel data. The
operating system's page cache is not resident memory of any process: it is what lets a
second epoch read from memory when RAM allows, and what the kernel drops when it does not.

    python benchmarks/scale.py               # 77,177 images: ~6 GB of pixels, 12 GB of disk
    python benchmarks/scale.py --quick       # 5,000 images, under a minute
    python benchmarks/scale.py --workdir /big/disk/bench --keep   # reuse the simulated files
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cellclass.allocator import steady_allocator
from _common import RssSampler, machine, peak_rss_mb, tree_rss_mb
from cellclass.data.augment import BatchAugment
from cellclass.data.batches import BatchLoader, default_workers
from cellclass.data.cache import CacheSettings, iter_images, prepare_cache
from cellclass.data.normalize import NormalizedView, Normalizer
from cellclass.data.presets import bps

SIZE = 200
BATCH = 64


def simulate(folder: Path, n: int, distinct: int) -> float:
    """Write the simulated set in a child process (its memory is not this benchmark's).

    With ``distinct < n``, ``distinct`` images are rendered and the others are byte copies
    of them under new names (``..._r01_proj.tif``, same plate and well): distinct files on
    disk, rendered ``n / distinct`` times faster.
    """
    if (folder / "meta.csv").is_file():
        return 0.0
    start = time.perf_counter()
    source = folder if distinct >= n else folder.with_name(folder.name + "-distinct")
    code = ("import sys; from cellclass.data.simulate import simulate_bps; "
            f"simulate_bps(sys.argv[1], n_images={min(n, distinct)}, image_size={SIZE}, workers=2)")
    subprocess.run([sys.executable, "-c", code, str(source)], check=True)
    if source != folder:
        import pandas as pd

        meta = pd.read_csv(source / "meta.csv", dtype=str, keep_default_na=False).to_dict("records")
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(n):
            row, copy = meta[i % len(meta)], i // len(meta)
            name = row["filename"] if copy == 0 else row["filename"].replace("_proj.tif", f"_r{copy:02d}_proj.tif")
            shutil.copyfile(source / row["filename"], folder / name)
            rows.append({**row, "filename": name})
        pd.DataFrame(rows).to_csv(folder / "meta.csv", index=False)
        shutil.rmtree(source)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5,000 images (under a minute)")
    parser.add_argument("--images", type=int, help="number of images (default 77,177; 5,000 with --quick)")
    parser.add_argument("--distinct", type=int, help="render only this many images, copy the rest (default: all)")
    parser.add_argument("--memory-mb", type=int, default=256, help="loader memory bound (loader_memory_mb)")
    parser.add_argument("--workdir", type=Path, help="folder for the data and cache (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the simulated data and the cache")
    args = parser.parse_args()
    n = args.images or (5000 if args.quick else 77177)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cellclass-scale-"))
    data = work / "bps"
    try:
        distinct = min(n, args.distinct or n)
        sim_s = simulate(data, n, distinct)
        files_gb = sum(p.stat().st_size for p in data.glob("*.tif")) / 1e9
        pixels = n * SIZE * SIZE * 2
        spec = bps(data)
        info = machine()
        print(f"machine: {info}", flush=True)
        print(f"{n} images of {SIZE}x{SIZE} uint16: {pixels / 1e9:.2f} GB of pixels, {files_gb:.2f} GB of TIFF "
              f"files ({distinct} rendered; written in {sim_s:.0f} s); loader memory bound {args.memory_mb} MB",
              flush=True)
        baseline = tree_rss_mb()

        with RssSampler() as prep_rss:
            start = time.perf_counter()
            cache = prepare_cache(spec, CacheSettings(SIZE, fit="pad"), workers=2, rebuild=True)
            prep_s = time.perf_counter() - start
        images = cache.images
        print(f"prepare: {n / prep_s:,.0f} images/s ({prep_s:.0f} s), cache {images.nbytes / 1e9:.2f} GB; "
              f"peak RSS {prep_rss.peak_mb:,.0f} MB", flush=True)

        with RssSampler() as fit_rss:
            start = time.perf_counter()
            norm = Normalizer().fit(iter_images(images, np.arange(n)))
            fit_s = time.perf_counter() - start
        print(f"normalizer fit over every image: {fit_s:.0f} s; peak RSS {fit_rss.peak_mb:,.0f} MB", flush=True)

        view = NormalizedView(images, norm)
        workers = default_workers(view)
        loader = BatchLoader(view, batch_size=BATCH, augment=BatchAugment(seed=0), workers=workers,
                             max_memory_mb=args.memory_mb, channels_last=True)
        order = np.random.default_rng(0).permutation(n)
        batches = [order[s : s + BATCH] for s in range(0, n - BATCH + 1, BATCH)]
        with steady_allocator(), RssSampler() as stream_rss:  # the allocator setting training runs under
            start = time.perf_counter()
            seen, checksum = 0, 0.0
            for batch in loader.epoch(batches):
                seen += len(batch)
                checksum += float(batch[:, :, ::50, ::50].sum())
            stream_s = time.perf_counter() - start
        loader.close()
        print(f"stream one epoch: {seen:,} images in {stream_s:.0f} s ({seen / stream_s:,.0f} images/s, "
              f"{workers} worker(s), {loader.max_batches_in_flight} batches in flight at most); "
              f"peak RSS {stream_rss.peak_mb:,.0f} MB", flush=True)
    finally:
        if args.workdir is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    peak = max(prep_rss.peak_mb, fit_rss.peak_mb, stream_rss.peak_mb)
    ratio = peak * 2**20 / pixels
    children_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"ratio (peak RSS of the process tree / pixel data): {peak:,.0f} MB / {pixels / 2**20:,.0f} MB = "
          f"{ratio:.3f} (target <= 0.5); this process's VmHWM {peak_rss_mb():,.0f} MB, largest child "
          f"{children_mb:,.0f} MB, RSS before preparing {baseline:,.0f} MB")
    print(json.dumps({
        "benchmark": "scale", "quick": args.quick, "ratio": round(ratio, 4), "target": "<= 0.5",
        "machine": info, "images": n, "distinct_images": distinct, "pixel_data_mb": round(pixels / 2**20), "tiff_files_gb": round(files_gb, 2),
        "loader_memory_mb": args.memory_mb, "loader_workers": workers,
        "peak_rss_mb": {"prepare": round(prep_rss.peak_mb), "fit_normalizer": round(fit_rss.peak_mb),
                        "stream_epoch": round(stream_rss.peak_mb), "baseline_before_prepare": round(baseline),
                        "main_vmhwm": round(peak_rss_mb()), "largest_child": round(children_mb)},
        "seconds": {"simulate": round(sim_s), "prepare": round(prep_s, 1), "fit_normalizer": round(fit_s, 1),
                    "stream_epoch": round(stream_s, 1)},
        "images_per_s": {"prepare": round(n / prep_s), "stream": round(seen / stream_s)},
    }))


if __name__ == "__main__":
    sys.exit(main())
