"""Synthetic microscopy datasets laid out exactly like two public benchmarks.

Two simulators write folders that the ``bps`` and ``hpa`` presets read unchanged:

- :func:`simulate_bps` mirrors the NASA BPS microscopy benchmark: single-channel uint16
  TIFF nuclei stained for DNA-repair foci (53BP1), ``meta.csv`` with
  ``filename,dose_Gy,particle_type,hr_post_exposure``, and the real experimental design in
  which every particle x dose x hours condition sits on exactly one plate.
- :func:`simulate_hpa` mirrors the Human Protein Atlas image classification layout:
  ``train.csv`` with ``Id,Target`` and four 8-bit PNGs per image (red microtubules, green
  protein of interest, blue nuclei, yellow endoplasmic reticulum).

The images carry learnable signal and the real confounds. BPS foci counts rise with dose
and fall with time after exposure (repair); iron-ion (high-LET) foci line up along
particle tracks while X-ray foci are scattered; each plate has its own camera offset and
gain, so a classifier can also score by recognising plates, as on the real data. HPA
green-channel patterns follow the localisation labels (nucleoli, mitochondria, plasma
membrane ...), with co-occurring labels.

Every image is drawn from its own random generator seeded by ``(seed, index)``, so the
output is byte-identical for a given seed whatever the number of worker processes. Files
are written atomically (temporary file in the same folder, then :func:`os.replace`) and
the CSV manifest is written last: a folder with a manifest is a complete dataset.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np
import tifffile

from cellclass.atomic import atomic_write_bytes
from cellclass.data.presets import HPA_CHANNELS, HPA_CLASSES
from cellclass.errors import SimulationError
from cellclass.progress import ProgressFn

logger = logging.getLogger(__name__)

__all__ = [
    "BPS_CONDITIONS",
    "BPS_FILENAME_REGEX",
    "HPA_CHANNELS",
    "HPA_CLASSES",
    "HPA_RENDERED_CLASSES",
    "BpsCondition",
    "simulate_bps",
    "simulate_hpa",
]


# --------------------------------------------------------------------------------------
# BPS: design of the real benchmark
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BpsCondition:
    """One exposure condition of the BPS benchmark and the single plate it was imaged on.

    Attributes:
        particle_type: ``"Fe"`` (iron ions, high LET) or ``"X-ray"`` (low LET).
        dose_Gy: Absorbed dose in gray.
        hr_post_exposure: Hours between exposure and fixation.
        plate: Plate id, ``P`` and three digits.
        barcode: The plate's 11-digit barcode as it appears in the real file names.
    """

    particle_type: str
    dose_Gy: float
    hr_post_exposure: int
    plate: str
    barcode: str


BPS_CONDITIONS: tuple[BpsCondition, ...] = (
    BpsCondition("Fe", 0.82, 4, "P242", "73665006707"),
    BpsCondition("Fe", 0.3, 4, "P243", "73665098237"),
    BpsCondition("Fe", 0.0, 4, "P244", "73665165741"),
    BpsCondition("Fe", 0.82, 24, "P248", "73665445941"),
    BpsCondition("Fe", 0.3, 24, "P249", "73665543731"),
    BpsCondition("Fe", 0.0, 24, "P250", "73665642094"),
    BpsCondition("Fe", 0.82, 48, "P251", "73665707362"),
    BpsCondition("Fe", 0.0, 48, "P253", "73665853037"),
    BpsCondition("X-ray", 0.0, 4, "P278", "73668090728"),
    BpsCondition("X-ray", 0.1, 4, "P279", "73668277350"),
    BpsCondition("X-ray", 1.0, 4, "P280", "73668439105"),
    BpsCondition("X-ray", 0.0, 24, "P282", "73668608120"),
    BpsCondition("X-ray", 0.1, 24, "P283", "73668670516"),
    BpsCondition("X-ray", 1.0, 24, "P284", "73668752578"),
    BpsCondition("X-ray", 0.0, 48, "P286", "73668871024"),
    BpsCondition("X-ray", 0.1, 48, "P287", "73668956345"),
    BpsCondition("X-ray", 1.0, 48, "P288", "73669012104"),
)
"""The 17 conditions of the real benchmark, one plate each, in plate order."""

# The real benchmark imaged the same eight wells on every plate of a particle series.
_BPS_WELLS: dict[str, tuple[str, ...]] = {
    "Fe": ("A6", "A8", "C6", "C7", "C8", "E4", "G3", "G4"),
    "X-ray": ("A7", "C7", "D5", "E1", "E2", "E5", "E6", "F5"),
}

BPS_FILENAME_REGEX = (
    r"^(?P<plate>P\d{3})_(?P<barcode>\d{11})-(?P<well>[A-H](?:1[0-2]|[1-9]))"
    r"_(?P<field>\d{3})_(?P<cell>\d{3})_proj\.tif$"
)
"""Regular expression of a BPS file name, with named groups plate, barcode, well ..."""

_BPS_CELLS_PER_FIELD = 24
_BPS_MAX_PER_WELL = 999 * _BPS_CELLS_PER_FIELD

# Signal model (photo-electrons unless noted). Induced foci: k * dose * repair(t), with
# repair(t) = residual + (1 - residual) * exp(-t / tau); Fe damage is more complex, so
# more of it stays unrepaired.
_FOCI_BASELINE = 2.0
_FOCI_PER_GY = {"Fe": 30.0, "X-ray": 25.0}
_REPAIR_TAU_H = 12.0
_REPAIR_RESIDUAL = {"Fe": 0.3, "X-ray": 0.1}
_BACKGROUND_E = 180.0
_NUCLEUS_E = 1400.0
_FOCUS_PEAK_E = 4000.0
_READ_NOISE_E = 4.0
_STREAMS = {"bps_image": 0, "hpa_image": 1, "plate": 2, "bps_size": 3}


def expected_foci(particle_type: str, dose_Gy: float, hr_post_exposure: float) -> float:
    """Mean number of foci per nucleus in the simulator's model.

    Args:
        particle_type: ``"Fe"`` or ``"X-ray"``.
        dose_Gy: Dose in gray.
        hr_post_exposure: Hours after exposure.

    Returns:
        ``baseline + k * dose * (residual + (1 - residual) * exp(-hours / tau))``.
    """
    residual = _REPAIR_RESIDUAL[particle_type]
    repair = residual + (1.0 - residual) * math.exp(-hr_post_exposure / _REPAIR_TAU_H)
    return _FOCI_BASELINE + _FOCI_PER_GY[particle_type] * dose_Gy * repair


def _plate_params(seed: int, plate: str) -> tuple[float, float, float]:
    """Camera offset (ADU), gain (ADU per electron) and background scale of one plate."""
    rng = np.random.default_rng([seed, _STREAMS["plate"], int(plate[1:])])
    offset = float(rng.uniform(350.0, 900.0))
    gain = float(2.5 * rng.uniform(0.8, 1.25))
    background = float(rng.uniform(0.7, 1.4))
    return offset, gain, background


@functools.lru_cache(maxsize=64)
def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear-interpolation matrix of shape (n_out, n_in) that upsamples a 1-D grid."""
    pos = np.linspace(0.0, n_in - 1.0, n_out)
    lo = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    frac = pos - lo
    mat = np.zeros((n_out, n_in))
    mat[np.arange(n_out), lo] = 1.0 - frac
    mat[np.arange(n_out), lo + 1] = frac
    return mat


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Zero-mean, unit-ish smooth random field: a coarse grid upsampled bilinearly."""
    grid = rng.standard_normal((cells, cells))
    return _interp_matrix(height, cells) @ grid @ _interp_matrix(width, cells).T


def _pixel_axes(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates along y (column vector) and x (row vector)."""
    return (np.arange(height, dtype=float)[:, None], np.arange(width, dtype=float)[None, :])


