"""Data-path benchmark: decoding raw files vs reading the prepared cache, images per second.

Simulates a BPS-layout set (single-channel 200 x 200 uint16 TIFFs) and an HPA-layout set
(four 8-bit PNGs per image), then measures on one thread:

- **raw decode**: ``DatasetSpec.read_image`` (cellclass's readers: imagecodecs TIFF/PNG)
  over every row, the files warm in the page cache;
- **decode + fit**: the same plus :func:`~cellclass.data.resize.fit_image` to 128 px,
  the per-image work ``prepare`` does once and a run without a cache does every time;
- **cache read**: :class:`~cellclass.data.cache.CachedImages`, shuffled batches of 64
  rows, as the training loader reads them, from caches at the native size (the same
  pixels as the files) and at 128 px.

``ratio`` (the target: >= 10) is the worst, over the two layouts, of cache read at native
size over raw decode: the same pixels, the cache against the fastest decoder.

    python benchmarks/data_path.py            # 3,000 BPS + 200 HPA (512 px) images, ~2 min
    python benchmarks/data_path.py --quick    # smaller sets, under a minute
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _common import machine
from cellclass.data.cache import CacheSettings, prepare_cache
from cellclass.data.presets import bps, hpa
from cellclass.data.resize import fit_image
from cellclass.data.simulate import simulate_bps, simulate_hpa


def _rate(fn, n_items: int, min_seconds: float, max_rounds: int = 50) -> float:
    """Best items/s over rounds of ``fn`` (each round processes ``n_items``), for at least ``min_seconds``."""
    best, spent, rounds = 0.0, 0.0, 0
    while (spent < min_seconds or rounds < 2) and rounds < max_rounds:
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        spent += took
        rounds += 1
        best = max(best, n_items / took)
    return best


def measure(name: str, spec, native: int, min_seconds: float) -> dict[str, float]:
    records = spec.load_manifest().to_dict("records")
    n = len(records)
    raw = _rate(lambda: [spec.read_image(r) for r in records], n, min_seconds)
    fitted = _rate(lambda: [fit_image(spec.read_image(r), 128) for r in records], n, min_seconds)
    out = {"images": n, "raw_decode_per_s": raw, "decode_fit128_per_s": fitted}
    for label, size in (("native", native), ("128", 128)):
        start = time.perf_counter()
        cache = prepare_cache(spec, CacheSettings(size, fit="pad"), workers=2, rebuild=True)
        out[f"prepare_{label}_per_s"] = n / (time.perf_counter() - start)
        images = cache.images
        rng = np.random.default_rng(0)

        def epoch() -> None:
            order = rng.permutation(n)
            for s in range(0, n, 64):
                images[np.sort(order[s : s + 64])]

        out[f"cache_{label}_per_s"] = _rate(epoch, n, min_seconds)
        out[f"cache_{label}_mb"] = images.nbytes / 2**20
    out["ratio_native"] = out["cache_native_per_s"] / raw
    out["ratio_128_vs_decode_fit"] = out["cache_128_per_s"] / fitted
    print(f"{name}: {n} images; raw decode {raw:,.0f}/s, decode+fit128 {fitted:,.0f}/s; "
          f"cache native {out['cache_native_per_s']:,.0f}/s ({out['ratio_native']:.1f}x raw), "
          f"cache 128px {out['cache_128_per_s']:,.0f}/s ({out['ratio_128_vs_decode_fit']:.1f}x decode+fit); "
          f"prepare native {out['prepare_native_per_s']:,.0f}/s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sets (under a minute)")
    parser.add_argument("--workdir", type=Path, help="folder for the simulated data (default: a temporary one)")
    args = parser.parse_args()
    n_bps, n_hpa, hpa_size, min_s = (800, 24, 256, 0.5) if args.quick else (3000, 200, 512, 2.0)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cellclass-bench-"))
    try:
        if not (work / "bps" / "meta.csv").is_file():
            simulate_bps(work / "bps", n_images=n_bps, image_size=200, workers=2)
        if not (work / "hpa" / "train.csv").is_file():
            simulate_hpa(work / "hpa", n_images=n_hpa, image_size=hpa_size, workers=2)
        info = machine()
        print(f"machine: {info}", flush=True)
        results = {
            "bps_tiff_200px_uint16": measure("BPS TIFF 1x200x200 uint16", bps(work / "bps"), 200, min_s),
            f"hpa_png_4x{hpa_size}px_uint8": measure(f"HPA PNG 4x{hpa_size}x{hpa_size} uint8", hpa(work / "hpa"),
                                                      hpa_size, min_s),
        }
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    ratio = min(r["ratio_native"] for r in results.values())
    print(f"ratio (worst cache-at-native-size over raw decode): {ratio:.1f}x (target >= 10)")
    print(json.dumps({"benchmark": "data_path", "quick": args.quick, "ratio": round(ratio, 2), "target": ">= 10",
                      "machine": info,
                      "results": {k: {m: round(v, 2) for m, v in r.items()} for k, r in results.items()}}))


if __name__ == "__main__":
    sys.exit(main())
