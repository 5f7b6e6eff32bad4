"""Instance segmentation of nuclei (and of whole cells seeded from them) in fluorescence fields.

Every function takes a field as ``(H, W)`` or ``(C, H, W)`` in the file's own dtype plus a
channel index, and returns a ``uint16`` label image ``(H, W)``: 0 is background, objects
are numbered 1..N with no gaps.

The default backend, :class:`SkimageBackend`, needs no weights and no download. It runs
:func:`segment_nuclei`: Gaussian smoothing, an automatic threshold (Otsu, Li, or local),
hole filling, a size filter, then a watershed from seeds found on the smoothed distance
transform of the mask, which splits touching nuclei. Its defaults were tuned on real
Hoechst-stained U2OS nuclei (BBBC039, 20x) by well-grouped hold-out; see
``benchmarks/segmentation_bbbc039.py``. :func:`otsu_baseline` (Otsu threshold and
connected components, nothing else) is the baseline it is compared against.

:class:`CellposeBackend` and :class:`StarDistBackend` run those packages on weights the
user already has on disk (nothing is ever downloaded), and :class:`MaskFileBackend` reads
masks the user already has. :func:`make_backend` builds any of them by name.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from scipy import ndimage as ndi
from skimage import feature, filters, morphology, segmentation

from cellclass.data.io import expand_pattern, read_image
from cellclass.errors import (
    CellclassError,
    MissingDependencyError,
    ModelError,
    SegmentationError,
)

__all__ = [
    "BACKENDS",
    "THRESHOLD_METHODS",
    "SEED_METHODS",
    "Backend",
    "CellParams",
    "CellposeBackend",
    "MaskFileBackend",
    "NucleusParams",
    "SkimageBackend",
    "StarDistBackend",
    "make_backend",
    "otsu_baseline",
    "relabel",
    "segment_cells",
    "segment_nuclei",
]

logger = logging.getLogger(__name__)

THRESHOLD_METHODS: tuple[str, ...] = ("otsu", "li", "local")
"""Foreground thresholds of :class:`NucleusParams`."""

SEED_METHODS: tuple[str, ...] = ("hmaxima", "peaks", "none")
"""Watershed seed finders of :class:`NucleusParams` (``none``: connected components only)."""

_MAX_LABEL = np.iinfo(np.uint16).max


# --------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NucleusParams:
    """Settings of :func:`segment_nuclei`; the defaults are the tuned ones.

    Attributes:
        sigma: Gaussian smoothing of the image before thresholding, in pixels (0: none).
        background_size: Side in pixels of the grey opening that estimates an uneven
            background, subtracted before thresholding (None: no subtraction). Use about
            twice the nucleus diameter.
        threshold: ``otsu``, ``li`` (global, automatic), or ``local``: above the Gaussian
            local mean of a ``block_size`` window and above the global Otsu threshold
            times ``threshold_scale`` (so flat background is never foreground).
        threshold_scale: Factor on the automatic threshold, taken above the field's 1st
            intensity percentile (the camera offset); below 1 grows objects.
        block_size: Odd window side of the ``local`` threshold, in pixels.
        min_area: Objects smaller than this many pixels are removed (before and after
            the watershed).
        max_area: Objects larger than this are removed (None: no limit).
        seeds: ``hmaxima`` (maxima of the distance transform at least ``h`` pixels high),
            ``peaks`` (local maxima at least ``min_distance`` apart), or ``none``.
        distance_sigma: Gaussian smoothing of the distance transform before seeding, so
            a ragged outline does not make spurious maxima.
        h: Height in pixels of distance of an ``hmaxima`` seed above its saddle to its
            neighbour; lower splits more.
        min_distance: Least distance between ``peaks`` seeds in pixels; None derives it
            per field as ``min_distance_factor`` times the median nucleus radius of the
            thresholded mask (scale-adaptive).
        min_distance_factor: See ``min_distance``.
        compactness: Compact watershed (0: classic); higher gives rounder splits.
        intensity_weight: Share, in [0, 1], of the smoothed intensity in the landscape the
            watershed floods (the rest is the distance transform): dim gaps between touching
            nuclei then guide the cut.
        remove_border: Remove objects that touch the field's edge.
        fill_holes: Fill holes in the foreground mask before splitting.
    """

    sigma: float = 0.5
    background_size: int | None = 61
    threshold: str = "local"
    threshold_scale: float = 0.5
    block_size: int = 101
    min_area: int = 30
    max_area: int | None = None
    seeds: str = "hmaxima"
    distance_sigma: float = 2.0
    h: float = 0.5
    min_distance: float | None = None
    min_distance_factor: float = 0.5
    compactness: float = 0.0
    intensity_weight: float = 0.0
    remove_border: bool = False
    fill_holes: bool = True

    def __post_init__(self) -> None:
        _check_choice("threshold", self.threshold, THRESHOLD_METHODS)
        _check_choice("seeds", self.seeds, SEED_METHODS)
        for name in ("sigma", "distance_sigma", "h", "compactness", "min_distance_factor"):
            _check_number(name, getattr(self, name), low=0.0)
        _check_number("threshold_scale", self.threshold_scale, low=0.0, low_open=True)
        _check_number("intensity_weight", self.intensity_weight, low=0.0, high=1.0)
        _check_number("min_area", self.min_area, low=0)
        if self.max_area is not None:
            _check_number("max_area", self.max_area, low=max(self.min_area, 1))
        if self.min_distance is not None:
            _check_number("min_distance", self.min_distance, low=1.0)
        if self.background_size is not None:
            _check_number("background_size", self.background_size, low=3)
        if not isinstance(self.block_size, int) or self.block_size < 3 or self.block_size % 2 == 0:
            raise SegmentationError(
                f"block_size must be an odd integer >= 3; got {self.block_size!r}"
            )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> NucleusParams:
        """Build from a mapping (a YAML section), refusing unknown keys.

        Raises:
            SegmentationError: On an unknown key or an invalid value.
        """
        return _from_dict(cls, values)

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dictionary (for YAML and JSON)."""
        return asdict(self)