def _gaussian_spots(
    height: int,
    width: int,
    y: np.ndarray,
    x: np.ndarray,
    sigma: np.ndarray,
    amplitude: np.ndarray,
) -> np.ndarray:
    """Sum of isotropic Gaussian spots, as one separable matrix product."""
    if y.size == 0:
        return np.zeros((height, width))
    gy = np.exp(-0.5 * ((np.arange(height)[None, :] - y[:, None]) / sigma[:, None]) ** 2)
    gx = np.exp(-0.5 * ((np.arange(width)[None, :] - x[:, None]) / sigma[:, None]) ** 2)
    return (gy * amplitude[:, None]).T @ gx


def _render_bps(
    rng: np.random.Generator,
    height: int,
    width: int,
    condition: BpsCondition,
    plate: tuple[float, float, float],
) -> np.ndarray:
    """Render one nucleus image as uint16 (H, W) counts of a camera."""
    offset, gain, plate_bg = plate
    size = min(height, width)
    ys = np.arange(height, dtype=float)[:, None]
    xs = np.arange(width, dtype=float)[None, :]

    # Nucleus: rotated ellipse with a soft edge, dome-shaped and finely textured.
    cy = (height - 1) / 2 + rng.uniform(-0.05, 0.05) * height
    cx = (width - 1) / 2 + rng.uniform(-0.05, 0.05) * width
    semi_a = size * rng.uniform(0.28, 0.38)
    semi_b = semi_a * rng.uniform(0.65, 0.95)
    theta = rng.uniform(0.0, np.pi)
    cos_t, sin_t = math.cos(theta), math.sin(theta)
    # Rotated, normalised coordinates built from row and column vectors (cheap), then
    # broadcast once.
    u = (xs - cx) * (cos_t / semi_a) + (ys - cy) * (sin_t / semi_a)
    v = (ys - cy) * (cos_t / semi_b) - (xs - cx) * (sin_t / semi_b)
    r2 = u * u
    r2 += v * v
    np.minimum(r2, 1.0, out=r2)
    # Soft edge about a pixel wide (1 - r2 ~ 2 * depth / semi_a near the rim).
    mask = (1.0 - r2) * (semi_a / 2.0)
    np.clip(mask, 0.0, 1.0, out=mask)
    texture = _smooth_noise(rng, height, width, 5)
    texture *= 0.12
    texture += 0.06 * _smooth_noise(rng, height, width, 12)
    texture += 1.0
    brightness = _NUCLEUS_E * rng.lognormal(0.0, 0.2)
    photons = (1.0 - 0.25 * r2) * mask
    photons *= texture
    photons *= brightness

    # Background: out-of-focus light with a gentle gradient, scaled per plate.
    photons += _BACKGROUND_E * plate_bg * (1.0 + 0.1 * _smooth_noise(rng, height, width, 2))

    # Foci. Baseline foci are scattered for both particles; induced foci are scattered
    # for X-rays and lie along 1-2 straight tracks through the nucleus for Fe ions.
    particle, dose, hours = condition.particle_type, condition.dose_Gy, condition.hr_post_exposure
    n_base = rng.poisson(_FOCI_BASELINE)
    n_induced = rng.poisson(expected_foci(particle, dose, hours) - _FOCI_BASELINE)
    # Foci positions in the unit disk, mapped affinely onto the ellipse below (an affine
    # map keeps tracks straight).
    radius = np.sqrt(rng.random(n_base))
    angle = rng.uniform(0.0, 2 * np.pi, n_base)
    fu, fv = radius * np.cos(angle) * 0.9, radius * np.sin(angle) * 0.9
    sigma_px = max(0.8, 0.014 * size)
    sigma_base = np.full(n_base, sigma_px)
    if particle == "Fe" and n_induced > 0:
        n_tracks = 1 + int(rng.random() < min(0.8, dose))
        track = rng.integers(0, n_tracks, n_induced)
        normal_angle = rng.uniform(0.0, np.pi, n_tracks)
        distance = rng.uniform(-0.7, 0.7, n_tracks)
        half_chord = np.sqrt(1.0 - distance**2)
        # Stratified positions along each track: DSBs of one ion track sit about evenly
        # spaced, not in random clumps that would merge into one blob.
        per_track = np.bincount(track, minlength=n_tracks)
        rank = np.empty(n_induced)
        for k in range(n_tracks):
            rank[track == k] = np.arange(per_track[k])
        slot = (rank + 0.5 + rng.uniform(-0.25, 0.25, n_induced)) / per_track[track]
        along = (2.0 * slot - 1.0) * half_chord[track] * 0.9
        across = distance[track] + rng.normal(0.0, 0.5 / semi_b, n_induced)
        nx, ny = np.cos(normal_angle[track]), np.sin(normal_angle[track])
        iu, iv = across * nx - along * ny, across * ny + along * nx
        sigma_induced = np.full(n_induced, sigma_px * 1.1)
        amp_scale_induced = 1.1
    else:
        radius = np.sqrt(rng.random(n_induced))
        angle = rng.uniform(0.0, 2 * np.pi, n_induced)
        iu, iv = radius * np.cos(angle) * 0.9, radius * np.sin(angle) * 0.9
        sigma_induced = np.full(n_induced, sigma_px)
        amp_scale_induced = 1.0
    fu, fv = np.concatenate([fu, iu]), np.concatenate([fv, iv])
    sigma = np.concatenate([sigma_base, sigma_induced]) * rng.uniform(0.8, 1.25, fu.size)
    amplitude = _FOCUS_PEAK_E * rng.lognormal(0.0, 0.35, fu.size)
    amplitude[n_base:] *= amp_scale_induced
    fx = cx + fu * semi_a * cos_t - fv * semi_b * sin_t
    fy = cy + fu * semi_a * sin_t + fv * semi_b * cos_t
    photons += _gaussian_spots(height, width, fy, fx, sigma, amplitude)

    # Camera: shot noise and read noise (in electrons), gain, offset. Shot noise is drawn
    # in its Gaussian form N(n, n): every pixel holds over 100 electrons, where that is
    # accurate, and cheaper to draw than a Poisson variate.
    noise = rng.standard_normal((height, width))
    noise *= np.sqrt(photons + _READ_NOISE_E**2)
    photons += noise
    photons *= gain
    photons += offset + 0.5
    np.clip(photons, 0, 65535, out=photons)
    return photons.astype(np.uint16)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _tiff_bytes(image: np.ndarray) -> bytes:
    """Encode a 2-D uint16 image as a plain, uncompressed, single-page TIFF."""
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, image, photometric="minisblack", metadata=None)
    return buffer.getvalue()


