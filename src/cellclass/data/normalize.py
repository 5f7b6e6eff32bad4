"""Intensity normalization: the one step that turns an image's own units into model input.

Images stay in their file's dtype, ``(C, H, W)``, until here. A :class:`Normalizer` maps,
per channel, a low percentile to 0 and a high percentile to 1, computed in ``float32``
straight from the raw values (a uint16 pixel of 40000 is 40000.0, never squeezed through
8 bits). The percentiles come from:

* ``percentile`` (default): a sample of pixels of the *training* images, per channel;
* ``group``: the same, per group (plate) and channel, so plate-to-plate staining
  differences are divided out, with the global statistics for groups unseen in training;
* ``image``: each image's own percentiles (nothing to fit);
* ``none``: no scaling, only the conversion to ``float32``.

Fitted statistics are saved with :meth:`Normalizer.to_dict` inside every checkpoint, so
prediction normalizes exactly as training did. A :class:`NormalizedView` normalizes the
rows of an image array (in memory or a prepared cache) as they are read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellclass.errors import ConfigError, NormalizationError

log = logging.getLogger(__name__)

MODES = ("percentile", "image", "group", "none")
"""Valid :attr:`Normalizer.mode` values."""


@dataclass
class Normalizer:
    """Per-channel percentile normalization to ``float32``.

    After :meth:`transform`, a channel's ``low`` percentile is 0 and its ``high``
    percentile is 1. With ``clip``, values are then limited to ``clip_range``: the
    default ``(-0.5, 1.5)`` keeps headroom so structures brighter than the high
    percentile stay distinct, while a hot pixel a hundred times brighter cannot dominate.

    Attributes:
        mode: ``percentile``, ``image``, ``group`` or ``none``.
        low: Percentile mapped to 0, in ``[0, 100)``.
        high: Percentile mapped to 1, in ``(low, 100]``.
        clip: Limit the output to ``clip_range`` (not applied with ``none``).
        clip_range: ``(min, max)`` of the output when clipping.

    Fitted attributes (set by :meth:`fit` or :meth:`from_dict`): ``n_channels_``,
    ``low_values_`` and ``high_values_`` (``(C,)``), and ``group_values_`` (group →
    ``(low_values, high_values)``) in ``group`` mode.
    """

    mode: str = "percentile"
    low: float = 1.0
    high: float = 99.8
    clip: bool = True
    clip_range: tuple[float, float] = (-0.5, 1.5)
    n_channels_: int | None = field(default=None, init=False, repr=False, compare=False)
    low_values_: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    high_values_: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)
    group_values_: dict[str, tuple[np.ndarray, np.ndarray]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(
                f"normalization mode {self.mode!r} is invalid; valid: {', '.join(MODES)}"
            )
        if not 0.0 <= self.low < self.high <= 100.0:
            raise ConfigError(
                f"percentiles must satisfy 0 <= low < high <= 100; got low={self.low}, "
                f"high={self.high}"
            )
        self.clip_range = tuple(float(v) for v in self.clip_range)
        if len(self.clip_range) != 2 or self.clip_range[0] >= self.clip_range[1]:
            raise ConfigError(f"clip_range must be (min, max) with min < max; got {self.clip_range}")
        self._unseen_logged: set[str] = set()

    @property
    def needs_fit(self) -> bool:
        """Whether :meth:`transform` needs statistics from :meth:`fit`."""
        return self.mode in ("percentile", "group")

    @property
    def is_fitted(self) -> bool:
        """Whether statistics are available (always true for modes that need none)."""
        return not self.needs_fit or self.low_values_ is not None

    # -- fitting ----------------------------------------------------------------------
    def fit(
        self,
        images: Iterable[np.ndarray],
        groups: Sequence[str] | None = None,
        max_pixels_per_image: int = 4096,
        seed: int = 0,
        max_pixels: int = 2_000_000,
    ) -> Normalizer:
        """Estimate per-channel percentiles from a pixel sample of the training images.

        Every image contributes the same number of randomly chosen pixel positions
        (all of its pixels when it has fewer), read in every channel. When the sample
        would exceed ``max_pixels`` positions, it is halved, as is the share of every
        later image, so memory stays bounded and every image keeps an equal weight.
        ``image`` and ``none`` modes need no fit and return at once.

        Args:
            images: Training images, each ``(C, H, W)`` of any dtype, all with one C.
            groups: Group (plate) of every image; required by ``group`` mode.
            max_pixels_per_image: Pixel positions sampled per image at most.
            seed: Seed of the pixel sampling.
            max_pixels: Bound on the pixel positions kept over all images.

        Returns:
            ``self``, fitted.

        Raises:
            NormalizationError: When there is no image, an image is not ``(C, H, W)``, channel
                counts differ, or ``group`` mode lacks (enough) groups.
        """
        if not self.needs_fit:
            return self
        self._check_fit_arguments(images, groups, max_pixels_per_image, max_pixels)
        sample = _PixelSample(np.random.default_rng(seed), max_pixels_per_image, max_pixels)
        for i, image in enumerate(images):
            image = _as_chw(image, f"training image {i}")
            if sample.n_channels is not None and image.shape[0] != sample.n_channels:
                raise NormalizationError(
                    f"training image {i} has {image.shape[0]} channels; the images before "
                    f"it have {sample.n_channels}"
                )
            sample.add(image, self._group_of(groups, i))
        if sample.n_images == 0:
            raise NormalizationError("Normalizer.fit got no image; pass the training images")
        if self.mode == "group" and len(groups) != sample.n_images:
            raise NormalizationError(
                f"got {len(groups)} groups for {sample.n_images} images; give one group per image"
            )

        self.n_channels_ = sample.n_channels
        self.low_values_, self.high_values_ = self._percentiles(
            np.concatenate([b for _, b in sample.blocks])
        )
        self.group_values_ = {}
        if self.mode == "group":
            for group in sorted({g for g, _ in sample.blocks}):
                pixels = np.concatenate([b for g, b in sample.blocks if g == group])
                self.group_values_[group] = self._percentiles(pixels)
        self._unseen_logged = set()
        flat_channels = np.flatnonzero(self.high_values_ <= self.low_values_)
        if len(flat_channels):
            log.warning(
                "channel(s) %s have equal low and high percentiles (%s); they are only offset",
                flat_channels.tolist(), self.low_values_[flat_channels].tolist(),
            )
        log.info(
            "normalizer fitted on %d images (%d pixel positions): low %s, high %s",
            sample.n_images, sample.kept, self.low_values_.tolist(), self.high_values_.tolist(),
        )
        return self

    def _check_fit_arguments(self, images: Iterable[np.ndarray], groups: Sequence[str] | None,
                             max_pixels_per_image: int, max_pixels: int) -> None:
        """The checks :meth:`fit` can make before it reads an image."""
        if self.mode == "group" and groups is None:
            raise NormalizationError(
                "normalization mode 'group' needs the group of every training image (groups=...)"
            )
        if max_pixels_per_image < 1 or max_pixels < 1:
            raise NormalizationError(
                f"max_pixels_per_image and max_pixels must be >= 1; got "
                f"{max_pixels_per_image}, {max_pixels}"
            )
        if self.mode == "group" and hasattr(images, "__len__") and len(images) != len(groups):
            raise NormalizationError(
                f"got {len(groups)} groups for {len(images)} images; give one group per image"
            )

    def _group_of(self, groups: Sequence[str] | None, i: int) -> str | None:
        """The group of training image ``i`` in ``group`` mode (``None`` in the others)."""
        if self.mode != "group":
            return None
        if i >= len(groups):
            raise NormalizationError(
                f"got {len(groups)} groups for more images; give one group per image"
            )
        return str(groups[i])

    def _percentiles(self, sample: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = np.percentile(sample, [self.low, self.high], axis=0)
        return lo.astype(np.float64), hi.astype(np.float64)

    # -- transforming -----------------------------------------------------------------
    def transform(self, image: np.ndarray, group: str | None = None) -> np.ndarray:
        """Normalize one image.

        Args:
            image: ``(C, H, W)`` of any dtype.
            group: The image's group; used in ``group`` mode (unseen or ``None`` → the
                global statistics).

        Returns:
            ``float32`` array of shape ``(C, H, W)``.

        Raises:
            NormalizationError: When the image is not ``(C, H, W)``, its channel count differs
                from the fitted one, or the normalizer needs a fit it did not get.
        """
        image = _as_chw(image, "image")
        out = self.transform_batch(image[None], None if group is None else [group])
        return out[0]

    def transform_batch(
        self, images: np.ndarray, groups: Sequence[str | None] | None = None
    ) -> np.ndarray:
        """Normalize a batch ``(N, C, H, W)`` at once; returns ``float32 (N, C, H, W)``.

        Raises:
            NormalizationError: As :meth:`transform`, and when ``groups`` does not give one group
                per image.
        """
        images = np.asarray(images)
        if images.ndim != 4:
            raise NormalizationError(f"transform_batch expects shape (N, C, H, W); got {images.shape}")
        n, c = images.shape[:2]
        self._check_ready(c)
        x = images.astype(np.float32)
        if self.mode == "none":
            return x
        if self.mode == "image":
            lo, hi = np.percentile(x.reshape(n, c, -1), [self.low, self.high], axis=2)
        elif self.mode == "group":
            if groups is not None and len(groups) != n:
                raise NormalizationError(f"got {len(groups)} groups for {n} images; give one per image")
            pairs = [self._group_stats(g) for g in (groups if groups is not None else [None] * n)]
            lo = np.stack([p[0] for p in pairs])
            hi = np.stack([p[1] for p in pairs])
        else:
            lo = np.broadcast_to(self.low_values_, (n, c))
            hi = np.broadcast_to(self.high_values_, (n, c))
        span = np.where(hi > lo, hi - lo, 1.0)
        x -= lo.astype(np.float32)[:, :, None, None]
        x /= span.astype(np.float32)[:, :, None, None]
        if self.clip:
            np.clip(x, self.clip_range[0], self.clip_range[1], out=x)
        return x

    def _group_stats(self, group: str | None) -> tuple[np.ndarray, np.ndarray]:
        key = None if group is None else str(group)
        if key in self.group_values_:
            return self.group_values_[key]
        if key not in self._unseen_logged:
            self._unseen_logged.add(key)
            log.info("group %r was not in the training images; using the global statistics", key)
        return self.low_values_, self.high_values_

    def _check_ready(self, n_channels: int) -> None:
        if not self.is_fitted:
            raise NormalizationError(
                f"Normalizer(mode={self.mode!r}) is not fitted: call fit() on the training "
                "images, or load saved statistics with Normalizer.from_dict()"
            )
        if self.n_channels_ is not None and n_channels != self.n_channels_:
            raise NormalizationError(
                f"image has {n_channels} channel(s) but the normalizer was fitted on "
                f"{self.n_channels_}"
            )

    # -- persistence ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form holding the parameters and fitted statistics."""
        return {
            "mode": self.mode,
            "low": float(self.low),
            "high": float(self.high),
            "clip": bool(self.clip),
            "clip_range": list(self.clip_range),
            "n_channels": self.n_channels_,
            "low_values": _as_list(self.low_values_),
            "high_values": _as_list(self.high_values_),
            "groups": {
                g: {"low_values": _as_list(lo), "high_values": _as_list(hi)}
                for g, (lo, hi) in self.group_values_.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Normalizer:
        """Rebuild a normalizer saved with :meth:`to_dict`.

        Raises:
            ConfigError: On an unknown key or invalid parameters.
        """
        valid = ("mode", "low", "high", "clip", "clip_range", "n_channels", "low_values",
                 "high_values", "groups")
        unknown = sorted(set(data) - set(valid))
        if unknown:
            raise ConfigError(f"unknown normalizer key(s) {unknown}; valid: {', '.join(valid)}")
        params = {k: data[k] for k in ("mode", "low", "high", "clip", "clip_range") if k in data}
        norm = cls(**params)
        norm.n_channels_ = data.get("n_channels")
        norm.low_values_ = _as_array(data.get("low_values"))
        norm.high_values_ = _as_array(data.get("high_values"))
        norm.group_values_ = {
            str(g): (_as_array(v["low_values"]), _as_array(v["high_values"]))
            for g, v in (data.get("groups") or {}).items()
        }
        return norm


def checked_rows(index: np.ndarray, n: int) -> np.ndarray:
    """Integer row indices into ``n`` images, negatives counted from the end, as
    ``np.arange(n)[index]`` gives them, without building that range.

    Raises:
        IndexError: When an index is outside ``-n .. n - 1``.
    """
    rows = np.where(index < 0, index + n, index)
    if rows.size and (rows.min() < 0 or rows.max() >= n):
        raise IndexError(f"row index out of range for {n} images: rows must be indices into {n} images; "
                         f"got {index!r}")
    return rows


class NormalizedView:
    """An image array whose rows are normalized when read, so memory stays with the source.

    The source may be an in-memory array or a memory-mapped cache; indexing with an int
    array returns a float32 ``(n, C, H, W)`` batch normalized with ``normalizer``.
    """

    def __init__(self, images: np.ndarray, normalizer: Any, groups: np.ndarray | None = None) -> None:
        self.images = images
        self.normalizer = normalizer
        self.groups = groups

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the underlying array."""
        return tuple(self.images.shape)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: Any) -> np.ndarray:
        if isinstance(index, np.ndarray) and index.dtype.kind in "iu":
            rows = checked_rows(index, len(self.images))
        else:
            rows = np.atleast_1d(np.arange(len(self.images))[index])
        order = np.argsort(rows, kind="stable")
        batch = np.asarray(self.images[rows[order]])
        groups = None if self.groups is None else self.groups[rows[order]]
        out = np.empty((len(rows), *batch.shape[1:]), dtype=np.float32)
        out[order] = self.normalizer.transform_batch(batch, groups=groups)
        return out

    @property
    def nbytes(self) -> int:
        """Size of every row normalized (float32), in bytes."""
        return int(np.prod(self.shape)) * 4

    def materialize(self, chunk: int = 256) -> np.ndarray:
        """Every row normalized, as one in-memory float32 array (read ``chunk`` rows at a time)."""
        out = np.empty(self.shape, dtype=np.float32)
        for start in range(0, len(self), chunk):
            out[start : start + chunk] = self[np.arange(start, min(len(self), start + chunk))]
        return out

    def rows(self, rows: np.ndarray) -> NormalizedRows:
        """Some of its rows, indexable (by slices or positions) as an array of their own, read when indexed."""
        return NormalizedRows(self, np.asarray(rows, dtype=np.int64))


class NormalizedRows:
    """Rows of a :class:`NormalizedView`, indexable as an array of their own (see :meth:`NormalizedView.rows`)."""

    def __init__(self, view: NormalizedView, rows: np.ndarray) -> None:
        self.view, self.rows = view, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.view[self.rows[index]]


class _PixelSample:
    """Pixel positions sampled from a stream of images, each image with an equal share.

    An image gives ``per_image`` random positions (all of its pixels when it has fewer),
    read in every channel. When the sample would exceed ``max_pixels`` positions, it is
    halved, as is the share of every later image.
    """

    def __init__(self, rng: np.random.Generator, per_image: int, max_pixels: int) -> None:
        self.rng, self.per_image, self.max_pixels = rng, per_image, max_pixels
        self.blocks: list[tuple[str | None, np.ndarray]] = []
        """(group, ``(positions, C)`` float32 values) of every image."""
        self.kept = 0
        self.n_channels: int | None = None
        self.n_images = 0

    def add(self, image: np.ndarray, group: str | None) -> None:
        """Sample a ``(C, H, W)`` image (of the sample's channel count)."""
        self.n_channels = image.shape[0]
        flat = image.reshape(self.n_channels, -1)
        if flat.shape[1] > self.per_image:
            flat = flat[:, self.rng.integers(flat.shape[1], size=self.per_image)]
        block = flat.T.astype(np.float32)
        self.blocks.append((group, block))
        self.kept += len(block)
        self.n_images += 1
        while self.kept > self.max_pixels and self.per_image > 1:
            self.per_image //= 2
            self.blocks = [
                (g, b[self.rng.permutation(len(b))[: max(1, len(b) // 2)]]) for g, b in self.blocks
            ]
            self.kept = sum(len(b) for _, b in self.blocks)


def _as_chw(image: np.ndarray, what: str) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3:
        raise NormalizationError(f"{what} must have shape (C, H, W); got shape {image.shape}")
    return image


def _as_list(values: np.ndarray | None) -> list[float] | None:
    return None if values is None else [float(v) for v in values]


def _as_array(values: Sequence[float] | None) -> np.ndarray | None:
    return None if values is None else np.asarray(values, dtype=np.float64)
