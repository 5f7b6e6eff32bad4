"""A simulated high-content-screening plate, written as OME-Zarr by the ``ome-zarr`` library.

:func:`simulate_plate` writes ``OUT/plate.zarr`` (an NGFF plate: wells ``A/1`` ... with
their fields ``0``, ``1`` ..., each field a two-level pyramid of ``DNA`` and ``Marker``
uint16 channels named in its ``omero`` metadata) and ``OUT/wells.csv`` (``well,treatment``),
which the ``plate`` preset reads unchanged. The treatment of a well shows in its images:

- ``DMSO`` (control): a dim, diffuse marker around each nucleus;
- ``drug_A``: larger nuclei and a bright marker halo;
- ``drug_B``: the marker gathers into puncta around each nucleus.

Treatments follow a plate map by column (column 1 ``DMSO``, 2 ``drug_A``, 3 ``drug_B``,
4 ``DMSO`` ...), so every treatment sits in several wells; each well has its own
staining intensity (a well effect), so fields of one well resemble each other more than
fields of another well of the same treatment, as on real plates. Every field is drawn
from its own generator seeded by ``(seed, row, column, field)``. The plate is written in a
temporary folder and renamed into place, then ``wells.csv``: a folder with ``wells.csv``
holds a complete plate.
"""

from __future__ import annotations

import logging
import shutil
import string
from pathlib import Path

import numpy as np

from cellclass.atomic import atomic_write_text
from cellclass.errors import MissingDependencyError, PlateSimulationError

__all__ = ["PLATE_CHANNELS", "TREATMENTS", "simulate_plate"]

log = logging.getLogger(__name__)

TREATMENTS: tuple[str, ...] = ("DMSO", "drug_A", "drug_B")
"""The simulated treatments, in plate-map order (column 1, 2, 3, then again)."""

PLATE_CHANNELS: tuple[str, ...] = ("DNA", "Marker")
"""The channels of every field, as its ``omero`` metadata names them."""

NGFF_VERSIONS = ("0.4", "0.5")
_OFFSET, _GAIN, _READ_NOISE = 100.0, 2.0, 3.0


def simulate_plate(
    out: str | Path,
    *,
    rows: int = 4,
    cols: int = 6,
    fields: int = 2,
    image_size: int = 64,
    z_planes: int = 1,
    seed: int = 0,
    ngff: str = "0.5",
    overwrite: bool = False,
) -> Path:
    """Write a simulated OME-Zarr plate and its ``wells.csv`` into ``out``.

    Args:
        out: Output folder; ``plate.zarr`` and ``wells.csv`` are written in it.
        rows: Plate rows (``A``, ``B`` ...), 1 to 26.
        cols: Plate columns (``1``, ``2`` ...), 1 to 48.
        fields: Fields of view per well.
        image_size: Side of every field, in pixels (at least 16).
        z_planes: Z planes per field (1: ``c, y, x`` fields; more: ``c, z, y, x`` stacks
            whose middle plane is in focus).
        seed: Random seed (same seed, same pixels).
        ngff: NGFF version to write: ``0.5`` (zarr v3) or ``0.4`` (zarr v2).
        overwrite: Replace an existing plate in ``out``.

    Returns:
        The path of ``wells.csv``.

    Raises:
        PlateSimulationError: When a setting is out of range, or ``out`` already holds a
            plate and ``overwrite`` is false.
        MissingDependencyError: When the ``zarr`` extra is not installed.
    """
    _check(rows, 1, 26, "rows")
    _check(cols, 1, 48, "cols")
    _check(fields, 1, 100, "fields")
    _check(image_size, 16, 4096, "image_size")
    _check(z_planes, 1, 64, "z_planes")
    _check(seed, 0, 2**63 - 1, "seed")
    if ngff not in NGFF_VERSIONS:
        raise PlateSimulationError(f"ngff {ngff!r} is invalid; valid: {', '.join(NGFF_VERSIONS)}")
    zarr, writer, fmt = _library(ngff)
    out = Path(out)
    final = out / "plate.zarr"
    if (final.exists() or (out / "wells.csv").exists()) and not overwrite:
        raise PlateSimulationError(
            f"{final} or {out / 'wells.csv'} already exists; pass overwrite=True (--overwrite) or "
            f"choose an empty folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    partial = out / ".plate.zarr.partial"
    shutil.rmtree(partial, ignore_errors=True)

    row_names = list(string.ascii_uppercase[:rows])
    col_names = [str(c + 1) for c in range(cols)]
    wells = [f"{r}/{c}" for r in row_names for c in col_names]
    root = zarr.open_group(str(partial), mode="w", zarr_format=fmt.zarr_format)
    writer.write_plate_metadata(root, row_names, col_names, wells, fmt=fmt, name="simulated plate",
                                field_count=fields)
    axes = "czyx" if z_planes > 1 else "cyx"
    chunks = (1, 1, image_size, image_size) if z_planes > 1 else (1, image_size, image_size)
    omero = {"channels": [{"label": name, "color": color, "active": True,
                           "window": {"start": 0, "end": 4000, "min": 0, "max": 65535}}
                          for name, color in zip(PLATE_CHANNELS, ("0000FF", "00FF00"), strict=True)]}
    lines = ["well,treatment"]
    for r, row in enumerate(row_names):
        for c, col in enumerate(col_names):
            treatment = c % len(TREATMENTS)
            well_group = root.require_group(row).require_group(col)
            writer.write_well_metadata(well_group, [{"path": str(f)} for f in range(fields)], fmt=fmt)
            well_gain = float(np.random.default_rng([seed, 1, r, c]).uniform(0.75, 1.3))
            for f in range(fields):
                rng = np.random.default_rng([seed, 2, r, c, f])
                image = _render_field(rng, image_size, z_planes, treatment, well_gain)
                writer.write_image(image, well_group.require_group(str(f)), axes=axes, fmt=fmt,
                                   scale_factors=(2,), storage_options={"chunks": chunks}, omero=omero)
            lines.append(f"{row}{int(col):02d},{TREATMENTS[treatment]}")
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)
    manifest = out / "wells.csv"
    atomic_write_text(manifest, "\n".join(lines) + "\n")
    log.debug("wrote a %dx%d plate of %d field(s) per well to %s", rows, cols, fields, final)
    return manifest