def _check_output(out_dir: Path, manifest: str, overwrite: bool) -> None:
    if (out_dir / manifest).exists() and not overwrite:
        raise SimulationError(
            f"{out_dir / manifest} already exists; pass overwrite=True to write over it, "
            "or choose an empty folder"
        )
    out_dir.mkdir(parents=True, exist_ok=True)


def _check_seed(seed: int) -> int:
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or seed < 0:
        raise SimulationError(f"seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_workers(workers: int) -> int:
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise SimulationError(f"workers must be a positive integer, got {workers!r}")
    return workers


def _run_jobs(
    worker: Callable[..., int],
    chunks: list[tuple],
    total: int,
    workers: int,
    progress: ProgressFn | None,
    stage: str = "writing images",
) -> None:
    """Run ``worker(*chunk)`` for every chunk, in this process or in a process pool; each
    chunk's worker returns the number of images it wrote."""
    done = 0
    if workers == 1 or len(chunks) == 1:
        for chunk in chunks:
            done += worker(*chunk)
            if progress is not None:
                progress(stage, done, total)
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(chunks))) as pool:
        futures = [pool.submit(worker, *chunk) for chunk in chunks]
        for future in as_completed(futures):
            done += future.result()
            if progress is not None:
                progress(stage, done, total)