@dataclass(frozen=True)
class CellParams:
    """Settings of :func:`segment_cells`.

    Attributes:
        sigma: Gaussian smoothing of the cytoplasm or membrane channel, in pixels.
        threshold: ``otsu`` or ``li``: the cell foreground (nuclei always belong to it).
        threshold_scale: Factor on that threshold, taken above the 1st percentile.
        membrane: True where the channel marks membranes (bright between cells: the
            watershed floods the intensity itself); False for a cytoplasm stain (the
            watershed floods the inverted intensity, so cuts follow dim gaps).
        compactness: Compact watershed (0: classic).
        max_distance: Cells reach at most this far from their nucleus, in pixels (None:
            as far as the foreground goes).
    """

    sigma: float = 2.0
    threshold: str = "otsu"
    threshold_scale: float = 1.0
    membrane: bool = False
    compactness: float = 0.0
    max_distance: float | None = None

    def __post_init__(self) -> None:
        _check_choice("threshold", self.threshold, ("otsu", "li"))
        _check_number("sigma", self.sigma, low=0.0)
        _check_number("compactness", self.compactness, low=0.0)
        _check_number("threshold_scale", self.threshold_scale, low=0.0, low_open=True)
        if self.max_distance is not None:
            _check_number("max_distance", self.max_distance, low=0.0, low_open=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> CellParams:
        """Build from a mapping, refusing unknown keys.

        Raises:
            SegmentationError: On an unknown key or an invalid value.
        """
        return _from_dict(cls, values)


# --------------------------------------------------------------------------------------
# The default pipeline
# --------------------------------------------------------------------------------------


def segment_nuclei(
    image: np.ndarray, channel: int = 0, params: NucleusParams | None = None
) -> np.ndarray:
    """Label the nuclei of one field.

    Args:
        image: ``(H, W)`` or ``(C, H, W)``, any integer or float dtype.
        channel: Channel holding the nuclear stain, where ``image`` has several.
        params: Settings (default: the tuned :class:`NucleusParams`).

    Returns:
        ``uint16`` label image ``(H, W)``, 0 background, nuclei 1..N.

    Raises:
        SegmentationError: On an image of the wrong shape, a channel out of range, a
            non-finite image or more nuclei than uint16 can number.
    """
    params = params or NucleusParams()
    smoothed = _smoothed(_plane(image, channel), params.sigma, params.background_size)
    mask = _foreground(smoothed, params)
    mask = _drop_by_area(ndi.label(mask)[0], params.min_area, None) > 0
    if params.seeds == "none" or not mask.any():
        labels = ndi.label(mask)[0]
    else:
        labels = _split_touching(smoothed, mask, params)
    labels = _drop_by_area(labels, params.min_area, params.max_area)
    if params.remove_border:
        labels = segmentation.clear_border(labels)
    return relabel(labels)


def segment_cells(
    nuclei: np.ndarray, image: np.ndarray, channel: int = 0, params: CellParams | None = None
) -> np.ndarray:
    """Label whole cells by a watershed on a cytoplasm or membrane channel, seeded from nuclei.

    Each cell keeps the number of its nucleus; a cell never takes another cell's nucleus,
    and foreground without a nucleus stays background.

    Args:
        nuclei: ``(H, W)`` nucleus label image (e.g. from :func:`segment_nuclei`).
        image: ``(H, W)`` or ``(C, H, W)`` field holding the cytoplasm/membrane channel.
        channel: That channel's index.
        params: Settings (default: :class:`CellParams`).

    Returns:
        ``uint16`` label image ``(H, W)`` with the labels of ``nuclei``.

    Raises:
        SegmentationError: If the shapes differ or ``nuclei`` is not an integer image.
    """
    params = params or CellParams()
    plane = _plane(image, channel)
    nuclei = np.asarray(nuclei)
    if nuclei.shape != plane.shape:
        raise SegmentationError(
            f"nucleus labels have shape {nuclei.shape} but the cytoplasm channel has "
            f"{plane.shape}; they must be equal"
        )
    if not np.issubdtype(nuclei.dtype, np.integer):
        raise SegmentationError(f"nucleus labels must be integers; got dtype {nuclei.dtype}")
    if nuclei.max(initial=0) > _MAX_LABEL:
        raise SegmentationError(f"nucleus labels go up to {nuclei.max()}; valid: at most {_MAX_LABEL}")
    smoothed = _smoothed(plane, params.sigma, None)
    threshold = _global_threshold(smoothed, params.threshold) * params.threshold_scale
    mask = (smoothed > threshold) | (nuclei > 0)
    if params.max_distance is not None:
        mask &= ndi.distance_transform_edt(nuclei == 0) <= params.max_distance
    landscape = smoothed if params.membrane else -smoothed
    cells = segmentation.watershed(landscape, markers=nuclei.astype(np.int32), mask=mask,
                                   compactness=params.compactness)
    return cells.astype(np.uint16)


def otsu_baseline(image: np.ndarray, channel: int = 0) -> np.ndarray:
    """The plain baseline: Otsu's threshold on the raw channel, then connected components.

    No smoothing, no size filter, no splitting of touching nuclei.

    Raises:
        SegmentationError: On an image of the wrong shape or a channel out of range.
    """
    plane = _plane(image, channel)
    if plane.min() == plane.max():
        return np.zeros(plane.shape, np.uint16)
    labels, _ = ndi.label(plane > filters.threshold_otsu(plane), structure=np.ones((3, 3)))
    return relabel(labels)


def relabel(labels: np.ndarray) -> np.ndarray:
    """Renumber a label image to 1..N without gaps (order of first label value), as uint16.

    Raises:
        SegmentationError: If there are more objects than uint16 can number.
    """
    labels = np.asarray(labels)
    ids = np.unique(labels)
    ids = ids[ids != 0]
    if len(ids) > _MAX_LABEL:
        raise SegmentationError(
            f"{len(ids)} objects found; valid: at most {_MAX_LABEL} in a uint16 label image"
        )
    lookup = np.zeros(int(labels.max(initial=0)) + 1, np.uint16)
    lookup[ids] = np.arange(1, len(ids) + 1)
    return lookup[np.clip(labels, 0, None)]


def _smoothed(plane: np.ndarray, sigma: float, background_size: int | None) -> np.ndarray:
    """The plane as float32, background-subtracted where asked, smoothed, offset removed."""
    x = plane.astype(np.float32, copy=True)
    if background_size is not None:
        background = ndi.grey_opening(x, size=(background_size, background_size))
        x -= ndi.uniform_filter(background, size=background_size)
    if sigma > 0:
        x = ndi.gaussian_filter(x, sigma)
    # The camera offset: thresholds scale from here.
    x -= np.percentile(x, 1)
    return x


def _global_threshold(x: np.ndarray, method: str) -> float:
    if x.min() == x.max():
        return math.inf
    return float(filters.threshold_li(x) if method == "li" else filters.threshold_otsu(x))


def _foreground(x: np.ndarray, params: NucleusParams) -> np.ndarray:
    if params.threshold == "local":
        otsu = _global_threshold(x, "otsu")
        mask = (x > filters.threshold_local(x, params.block_size, method="gaussian")) & (
            x > otsu * params.threshold_scale
        )
    else:
        mask = x > _global_threshold(x, params.threshold) * params.threshold_scale
    if params.fill_holes:
        mask = ndi.binary_fill_holes(mask)
    return mask


def _split_touching(smoothed: np.ndarray, mask: np.ndarray, params: NucleusParams) -> np.ndarray:
    """Watershed of the mask from seeds on its smoothed distance transform."""
    components, n = ndi.label(mask)
    distance = ndi.distance_transform_edt(mask).astype(np.float32)
    if params.distance_sigma > 0:
        distance = ndi.gaussian_filter(distance, params.distance_sigma)
    if params.seeds == "hmaxima":
        markers = _hmaxima_seeds(distance, components, params.h)
    else:
        markers = _peak_seeds(distance, components, n, params)
    # A component left without a seed (all of it lower than h) still becomes one object.
    unseeded = np.setdiff1d(np.unique(components[mask]), np.unique(components[markers > 0]))
    markers = _add_missing_seeds(markers, components, unseeded)
    landscape = -distance / max(float(distance.max()), 1e-6)
    if params.intensity_weight > 0:
        top = float(np.percentile(smoothed[mask], 99)) or 1.0
        intensity = np.clip(smoothed / top, 0.0, 1.0)
        landscape = (1.0 - params.intensity_weight) * landscape - params.intensity_weight * intensity
    return segmentation.watershed(landscape, markers=markers, mask=mask, compactness=params.compactness)


def _hmaxima_seeds(distance: np.ndarray, components: np.ndarray, h: float) -> np.ndarray:
    """Label the h-maxima of each component's distance transform, one crop at a time."""
    markers = np.zeros(components.shape, np.int32)
    count = 0
    for index, box in enumerate(ndi.find_objects(components), start=1):
        if box is None:
            continue
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        inside = components[box] == index
        peaks = morphology.h_maxima(np.where(inside, distance[box], 0.0), h).astype(bool) & inside
        local, k = ndi.label(peaks, structure=np.ones((3, 3)))
        markers[box][local > 0] = local[local > 0] + count
        count += k
    return markers


def _peak_seeds(distance: np.ndarray, components: np.ndarray, n: int, params: NucleusParams) -> np.ndarray:
    """Label local maxima of the distance transform at least ``min_distance`` apart."""
    min_distance = params.min_distance
    if min_distance is None:
        areas = np.bincount(components.ravel())[1:]
        radius = math.sqrt(float(np.median(areas)) / math.pi) if n else 1.0
        min_distance = max(1.0, params.min_distance_factor * radius)
    peaks = feature.peak_local_max(distance, min_distance=int(round(min_distance)), labels=components,
                                   exclude_border=False)
    markers = np.zeros(components.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return markers


def _add_missing_seeds(markers: np.ndarray, components: np.ndarray, unseeded: np.ndarray) -> np.ndarray:
    """Give every component without a seed one seed: the whole component."""
    if unseeded.size == 0:
        return markers
    next_id = int(markers.max(initial=0)) + 1
    lookup = np.zeros(int(components.max()) + 1, np.int32)
    lookup[unseeded] = np.arange(next_id, next_id + unseeded.size)
    filled = lookup[components]
    return np.where(filled > 0, filled, markers)


def _drop_by_area(labels: np.ndarray, min_area: int, max_area: int | None) -> np.ndarray:
    areas = np.bincount(labels.ravel())
    drop = areas < min_area
    if max_area is not None:
        drop |= areas > max_area
    drop[0] = False
    if not drop.any():
        return labels
    return np.where(drop[labels], 0, labels)


def _plane(image: np.ndarray, channel: int) -> np.ndarray:
    """The 2-D plane of ``channel`` from an ``(H, W)`` or ``(C, H, W)`` image."""
    image = np.asarray(image)
    if image.ndim == 2:
        if channel not in (0, -1):
            raise SegmentationError(
                f"channel {channel} is out of range for a single-channel (H, W) image; valid: 0"
            )
        plane = image
    elif image.ndim == 3:
        n = image.shape[0]
        if not -n <= channel < n:
            raise SegmentationError(
                f"channel {channel} is out of range for an image of {n} channel(s) {image.shape}; "
                f"valid: 0 to {n - 1}"
            )
        plane = image[channel]
    else:
        raise SegmentationError(
            f"image has shape {image.shape}; valid: (H, W) or (C, H, W)"
        )
    if not (np.issubdtype(plane.dtype, np.integer) or np.issubdtype(plane.dtype, np.floating)):
        raise SegmentationError(f"image dtype {plane.dtype} is not numeric; valid: integer or float")
    if min(plane.shape) < 2:
        raise SegmentationError(f"image plane has shape {plane.shape}; valid: at least 2 x 2 pixels")
    if np.issubdtype(plane.dtype, np.floating) and not np.isfinite(plane).all():
        raise SegmentationError("image holds NaN or infinite values; valid: finite values only")
    return plane


# --------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------


@runtime_checkable
class Backend(Protocol):
    """Turns one field into a nucleus label image."""

    name: str

    def segment(self, image: np.ndarray, source: str | os.PathLike[str] | None = None) -> np.ndarray:
        """Label the nuclei of ``image`` (``(H, W)`` or ``(C, H, W)``); ``source`` is its file."""
        ...


class SkimageBackend:
    """The default: :func:`segment_nuclei` (scikit-image, no weights, no download).

    Args:
        params: Settings (default: the tuned :class:`NucleusParams`).
        channel: Index of the nuclear channel.
    """

    name = "skimage"

    def __init__(self, params: NucleusParams | None = None, channel: int = 0) -> None:
        self.params = params or NucleusParams()
        self.channel = channel

    def segment(self, image: np.ndarray, source: str | os.PathLike[str] | None = None) -> np.ndarray:
        """Label the nuclei of ``image``."""
        return segment_nuclei(image, self.channel, self.params)


class CellposeBackend:
    """Cellpose on a model file the user has on disk (``pip install 'cellclass[cellpose]'``).

    Args:
        weights: Path of a Cellpose model file; it must exist (nothing is downloaded).
        channel: Index of the nuclear channel.
        diameter: Expected nucleus diameter in pixels (None: the model's own).
        gpu: Run on a GPU where Cellpose finds one.

    Raises:
        ModelError: If ``weights`` is not an existing file.
        MissingDependencyError: If ``cellpose`` is not installed.
    """

    name = "cellpose"

    def __init__(self, weights: str | os.PathLike[str], channel: int = 0, diameter: float | None = None,
                 gpu: bool = False) -> None:
        self.weights = _existing(weights, "Cellpose model file", directory=False)
        self.channel = channel
        self.diameter = diameter
        models = _import_optional("cellpose.models", "cellpose")
        logger.info("loading Cellpose model %s", self.weights)
        self._model = models.CellposeModel(gpu=gpu, pretrained_model=str(self.weights))

    def segment(self, image: np.ndarray, source: str | os.PathLike[str] | None = None) -> np.ndarray:
        """Label the nuclei of ``image`` with the Cellpose model."""
        plane = _plane(image, self.channel).astype(np.float32)
        result = self._model.eval(plane, diameter=self.diameter)
        return relabel(np.asarray(result[0]))


class StarDistBackend:
    """StarDist 2D on a model folder the user has on disk (``pip install 'cellclass[stardist]'``).

    Args:
        weights: A StarDist model folder (holding ``config.json`` and the weights); it must
            exist (nothing is downloaded).
        channel: Index of the nuclear channel.
        percentiles: Intensity percentiles mapped to 0 and 1 before prediction, as
            StarDist's examples normalise.

    Raises:
        ModelError: If ``weights`` is not a folder holding ``config.json``.
        MissingDependencyError: If ``stardist`` is not installed.
    """

    name = "stardist"

    def __init__(self, weights: str | os.PathLike[str], channel: int = 0,
                 percentiles: tuple[float, float] = (1.0, 99.8)) -> None:
        self.weights = _existing(weights, "StarDist model folder", directory=True)
        config = self.weights / "config.json"
        if not config.is_file():
            raise ModelError(
                f"StarDist model folder {str(self.weights)!r} has no config.json; valid: a folder "
                f"saved by StarDist2D (config.json and weights_best.h5)"
            )
        self.channel = channel
        self.percentiles = percentiles
        models = _import_optional("stardist.models", "stardist")
        logger.info("loading StarDist model %s", self.weights)
        self._model = models.StarDist2D(None, name=self.weights.name, basedir=str(self.weights.parent))

    def segment(self, image: np.ndarray, source: str | os.PathLike[str] | None = None) -> np.ndarray:
        """Label the nuclei of ``image`` with the StarDist model."""
        plane = _plane(image, self.channel).astype(np.float32)
        low, high = np.percentile(plane, self.percentiles)
        normalized = (plane - low) / max(float(high - low), 1e-6)
        labels, _ = self._model.predict_instances(normalized)
        return relabel(np.asarray(labels))


class MaskFileBackend:
    """Masks the user already has: one label image per field, found by a file name pattern.

    The pattern is a :meth:`str.format` pattern over the field's file: ``{stem}`` (name
    without extension), ``{name}``, ``{suffix}`` and ``{parent}`` (its folder). A relative
    result is taken from ``root`` (default: the field's folder). For BBBC039's layout
    (``images/X.tif`` and ``masks/X.tif``) that is ``"../masks/{stem}.tif"``.

    Args:
        pattern: The mask file name pattern.
        root: Folder that relative mask paths start from (None: the field's folder).
    """

    name = "masks"

    def __init__(self, pattern: str, root: str | os.PathLike[str] | None = None) -> None:
        self.pattern = pattern
        self.root = None if root is None else Path(root)
        # Fail on a malformed pattern now, not at the first field.
        self.mask_path("field.tif")

    def mask_path(self, source: str | os.PathLike[str]) -> Path:
        """The mask file of the field at ``source``.

        Raises:
            SegmentationError: If the pattern is malformed or names an unknown field.
        """
        source = Path(source)
        values = {"stem": source.stem, "name": source.name, "suffix": source.suffix, "parent": str(source.parent)}
        try:
            (formatted,) = expand_pattern(self.pattern, values, ["0"])
        except CellclassError as exc:
            raise SegmentationError(
                f"mask pattern {self.pattern!r} is invalid: {exc}; valid placeholders: "
                f"{{stem}}, {{name}}, {{suffix}}, {{parent}}"
            ) from exc
        path = Path(formatted)
        if not path.is_absolute():
            path = (self.root if self.root is not None else source.parent) / path
        return path

    def segment(self, image: np.ndarray, source: str | os.PathLike[str] | None = None) -> np.ndarray:
        """Read the mask of the field at ``source``, checked against ``image``.

        Raises:
            SegmentationError: Without ``source``, if the mask file is missing, is not a
                single-channel integer image, or differs in size from the field.
        """
        if source is None:
            raise SegmentationError("the masks backend needs each field's file path (source=...) to find its mask")
        path = self.mask_path(source)
        if not path.is_file():
            raise SegmentationError(
                f"mask file {str(path)!r} for field {str(source)!r} does not exist; valid: an "
                f"existing label image named by the pattern {self.pattern!r}"
            )
        try:
            mask = read_image(path)
        except CellclassError as exc:
            raise SegmentationError(f"cannot read mask file {str(path)!r}: {exc}") from exc
        if mask.shape[0] != 1 or not np.issubdtype(mask.dtype, np.integer):
            raise SegmentationError(
                f"mask file {str(path)!r} holds {mask.shape[0]} channel(s) of {mask.dtype}; valid: "
                f"one channel of integer labels (0 background)"
            )
        expected = np.asarray(image).shape[-2:]
        if mask.shape[1:] != expected:
            raise SegmentationError(
                f"mask file {str(path)!r} is {mask.shape[1]} x {mask.shape[2]} pixels but its field is "
                f"{expected[0]} x {expected[1]}; valid: a mask of the field's size"
            )
        if (mask < 0).any():
            raise SegmentationError(f"mask file {str(path)!r} holds negative labels; valid: 0 and above")
        return relabel(mask[0])


BACKENDS: dict[str, Callable[..., Backend]] = {
    "skimage": SkimageBackend,
    "cellpose": CellposeBackend,
    "stardist": StarDistBackend,
    "masks": MaskFileBackend,
}
"""Backend names for :func:`make_backend`."""


def make_backend(name: str, **kwargs: Any) -> Backend:
    """Build a segmentation backend by name.

    Args:
        name: One of :data:`BACKENDS`.
        **kwargs: The backend's arguments (``weights=`` for cellpose and stardist,
            ``pattern=`` for masks, ``params=`` and ``channel=`` for skimage).

    Raises:
        SegmentationError: On an unknown name or arguments the backend does not take.
        ModelError: If a weights path does not exist.
        MissingDependencyError: If the backend's package is not installed.
    """
    if name not in BACKENDS:
        raise SegmentationError(
            f"segmentation backend {name!r} is unknown; valid: {', '.join(BACKENDS)}"
        )
    try:
        return BACKENDS[name](**kwargs)
    except TypeError as exc:
        raise SegmentationError(f"backend {name!r} cannot take arguments {sorted(kwargs)}: {exc}") from exc


# --------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------


def _existing(path: str | os.PathLike[str], what: str, *, directory: bool) -> Path:
    path = Path(path).expanduser()
    ok = path.is_dir() if directory else path.is_file()
    if not ok:
        kind = "folder" if directory else "file"
        raise ModelError(
            f"{what} {str(path)!r} does not exist; valid: an existing {kind} on disk "
            f"(cellclass never downloads weights)"
        )
    return path


def _import_optional(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"the {extra} backend needs the package {extra!r}, which is not installed ({exc}); "
            f"install it with: pip install 'cellclass[{extra}]'"
        ) from exc


def _from_dict(cls: type, values: dict[str, Any]) -> Any:
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise SegmentationError(
            f"unknown {cls.__name__} setting(s) {', '.join(unknown)}; valid: {', '.join(known)}"
        )
    return cls(**values)


def _check_choice(name: str, value: object, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise SegmentationError(f"{name} {value!r} is invalid; valid: {', '.join(valid)}")


def _check_number(name: str, value: object, *, low: float, high: float | None = None,
                  low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"> {low}" if low_open else f">= {low}"
        if high is not None:
            bound += f" and <= {high}"
        raise SegmentationError(f"{name} must be a number {bound}; got {value!r}")