def _render_field(rng: np.random.Generator, size: int, z_planes: int, treatment: int, well_gain: float) -> np.ndarray:
    """One field: ``(2, H, W)`` uint16, or ``(2, Z, H, W)`` with the focus in the middle plane."""
    ys, xs = np.mgrid[0:size, 0:size].astype(float)
    n_cells = int(rng.integers(3, 7))
    radius = size * 0.075 * (1.35 if treatment == 1 else 1.0)
    dna = np.zeros((size, size))
    marker = np.zeros((size, size))
    for _ in range(n_cells):
        cy, cx = rng.uniform(radius * 1.5, size - radius * 1.5, 2)
        r = radius * rng.uniform(0.85, 1.15)
        d2 = ((ys - cy) ** 2 + (xs - cx) ** 2) / r**2
        dna += 900.0 * np.clip(1.5 * (1.0 - d2), 0.0, 1.0) * rng.lognormal(0.0, 0.15)
        halo = np.exp(-((np.sqrt(d2) - 1.8) ** 2) / 0.5)
        if treatment == 2:
            n_spots = int(rng.integers(6, 11))
            angle = rng.uniform(0.0, 2 * np.pi, n_spots)
            distance = r * rng.uniform(1.4, 2.2, n_spots)
            for a, dist in zip(angle, distance, strict=True):
                sy, sx = cy + dist * np.sin(a), cx + dist * np.cos(a)
                marker += 700.0 * np.exp(-((ys - sy) ** 2 + (xs - sx) ** 2) / (2 * (0.05 * size) ** 2))
            marker += 60.0 * halo
        else:
            marker += (650.0 if treatment == 1 else 120.0) * halo
    planes = []
    for z in range(z_planes):
        blur = abs(z - z_planes // 2)
        planes.append(np.stack([_defocus(dna, blur), _defocus(marker, blur)]) * well_gain)
    photons = np.stack(planes, axis=1) if z_planes > 1 else planes[0]
    photons = photons + 40.0
    photons += rng.standard_normal(photons.shape) * np.sqrt(photons + _READ_NOISE**2)
    counts = photons * _GAIN + _OFFSET
    return np.clip(np.rint(counts), 0, 65535).astype(np.uint16)


def _defocus(plane: np.ndarray, steps: int) -> np.ndarray:
    """A plane blurred ``steps`` times by a 3x3 box (out of focus by that many planes)."""
    out = plane
    for _ in range(steps):
        padded = np.pad(out, 1, mode="edge")
        out = sum(padded[dy:dy + out.shape[0], dx:dx + out.shape[1]] for dy in range(3) for dx in range(3)) / 9.0
    return out


def _library(ngff: str) -> tuple[object, object, object]:
    try:
        import zarr
        from ome_zarr import format as ome_format
        from ome_zarr import writer
    except ImportError as exc:
        raise MissingDependencyError(
            f"writing an OME-Zarr plate needs the zarr extra ({exc.name or 'ome_zarr'} is not installed); "
            f"install it with: pip install 'cellclass[zarr]'"
        ) from None
    fmt = ome_format.FormatV04() if ngff == "0.4" else ome_format.FormatV05()
    return zarr, writer, fmt


def _check(value: int, low: int, high: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not low <= value <= high:
        raise PlateSimulationError(f"{name} {value!r} is invalid; valid: an integer from {low} to {high}")