def _chunk(items: Sequence, workers: int, size: int = 512) -> list[Sequence]:
    size = max(1, min(size, math.ceil(len(items) / (4 * workers))))
    return [items[i : i + size] for i in range(0, len(items), size)]


def _image_size(value: int | tuple[int, int], name: str = "image_size") -> tuple[int, int]:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        height = width = int(value)
    elif (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in value)
    ):
        height, width = int(value[0]), int(value[1])
    else:
        raise SimulationError(f"{name} must be an int or a (height, width) pair, got {value!r}")
    if height < 16 or width < 16:
        raise SimulationError(f"{name} must be at least 16 pixels a side, got {value!r}")
    return height, width


# --------------------------------------------------------------------------------------
# BPS
# --------------------------------------------------------------------------------------


def _bps_layout(n_images: int) -> list[tuple[str, int]]:
    """File names and condition indices of ``n_images`` images, in file-name order.

    Images are split as evenly as possible over the conditions, round-robin over the
    plate's wells, and 24 cells per microscope field.
    """
    base, extra = divmod(n_images, len(BPS_CONDITIONS))
    layout: list[tuple[str, int]] = []
    for index, cond in enumerate(BPS_CONDITIONS):
        count = base + (1 if index < extra else 0)
        wells = _BPS_WELLS[cond.particle_type]
        names = []
        for j in range(count):
            well, k = wells[j % len(wells)], j // len(wells)
            field, cell = divmod(k, _BPS_CELLS_PER_FIELD)
            names.append(
                f"{cond.plate}_{cond.barcode}-{well}_{field + 1:03d}_{cell + 1:03d}_proj.tif"
            )
        layout.extend((name, index) for name in sorted(names))
    return layout


