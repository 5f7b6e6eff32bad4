"""Simulated Human Protein Atlas fields of view: dozens of cells, each with its own labels.

The weak-label setting of the HPA single-cell classification challenge: a field's labels
are the union of its cells' labels, and each cell shows only a subset of them (one cell
nucleoplasm, its neighbour nucleoplasm and cytosol ...). :func:`simulate_hpa_fields`
renders such fields in the HPA layout that the ``hpa`` preset reads (``train.csv`` of
field labels, four 8-bit PNGs per field: red microtubules, green protein of interest, blue
nuclei, yellow endoplasmic reticulum), and writes the ground truth beside it: the true
instance masks of the cells and of their nuclei, and every cell's labels, so that
segmentation, crops and a cell-level model aggregated to the field can all be scored.

Cells sit on a jittered grid at confluence (neighbours touch and are split where they
meet), about 60 to 90 pixels across, so a 512 x 512 field holds about 20 to 45 of them. The
per-cell look (channels, label patterns, co-occurring label sets, camera noise) is the
one of :func:`cellclass.data.simulate.simulate_hpa`, drawn from its helpers.
Deterministic by seed, whatever the number of worker processes.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import imagecodecs
import numpy as np

from cellclass.atomic import atomic_write_bytes
from cellclass.data.io import write_tiff
from cellclass.data.presets import HPA_CHANNELS
from cellclass.data.simulate import (
    HPA_RENDERED_CLASSES,
    _check_output,
    _check_seed,
    _check_workers,
    _chunk,
    _gaussian_spots,
    _hpa_id,
    _hpa_labels,
    _run_jobs,
    _smooth_noise,
)
from cellclass.errors import SimulationError
from cellclass.progress import ProgressFn

__all__ = ["HPA_RENDERED_CLASSES", "FieldCell", "simulate_hpa_fields"]

log = logging.getLogger(__name__)

_STREAM = 11  # apart from simulate.py's streams, so fields never reuse an image's draws
_SPACING = (70.0, 100.0)  # grid pitch in pixels: cells about this wide
_JITTER = 0.1  # of the pitch: keeps every nucleus inside its own cell


@dataclass(frozen=True)
class FieldCell:
    """One simulated cell: where it is and what it shows.

    Attributes:
        cy: Centre row of the cell.
        cx: Centre column.
        radius: Cell radius in pixels (before the outline's wobble).
        ny: Centre row of its nucleus.
        nx: Centre column of its nucleus.
        nucleus_radius: Nucleus radius along its long axis.
        aspect: Nucleus short over long axis.
        angle: Nucleus orientation, radians.
        labels: HPA class indices the cell shows (a non-empty subset of its field's).
    """

    cy: float
    cx: float
    radius: float
    ny: float
    nx: float
    nucleus_radius: float
    aspect: float
    angle: float
    labels: tuple[int, ...]


def _layout(rng: np.random.Generator, size: int, field_labels: Sequence[int]) -> list[FieldCell]:
    """Cells on a jittered grid, each carrying a non-empty subset of the field's labels."""
    n_side = max(2, round(size / rng.uniform(*_SPACING)))
    pitch = size / n_side
    occupied = rng.random(n_side * n_side) < rng.uniform(0.75, 0.95)
    if not occupied.any():
        occupied[rng.integers(occupied.size)] = True
    slots = np.flatnonzero(occupied)
    n = len(slots)
    cy = (slots // n_side + 0.5 + rng.uniform(-_JITTER, _JITTER, n)) * pitch
    cx = (slots % n_side + 0.5 + rng.uniform(-_JITTER, _JITTER, n)) * pitch
    radius = 0.5 * pitch * rng.uniform(0.9, 1.1, n)
    nucleus_radius = radius * rng.uniform(0.36, 0.46, n)
    ny = cy + rng.uniform(-0.12, 0.12, n) * radius
    nx = cx + rng.uniform(-0.12, 0.12, n) * radius

    # Which cells show which label: each label in a share of the cells, every cell at least
    # one label, every label in at least one cell (so the field's set is the cells' union).
    carries = np.zeros((n, len(field_labels)), bool)
    for j in range(len(field_labels)):
        carries[:, j] = rng.random(n) < rng.uniform(0.3, 0.8)
    for i in np.flatnonzero(~carries.any(axis=1)):
        carries[i, rng.integers(len(field_labels))] = True
    for j in np.flatnonzero(~carries.any(axis=0)):
        carries[rng.integers(n), j] = True
    return [
        FieldCell(float(cy[i]), float(cx[i]), float(radius[i]), float(ny[i]), float(nx[i]),
                  float(nucleus_radius[i]), float(rng.uniform(0.75, 1.0)), float(rng.uniform(0, math.pi)),
                  tuple(int(field_labels[j]) for j in np.flatnonzero(carries[i])))
        for i in range(n)
    ]


def _render_field(
    rng: np.random.Generator, size: int, cells: Sequence[FieldCell]
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """The four uint8 channels, the cell labels and the nucleus labels (uint16) of a field."""
    n = len(cells)
    # Ownership: every pixel goes to the cell it is nearest to, in that cell's radii, with a
    # wobbly outline; computed in a window around each cell, never as cells x H x W.
    best = np.full((size, size), np.inf)
    owner = np.zeros((size, size), np.int32)
    angle_own = np.zeros((size, size))
    d_nuc_own = np.full((size, size), np.inf)
    wobble_phase = rng.uniform(0, 2 * np.pi, n)
    for k, cell in enumerate(cells, start=1):
        reach = 1.25 * cell.radius
        y0, y1 = max(int(cell.cy - reach), 0), min(int(cell.cy + reach) + 2, size)
        x0, x1 = max(int(cell.cx - reach), 0), min(int(cell.cx + reach) + 2, size)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        angle = np.arctan2(yy - cell.cy, xx - cell.cx)
        wobble = 1.0 + 0.08 * np.cos(3 * angle + wobble_phase[k - 1])
        d = np.hypot(yy - cell.cy, xx - cell.cx) / (cell.radius * wobble)
        box = (slice(y0, y1), slice(x0, x1))
        mine = d < best[box]
        best[box][mine] = d[mine]
        owner[box][mine] = k
        angle_own[box][mine] = angle[mine]
        u = (xx - cell.nx) * math.cos(cell.angle) + (yy - cell.ny) * math.sin(cell.angle)
        v = -(xx - cell.nx) * math.sin(cell.angle) + (yy - cell.ny) * math.cos(cell.angle)
        d_nuc_own[box][mine] = np.hypot(u, v / cell.aspect)[mine] / cell.nucleus_radius
    inside = best < 1.0
    cell_labels = np.where(inside, owner, 0).astype(np.uint16)
    nucleus_labels = np.where(inside & (d_nuc_own < 1.0), owner, 0).astype(np.uint16)

    def soft(d: np.ndarray, width: float = 0.08) -> np.ndarray:
        return np.clip((1.0 - d) / (2 * width) + 0.5, 0.0, 1.0)

    nucleus = soft(np.where(np.isfinite(d_nuc_own), d_nuc_own, 9.0))
    d_cell = np.where(np.isfinite(best), best, 9.0)
    cell_soft = soft(d_cell)
    cytoplasm = np.clip(cell_soft - nucleus, 0.0, 1.0)
    per_cell = np.concatenate([[0.0], rng.uniform(0.7, 1.3, n)])
    cell_level = per_cell[owner]
    spot_scale = float(np.mean([c.radius for c in cells])) / 27.0  # simulate_hpa's cells: ~27 px radius

    def spots(where: np.ndarray, count: int, sigma: float, elong: float = 1.0) -> np.ndarray:
        """Gaussian spots at random positions drawn from the pixel weights ``where``."""
        flat = where.ravel()
        total = flat.sum()
        if total <= 0 or count <= 0:
            return np.zeros((size, size))
        idx = rng.choice(flat.size, size=count, p=flat / total)
        jitter = rng.uniform(-0.5, 0.5, (2, count))
        py, px = idx // size + jitter[0], idx % size + jitter[1]
        sig = np.full(count, sigma * spot_scale) * rng.uniform(0.8, 1.2, count)
        out = _gaussian_spots(size, size, py, px, sig, rng.uniform(0.6, 1.0, count))
        if elong > 1.0:
            shift = rng.uniform(-1, 1, (2, count)) * sigma * spot_scale * elong
            out += _gaussian_spots(size, size, py + shift[0], px + shift[1], sig, rng.uniform(0.6, 1.0, count))
        return out / max(out.max(), 1e-9)

    # Reference channels, as simulate_hpa draws them.
    texture = 1.0 + 0.15 * _smooth_noise(rng, size, size, max(10, size // 12))
    blue = nucleus * texture * rng.uniform(0.6, 0.9) * cell_level
    n_fib = np.concatenate([[0], rng.integers(7, 12, n)])[owner]
    phase = np.concatenate([[0.0], rng.uniform(0, 2 * np.pi, n)])[owner]
    fibres = (0.5 + 0.5 * np.cos(n_fib * angle_own + phase + 2.0 * d_cell)) ** 4
    red = cell_soft * (0.25 + 0.6 * fibres) * np.clip(1.1 - 0.5 * d_cell, 0.0, None) * rng.uniform(0.4, 0.7)
    reticulum = np.clip(_smooth_noise(rng, size, size, max(8, size // 6)), 0.0, None)
    yellow = cytoplasm * (0.3 + reticulum) * np.exp(-np.maximum(np.minimum(d_nuc_own, 9.0) - 1.0, 0.0) * 1.5)
    yellow *= rng.uniform(0.4, 0.7) / max(float(yellow.max()), 1e-9)

    # Green: each label's pattern in the cells that carry it, and only there.
    golgi_side = np.concatenate([[0.0], rng.uniform(0, 2 * np.pi, n)])[owner]
    patterns = {
        0: lambda c, m: nucleus * (0.8 + 0.2 * texture),
        1: lambda c, m: np.exp(-(((np.minimum(d_nuc_own, 9.0) - 1.0) / 0.1) ** 2)),
        2: lambda c, m: spots(m * nucleus ** 4, 2 * c + int(rng.integers(0, c + 1)), 2.6),
        4: lambda c, m: spots(m * nucleus ** 4, 12 * c, 1.0),
        5: lambda c, m: spots(m * nucleus ** 4, 3 * c, 1.2),
        6: lambda c, m: yellow / max(float(yellow.max()), 1e-9),
        7: lambda c, m: spots(
            m * cytoplasm * np.exp(-(((np.minimum(d_nuc_own, 9.0) - 1.25) / 0.25) ** 2))
            * (np.cos(angle_own - golgi_side) > 0.5), 8 * c, 1.6),
        14: lambda c, m: red / max(float(red.max()), 1e-9),
        21: lambda c, m: np.exp(-(((d_cell - 0.95) / 0.07) ** 2)),
        23: lambda c, m: spots(m * cytoplasm, 40 * c, 0.9, elong=1.5),
        25: lambda c, m: cytoplasm * (0.85 + 0.15 * texture),
    }
    green = np.zeros((size, size))
    for label in sorted({label for cell in cells for label in cell.labels}):
        carriers = [k for k, cell in enumerate(cells, start=1) if label in cell.labels]
        where = np.isin(owner, carriers) & (best < 1.3)
        pattern = patterns[label](len(carriers), where) * where
        green += pattern / max(float(pattern.max()), 1e-9) * rng.uniform(0.6, 1.0)
    green *= cell_level * rng.uniform(0.6, 0.9) / max(float(green.max()), 1e-9)

    channels = {"red": red, "green": green, "blue": blue, "yellow": yellow}
    out: dict[str, np.ndarray] = {}
    for name in HPA_CHANNELS:
        counts = 255.0 * channels[name] + rng.uniform(4.0, 12.0)
        counts = counts + rng.normal(0.0, 1.0, counts.shape) * np.sqrt(counts + 4.0)
        out[name] = np.clip(np.rint(counts), 0, 255).astype(np.uint8)
    return out, cell_labels, nucleus_labels


def _fields_worker(out_dir: str, seed: int, jobs: Sequence[tuple[int, str, int, list[FieldCell]]]) -> int:
    """Render and write the fields ``(index, Id, size, cells)``: PNGs and true masks."""
    folder = Path(out_dir)
    for index, field_id, size, cells in jobs:
        rng = np.random.default_rng([seed, _STREAM, index, 1])
        channels, cell_labels, nucleus_labels = _render_field(rng, size, cells)
        for name, image in channels.items():
            atomic_write_bytes(folder / "train" / f"{field_id}_{name}.png", imagecodecs.png_encode(image))
        write_tiff(folder / "masks" / f"{field_id}.tif", cell_labels)
        write_tiff(folder / "nuclei" / f"{field_id}.tif", nucleus_labels)
    return len(jobs)


def simulate_hpa_fields(
    out: str | os.PathLike[str],
    n_fields: int = 100,
    size: int = 512,
    seed: int = 0,
    *,
    workers: int = 1,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> Path:
    """Write simulated HPA fields of view with their true cells and per-cell labels.

    Layout (the ``hpa`` preset reads ``out`` as it is):

    - ``train.csv``: ``Id,Target``, the field's labels (space-separated class indices), the
      union of its cells' labels;
    - ``train/{Id}_{red,green,blue,yellow}.png``: 8-bit channels;
    - ``masks/{Id}.tif``: uint16 instance labels of the whole cells (0 background, cells
      1..N), where :func:`cellclass.data.crops.make_crops` looks for a field's mask;
    - ``nuclei/{Id}.tif``: uint16 labels of the nuclei, each with its cell's number;
    - ``cells_truth.csv``: ``Id,object_id,Target``, one row per cell, in the masks' numbering.

    Each field draws 1-3 labels from :data:`HPA_RENDERED_CLASSES` (co-occurring as in
    :func:`~cellclass.data.simulate.simulate_hpa`); each label is shown by a random share
    (30-80%) of the field's cells, every cell shows at least one of them.

    Args:
        out: Folder to write; created if missing.
        n_fields: Number of fields.
        size: Side of the square fields, in pixels (at least 128).
        seed: Non-negative seed of every random draw; the same seed gives identical files.
        workers: Processes to render with. The output does not depend on it.
        progress: Called as ``progress("writing fields", done, total)``.
        overwrite: Write over an existing ``train.csv`` in ``out``.

    Returns:
        Path of the written ``train.csv``.

    Raises:
        SimulationError: An argument is out of range, or ``out`` already holds a
            ``train.csv`` and ``overwrite`` is false.
    """
    if isinstance(n_fields, bool) or not isinstance(n_fields, (int, np.integer)) or n_fields < 1:
        raise SimulationError(f"n_fields must be a positive integer, got {n_fields!r}")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 128:
        raise SimulationError(f"size must be an integer of at least 128 pixels, got {size!r}")
    seed = _check_seed(seed)
    workers = _check_workers(workers)
    folder = Path(out)
    _check_output(folder, "train.csv", overwrite)
    for sub in ("train", "masks", "nuclei"):
        (folder / sub).mkdir(exist_ok=True)

    jobs = []
    for index in range(int(n_fields)):
        rng = np.random.default_rng([seed, _STREAM, index, 0])
        field_id = _hpa_id(rng)
        jobs.append((index, field_id, int(size), _layout(rng, int(size), _hpa_labels(rng))))
    log.info("simulating %d HPA fields of %dx%d (%d cells) in %s with %d worker(s)", len(jobs), size, size,
             sum(len(job[3]) for job in jobs), folder, workers)
    chunks = [(str(folder), seed, chunk) for chunk in _chunk(jobs, workers, 16)]
    _run_jobs(_fields_worker, chunks, len(jobs), workers, progress, "writing fields")

    truth = ["Id,object_id,Target"]
    manifest = ["Id,Target"]
    for _, field_id, _, cells in sorted(jobs, key=lambda job: job[1]):
        union: list[int] = []
        for object_id, cell in enumerate(cells, start=1):
            truth.append(f"{field_id},{object_id},{' '.join(map(str, cell.labels))}")
            union += [label for label in cell.labels if label not in union]
        manifest.append(f"{field_id},{' '.join(map(str, sorted(union)))}")
    atomic_write_bytes(folder / "cells_truth.csv", ("\n".join(truth) + "\n").encode())
    path = folder / "train.csv"
    atomic_write_bytes(path, ("\n".join(manifest) + "\n").encode())
    log.info("wrote %s", path)
    return path