def _bps_worker(
    out_dir: str,
    seed: int,
    jobs: Sequence[tuple[int, str, int, int, int]],
) -> int:
    """Render and write the BPS images ``(index, name, condition, height, width)``."""
    folder = Path(out_dir)
    plates: dict[str, tuple[float, float, float]] = {}
    for index, name, cond_index, height, width in jobs:
        cond = BPS_CONDITIONS[cond_index]
        if cond.plate not in plates:
            plates[cond.plate] = _plate_params(seed, cond.plate)
        rng = np.random.default_rng([seed, _STREAMS["bps_image"], index])
        image = _render_bps(rng, height, width, cond, plates[cond.plate])
        atomic_write_bytes(folder / name, _tiff_bytes(image))
    return len(jobs)


def simulate_bps(
    out_dir: str | os.PathLike[str],
    n_images: int = 1700,
    seed: int = 0,
    image_size: int | tuple[int, int] = (96, 96),
    *,
    size_jitter: float = 0.0,
    workers: int = 1,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic NASA BPS microscopy benchmark: uint16 TIFF nuclei and ``meta.csv``.

    The layout is the real one: ``out_dir/meta.csv`` with columns
    ``filename,dose_Gy,particle_type,hr_post_exposure`` and the images directly in
    ``out_dir``, named like ``P242_73665006707-A6_003_013_proj.tif`` (plate, barcode,
    well, field, cell). The 17 conditions of :data:`BPS_CONDITIONS` each sit on their
    one real plate, so plate and condition are confounded exactly as in the benchmark
    (the Fe and X-ray 0 Gy shams differ only by plate).

    Signal: foci per nucleus ~ Poisson(:func:`expected_foci`), rising with dose and falling
    with hours after exposure; Fe foci lie along one or two straight tracks, X-ray foci
    are scattered; every plate has its own camera offset, gain and background.

    Args:
        out_dir: Folder to write; created if missing.
        n_images: Number of images, at least one per condition (17); split as evenly as
            possible over the conditions.
        seed: Non-negative seed of every random draw; the same seed gives byte-identical
            files.
        image_size: ``(height, width)`` or one int for square images.
        size_jitter: Relative spread of image sides: each image's height and width are
            drawn uniformly within ``±size_jitter`` of ``image_size`` (real crops vary).
        workers: Processes to render with. The output does not depend on it.
        progress: Called as ``progress("writing images", done, total)``.
        overwrite: Write over an existing ``meta.csv`` in ``out_dir``. Files of an earlier,
            larger simulation that the new manifest does not list are left in place.

    Returns:
        Path of the written ``meta.csv``.

    Raises:
        SimulationError: An argument is out of range, or ``out_dir`` already holds a
            ``meta.csv`` and ``overwrite`` is false.
    """
    n_conditions = len(BPS_CONDITIONS)
    if not isinstance(n_images, (int, np.integer)) or n_images < n_conditions:
        raise SimulationError(
            f"n_images must be an integer of at least {n_conditions} (one image per "
            f"condition), got {n_images!r}"
        )
    if n_images > n_conditions * len(_BPS_WELLS["Fe"]) * _BPS_MAX_PER_WELL:
        raise SimulationError(
            f"n_images={n_images} does not fit the 3-digit field numbers of the file names; "
            f"use at most {n_conditions * len(_BPS_WELLS['Fe']) * _BPS_MAX_PER_WELL}"
        )
    height, width = _image_size(image_size)
    if not 0.0 <= size_jitter < 1.0:
        raise SimulationError(f"size_jitter must be in [0, 1), got {size_jitter!r}")
    seed = _check_seed(seed)
    workers = _check_workers(workers)
    folder = Path(out_dir)
    _check_output(folder, "meta.csv", overwrite)

    layout = _bps_layout(int(n_images))
    if size_jitter > 0:
        size_rng = np.random.default_rng([seed, _STREAMS["bps_size"]])
        scale = size_rng.uniform(1.0 - size_jitter, 1.0 + size_jitter, (len(layout), 2))
        heights = np.maximum(16, np.rint(height * scale[:, 0])).astype(int)
        widths = np.maximum(16, np.rint(width * scale[:, 1])).astype(int)
    else:
        heights = np.full(len(layout), height)
        widths = np.full(len(layout), width)
    jobs = [
        (i, name, cond, int(heights[i]), int(widths[i])) for i, (name, cond) in enumerate(layout)
    ]
    logger.info(
        "simulating %d BPS images of %dx%d in %s with %d worker(s)",
        len(jobs), height, width, folder, workers,
    )
    chunks = [(str(folder), int(seed), chunk) for chunk in _chunk(jobs, workers)]
    _run_jobs(_bps_worker, chunks, len(jobs), workers, progress)

    lines = ["filename,dose_Gy,particle_type,hr_post_exposure"]
    for name, cond_index in layout:
        cond = BPS_CONDITIONS[cond_index]
        lines.append(f"{name},{cond.dose_Gy!r},{cond.particle_type},{cond.hr_post_exposure}")
    manifest = folder / "meta.csv"
    atomic_write_bytes(manifest, ("\n".join(lines) + "\n").encode())
    logger.info("wrote %s", manifest)
    return manifest


# --------------------------------------------------------------------------------------
# HPA
# --------------------------------------------------------------------------------------

# Rendered classes with frequency weights roughly like the real training set.
_HPA_WEIGHTS: dict[int, float] = {
    0: 12.9, 25: 8.2, 21: 3.8, 2: 3.6, 23: 2.7, 7: 2.8, 5: 2.5, 4: 1.9, 6: 1.0, 14: 1.1, 1: 1.3,
}
HPA_RENDERED_CLASSES: tuple[int, ...] = tuple(sorted(_HPA_WEIGHTS))
"""The HPA class indices :func:`simulate_hpa` renders (the others never occur)."""

# Affinity of label pairs: how much likelier a second label is next to the first.
_HPA_AFFINITY: dict[frozenset[int], float] = {
    frozenset({0, 25}): 4.0,
    frozenset({0, 21}): 2.0,
    frozenset({0, 2}): 2.0,
    frozenset({0, 5}): 1.5,
    frozenset({0, 4}): 1.2,
    frozenset({21, 25}): 2.0,
    frozenset({23, 25}): 1.5,
    frozenset({7, 25}): 1.3,
    frozenset({2, 4}): 0.5,
    frozenset({1, 21}): 0.3,
}


def _hpa_labels(rng: np.random.Generator) -> list[int]:
    """Draw 1-3 co-occurring labels, in draw order (the real ``Target`` is unsorted)."""
    classes = np.array(HPA_RENDERED_CLASSES)
    base = np.array([_HPA_WEIGHTS[c] for c in classes])
    n_labels = 1 + int(rng.choice(3, p=[0.5, 0.38, 0.12]))
    labels: list[int] = []
    for _ in range(n_labels):
        weights = base.copy()
        for i, c in enumerate(classes):
            if c in labels:
                weights[i] = 0.0
                continue
            for chosen in labels:
                weights[i] *= _HPA_AFFINITY.get(frozenset({int(c), chosen}), 0.6)
        labels.append(int(rng.choice(classes, p=weights / weights.sum())))
    return labels


def _hpa_id(rng: np.random.Generator) -> str:
    hexits = rng.bytes(16).hex()
    return f"{hexits[:8]}-{hexits[8:12]}-{hexits[12:16]}-{hexits[16:20]}-{hexits[20:]}"


def _render_hpa(
    rng: np.random.Generator, height: int, width: int, labels: Sequence[int]
) -> dict[str, np.ndarray]:
    """Render the four uint8 channels of one HPA field of view with a few cells."""
    size = min(height, width)
    yy, xx = _pixel_axes(height, width)
    n_cells = int(rng.integers(2, 5))

    # Cell centres on a jittered grid so cells tile the field without piling up.
    cols = math.ceil(math.sqrt(n_cells))
    rows = math.ceil(n_cells / cols)
    slots = rng.permutation(rows * cols)[:n_cells]
    cy = (slots // cols + 0.5 + rng.uniform(-0.15, 0.15, n_cells)) * height / rows
    cx = (slots % cols + 0.5 + rng.uniform(-0.15, 0.15, n_cells)) * width / cols
    cell_r = 0.42 * size / max(rows, cols) * rng.uniform(0.85, 1.1, n_cells)
    nuc_r = cell_r * rng.uniform(0.4, 0.5, n_cells)
    ncx = cx + rng.uniform(-0.15, 0.15, n_cells) * cell_r
    ncy = cy + rng.uniform(-0.15, 0.15, n_cells) * cell_r

    # Per-pixel distances (in radii) to every cell and nucleus, cells x H x W.
    angle_cell = np.arctan2(yy[None] - cy[:, None, None], xx[None] - cx[:, None, None])
    wobble = 1.0 + 0.08 * np.cos(3 * angle_cell + rng.uniform(0, 2 * np.pi, (n_cells, 1, 1)))
    d_cell = np.hypot(yy[None] - cy[:, None, None], xx[None] - cx[:, None, None]) / (
        cell_r[:, None, None] * wobble
    )
    nuc_aspect = rng.uniform(0.8, 1.0, n_cells)[:, None, None]
    d_nuc = np.hypot(
        (yy[None] - ncy[:, None, None]) * nuc_aspect, xx[None] - ncx[:, None, None]
    ) / nuc_r[:, None, None]
    owner = np.argmin(d_cell, axis=0)
    d_cell_min = np.take_along_axis(d_cell, owner[None], 0)[0]
    d_nuc_own = np.take_along_axis(d_nuc, owner[None], 0)[0]
    angle_own = np.take_along_axis(angle_cell, owner[None], 0)[0]

    def soft(d: np.ndarray, width_: float = 0.08) -> np.ndarray:
        return np.clip((1.0 - d) / (2 * width_) + 0.5, 0.0, 1.0)

    nucleus = soft(d_nuc_own)
    cell = soft(d_cell_min)
    cytoplasm = np.clip(cell - nucleus, 0.0, 1.0)
    cell_level = rng.uniform(0.7, 1.3, n_cells)[owner]
    spot_scale = size / 128.0

    def spots(where: np.ndarray, count: int, sigma: float, elong: float = 1.0) -> np.ndarray:
        """Gaussian spots at random positions drawn from the pixel weights ``where``."""
        flat = where.ravel()
        total = flat.sum()
        if total <= 0 or count <= 0:
            return np.zeros((height, width))
        idx = rng.choice(flat.size, size=count, p=flat / total)
        jitter = rng.uniform(-0.5, 0.5, (2, count))
        py, px = idx // width + jitter[0], idx % width + jitter[1]
        sig = np.full(count, sigma * spot_scale) * rng.uniform(0.8, 1.2, count)
        out = _gaussian_spots(height, width, py, px, sig, rng.uniform(0.6, 1.0, count))
        if elong > 1.0:
            # Short rods: a second, shifted copy of each spot.
            shift = rng.uniform(-1, 1, (2, count)) * sigma * spot_scale * elong
            out += _gaussian_spots(height, width, py + shift[0], px + shift[1], sig,
                                   rng.uniform(0.6, 1.0, count))
        return out / max(out.max(), 1e-9)

    # Reference channels.
    texture = 1.0 + 0.15 * _smooth_noise(rng, height, width, 10)
    blue = nucleus * texture * rng.uniform(0.6, 0.9) * cell_level
    n_fib = rng.integers(7, 12, n_cells)[owner]
    phase = rng.uniform(0, 2 * np.pi, n_cells)[owner]
    fibres = (0.5 + 0.5 * np.cos(n_fib * angle_own + phase + 2.0 * d_cell_min)) ** 4
    red = cell * (0.25 + 0.6 * fibres) * (1.1 - 0.5 * d_cell_min) * rng.uniform(0.4, 0.7)
    reticulum = np.clip(_smooth_noise(rng, height, width, max(8, size // 6)), 0.0, None)
    yellow = cytoplasm * (0.3 + reticulum) * np.exp(-np.maximum(d_nuc_own - 1.0, 0.0) * 1.5)
    yellow *= rng.uniform(0.4, 0.7) / max(float(yellow.max()), 1e-9)

    # Green: the protein of interest, one pattern per label, in every cell.
    patterns = {
        0: lambda: nucleus * (0.8 + 0.2 * texture),
        1: lambda: np.exp(-(((d_nuc_own - 1.0) / 0.1) ** 2)),
        2: lambda: spots(nucleus ** 4, 2 * n_cells + int(rng.integers(0, n_cells + 1)), 2.6),
        4: lambda: spots(nucleus ** 4, 12 * n_cells, 1.0),
        5: lambda: spots(nucleus ** 4, 3 * n_cells, 1.2),
        6: lambda: yellow / max(float(yellow.max()), 1e-9),
        7: lambda: spots(
            cytoplasm * np.exp(-(((d_nuc_own - 1.25) / 0.25) ** 2))
            * (np.cos(angle_own - rng.uniform(0, 2 * np.pi, n_cells)[owner]) > 0.5),
            8 * n_cells, 1.6,
        ),
        14: lambda: red / max(float(red.max()), 1e-9),
        21: lambda: np.exp(-(((d_cell_min - 0.95) / 0.07) ** 2)),
        23: lambda: spots(cytoplasm, 40 * n_cells, 0.9, elong=1.5),
        25: lambda: cytoplasm * (0.85 + 0.15 * texture),
    }
    green = np.zeros((height, width))
    for label in labels:
        green += patterns[label]() * rng.uniform(0.6, 1.0)
    green *= cell_level * rng.uniform(0.6, 0.9) / max(float(green.max()), 1e-9)

    channels = {"red": red, "green": green, "blue": blue, "yellow": yellow}
    out: dict[str, np.ndarray] = {}
    for name, signal in channels.items():
        counts = 255.0 * signal + rng.uniform(4.0, 12.0)
        counts = counts + rng.normal(0.0, 1.0, counts.shape) * np.sqrt(counts + 4.0)
        out[name] = np.clip(np.rint(counts), 0, 255).astype(np.uint8)
    return out


def _hpa_worker(
    out_dir: str, seed: int, jobs: Sequence[tuple[int, str, tuple[int, ...], int, int]]
) -> int:
    """Render and write the HPA images ``(index, Id, labels, height, width)``."""
    folder = Path(out_dir)
    for index, image_id, labels, height, width in jobs:
        rng = np.random.default_rng([seed, _STREAMS["hpa_image"], index, 1])
        for channel, image in _render_hpa(rng, height, width, labels).items():
            atomic_write_bytes(folder / f"{image_id}_{channel}.png", imagecodecs.png_encode(image))
    return len(jobs)


def simulate_hpa(
    out_dir: str | os.PathLike[str],
    n_images: int = 500,
    seed: int = 0,
    image_size: int | tuple[int, int] = 128,
    *,
    workers: int = 1,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a synthetic Human Protein Atlas set: ``train.csv`` and four PNGs per image.

    The layout is the Kaggle HPA one: ``out_dir/train.csv`` with columns ``Id,Target``
    (space-separated class indices, unsorted as in the real file) and
    ``out_dir/train/{Id}_{red,green,blue,yellow}.png``, 8-bit grayscale. Blue shows nuclei,
    red microtubules, yellow the endoplasmic reticulum, and green the protein whose
    localisation defines the labels. Each image holds 2-4 cells and 1-3 labels drawn from
    :data:`HPA_RENDERED_CLASSES` with realistic co-occurrence (Nucleoplasm with Cytosol
    is the commonest pair).

    Args:
        out_dir: Folder to write; created if missing.
        n_images: Number of images (sets of four PNGs).
        seed: Non-negative seed of every random draw; the same seed gives byte-identical
            files.
        image_size: Side of the square images, or ``(height, width)``.
        workers: Processes to render with. The output does not depend on it.
        progress: Called as ``progress("writing images", done, total)``.
        overwrite: Write over an existing ``train.csv`` in ``out_dir``.

    Returns:
        Path of the written ``train.csv``.

    Raises:
        SimulationError: An argument is out of range, or ``out_dir`` already holds a
            ``train.csv`` and ``overwrite`` is false.
    """
    if not isinstance(n_images, (int, np.integer)) or n_images < 1:
        raise SimulationError(f"n_images must be a positive integer, got {n_images!r}")
    height, width = _image_size(image_size)
    if min(height, width) < 32:
        raise SimulationError(f"image_size must be at least 32 pixels a side, got {image_size!r}")
    seed = _check_seed(seed)
    workers = _check_workers(workers)
    folder = Path(out_dir)
    _check_output(folder, "train.csv", overwrite)
    (folder / "train").mkdir(exist_ok=True)

    jobs = []
    for index in range(int(n_images)):
        rng = np.random.default_rng([seed, _STREAMS["hpa_image"], index, 0])
        jobs.append((index, _hpa_id(rng), tuple(_hpa_labels(rng)), height, width))
    logger.info(
        "simulating %d HPA images of %dx%d in %s with %d worker(s)",
        len(jobs), height, width, folder, workers,
    )
    chunks = [(str(folder / "train"), int(seed), chunk) for chunk in _chunk(jobs, workers, 64)]
    _run_jobs(_hpa_worker, chunks, len(jobs), workers, progress)

    rows = sorted((image_id, " ".join(map(str, labels))) for _, image_id, labels, _, _ in jobs)
    text = "Id,Target\n" + "".join(f"{image_id},{target}\n" for image_id, target in rows)
    manifest = folder / "train.csv"
    atomic_write_bytes(manifest, text.encode())
    logger.info("wrote %s", manifest)
    return manifest
