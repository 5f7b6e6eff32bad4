"""How the dimensions a file declares become one ``(C, H, W)`` image.

Microscopy files hold more axes than channels: ImageJ hyperstacks declare ``channels``,
``slices`` (Z) and ``frames`` (T); OME-TIFF declares ``SizeC``, ``SizeZ``, ``SizeT`` and
one image per position (a *series*); tifffile's own metadata may name its axes. Only the
channel axis (``C``, and the samples ``S`` of an RGB page) becomes channels, in the order
the file declares. What to do with Z, T and several series is the dataset's choice, an
:class:`AxesPolicy` (``--z``, ``--t``, ``--series`` on the command line; ``z``, ``t``,
``series`` in a spec's image section). A file with Z > 1, T > 1 or several series and no
such choice raises :class:`~cellclass.errors.StackError`; an axis of size 1 needs none.

Projections and the dtype they give (``N`` is a 0-based index):

========== ====================================================================
``max``    the maximum over the axis (the file's dtype)
``min``    the minimum (the file's dtype)
``middle`` the middle plane, index ``size // 2`` (the file's dtype)
``N``      plane ``N`` (the file's dtype)
``mean``   the mean, float32 (float64 for float64 files)
``sum``    the sum: uint32 / int32 for 8- and 16-bit integers (64-bit where a 32-bit
           sum could overflow), float32 for float16/float32, float64 for float64
========== ====================================================================

With both, T is reduced first, then Z: ``--t 0 --z max`` is the maximum projection of
the first time point.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cellclass.errors import ImageReadError, SpecError, StackError

__all__ = [
    "PROJECTIONS",
    "AxesPolicy",
    "ImageAxes",
    "check_axes",
    "choose_series",
    "parse_reduction",
    "select_channels_by_name",
    "to_chw",
]

PROJECTIONS: tuple[str, ...] = ("max", "mean", "sum", "min", "middle")
"""Reductions of a Z or T axis other than a plane index."""

CHOICES = "max|mean|sum|min|middle|N"
"""The values ``--z`` and ``--t`` take, as shown in messages."""

# The axes a (C, H, W) image is built from, in the order they are reduced and merged.
_CANONICAL = "TZCSYX"
_AXIS_NAMES = {
    "T": "time", "Z": "depth", "C": "channel", "S": "sample", "Y": "height", "X": "width",
    "I": "page sequence", "Q": "unnamed", "A": "angle", "P": "phase", "R": "tile", "H": "lifetime",
    "E": "wavelength", "L": "exposure", "V": "event", "M": "mosaic",
}  # fmt: skip


def parse_reduction(axis: str, value: Any) -> str | int | None:
    """Parse a ``--z`` / ``--t`` value: a projection name or a 0-based plane index.

    Args:
        axis: ``z`` or ``t``, for the message.
        value: ``None``, a name of :data:`PROJECTIONS` (any case), an integer or its text.

    Raises:
        SpecError: When the value is neither; the message lists the valid ones.
    """
    if value is None:
        return None
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if value >= 0:
            return int(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in PROJECTIONS:
            return text
        if text.isdigit():
            return int(text)
    raise SpecError(
        f"--{axis} {value!r} is invalid; valid: {', '.join(PROJECTIONS)} or a 0-based plane "
        f"index N (0, 1, ...)"
    )


@dataclass(frozen=True)
class AxesPolicy:
    """What to do with a file's axes beyond channels, and which channels to keep.

    Attributes:
        z: Reduction of a Z axis of size > 1 (see :data:`PROJECTIONS`) or a plane index;
            None refuses Z stacks.
        t: The same for a T (time) axis.
        series: Which series (OME image, position) of a file holding several; None
            refuses such files.
        select: Channel names to keep, in this order: the file's declared channel names
            (OME ``Channel Name``), else :attr:`names`. None keeps every channel.
        names: Names of a file's channels, in order, for files that declare none (the
            spec's ``image.channels``); only :attr:`select` uses them.
    """

    z: str | int | None = None
    t: str | int | None = None
    series: int | None = None
    select: tuple[str, ...] | None = None
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "z", parse_reduction("z", self.z))
        object.__setattr__(self, "t", parse_reduction("t", self.t))
        if self.series is not None:
            series = self.series
            if isinstance(series, str) and series.strip().isdigit():
                series = int(series)
            if isinstance(series, bool) or not isinstance(series, (int, np.integer)) or series < 0:
                raise SpecError(f"--series {self.series!r} is invalid; valid: a 0-based series index N")
            object.__setattr__(self, "series", int(series))
        if self.select is not None:
            select = (self.select,) if isinstance(self.select, str) else tuple(map(str, self.select))
            duplicated = sorted({n for n in select if select.count(n) > 1})
            if not select or duplicated:
                raise SpecError(
                    f"channel selection {list(select)!r} is invalid; valid: one or more distinct "
                    f"channel names"
                )
            object.__setattr__(self, "select", select)
        if self.names is not None:
            object.__setattr__(self, "names", tuple(map(str, self.names)))

    @property
    def declared(self) -> bool:
        """Whether anything beyond the defaults is set."""
        return any(v is not None for v in (self.z, self.t, self.series, self.select))

    def to_dict(self) -> dict[str, Any]:
        """The settings that change the pixels read (for cache keys and run records)."""
        out: dict[str, Any] = {k: getattr(self, k) for k in ("z", "t", "series") if getattr(self, k) is not None}
        if self.select is not None:
            out["select"] = list(self.select)
            out["names"] = None if self.names is None else list(self.names)
        return out

    def options(self) -> str:
        """The command-line options that give this policy, e.g. ``--z max --t 0``."""
        parts = [f"--{k} {getattr(self, k)}" for k in ("z", "t", "series") if getattr(self, k) is not None]
        return " ".join(parts)


@dataclass(frozen=True)
class ImageAxes:
    """What one image file declares about its dimensions (see :func:`cellclass.data.io.describe_image`).

    Attributes:
        path: The file.
        source: Where the axes come from: ``ImageJ``, ``OME``, ``tifffile``, or for files
            that declare none ``TIFF``, ``PNG``, ``JPEG``, ``NPY``.
        axes: Axis letters of the first series, e.g. ``ZCYX`` (``I``: pages that declare
            no axis).
        shape: Its sizes, one per letter.
        dtype: Pixel dtype.
        declared: Whether the file declares its axes (ImageJ, OME, tifffile metadata).
        channel_names: Declared channel names of the first series (OME), else empty.
        series: ``(axes, shape)`` of every series (OME images, positions).
        levels: Resolution levels of the first series (1 unless a pyramid); only the
            full resolution is read.
    """

    path: str
    source: str
    axes: str
    shape: tuple[int, ...]
    dtype: str
    declared: bool
    channel_names: tuple[str, ...] = ()
    series: tuple[tuple[str, tuple[int, ...]], ...] = field(default=())
    levels: int = 1

    @property
    def sizes(self) -> dict[str, int]:
        """Size of each axis of the first series."""
        return dict(zip(self.axes, self.shape, strict=True))

    def note(self, policy: AxesPolicy | None = None) -> str:
        """One line for ``inspect``: the axes, how they are read, and what is still needed."""
        sizes = _sizes_text(self.axes, self.shape)
        if not self.declared:
            pages = self.sizes.get("I", 1)
            if pages > 1:
                return f"{pages} pages read as channels: the file declares no axes"
            channels = self.sizes.get("C", 1) * self.sizes.get("S", 1)
            return f"{self.source} {sizes}: {channels} channel(s)"
        parts = [f"{self.source} axes {self.axes} ({sizes})"]
        if len(self.series) > 1:
            parts.append(f"{len(self.series)} series (positions)")
        if self.levels > 1:
            parts.append(f"a pyramid of {self.levels} levels (the full resolution is read)")
        if self.channel_names:
            parts.append("channels " + ", ".join(self.channel_names))
        policy = policy or AxesPolicy()
        needed = _unresolved(self.sizes, policy, len(self.series))
        if needed:
            parts.append("not read without " + " and ".join(needed))
        else:
            chosen = [f"--{a.lower()} {getattr(policy, a.lower())}" for a in "ZT"
                      if self.sizes.get(a, 1) > 1]
            if len(self.series) > 1:
                chosen.append(f"--series {policy.series}")
            channels = self.sizes.get("C", 1) * self.sizes.get("S", 1)
            parts.append(f"read as {channels} channel(s)" + (f" with {' '.join(chosen)}" if chosen else ""))
        return "; ".join(parts)


def choose_series(
    shapes: Sequence[tuple[str, tuple[int, ...]]], policy: AxesPolicy, name: str, source: str
) -> int:
    """The index of the series to read of a file holding ``shapes`` (axes, shape per series).

    A file with one series is read whatever ``policy.series`` says.

    Raises:
        StackError: When the file holds several series and the policy names none, or an
            index out of range.
    """
    if len(shapes) <= 1:
        return 0
    listing = "; ".join(f"{i}: {axes} {_sizes_text(axes, shape)}" for i, (axes, shape) in enumerate(shapes))
    if policy.series is None:
        raise StackError(
            f"'{name}' holds {len(shapes)} series ({source} images, e.g. positions: {listing}); "
            f"they are not channels. Choose one: --series N (0..{len(shapes) - 1}), or "
            f"image.series_column for one manifest row per position"
        )
    if policy.series >= len(shapes):
        raise StackError(
            f"--series {policy.series} is out of range for '{name}': it holds {len(shapes)} "
            f"series ({listing}); valid: 0..{len(shapes) - 1}"
        )
    return policy.series


def to_chw(array: np.ndarray, axes: str, policy: AxesPolicy, name: str, source: str) -> np.ndarray:
    """Build ``(C, H, W)`` from an array whose axes are named by ``axes`` (tifffile letters).

    Channels are the ``C`` axis (times the ``S`` samples), in the file's order; Z and T of
    size > 1 are reduced as ``policy`` says; other axes of size 1 are dropped.

    Raises:
        StackError: When Z or T has size > 1 and the policy does not say how to reduce it,
            or names a plane index out of range.
        ImageReadError: When another axis has size > 1, or Y or X is missing.
    """
    check_axes(axes, array.shape, policy, name, source)
    dropped = tuple(i for i, a in enumerate(axes) if a not in _CANONICAL)
    array = np.squeeze(array, axis=dropped) if dropped else array
    present = [a for a in axes if a in _CANONICAL]
    order = sorted(range(len(present)), key=lambda i: _CANONICAL.index(present[i]))
    array = array.transpose(order)
    present = [present[i] for i in order]
    for position, axis in enumerate(_CANONICAL):
        if axis not in present:
            array = np.expand_dims(array, position)
    # (T, Z, C, S, Y, X) from here
    array = _reduce(array, policy.t, "t", name)
    array = _reduce(array, policy.z, "z", name)
    channels, samples, height, width = array.shape
    return array.reshape(channels * samples, height, width)


def check_axes(axes: str, shape: Sequence[int], policy: AxesPolicy, name: str, source: str) -> None:
    """Check that an array of these axes and sizes can be read as ``(C, H, W)`` under ``policy``.

    :func:`to_chw` calls it; readers call it first to refuse a stack before decoding it.

    Raises:
        StackError: When Z or T has size > 1 and the policy does not say how to reduce it.
        ImageReadError: When another axis has size > 1, or Y or X is missing.
    """
    shape = tuple(shape)
    if len(axes) != len(shape):
        raise ImageReadError(
            f"cannot interpret image '{name}': {source} axes {axes!r} do not match its shape "
            f"{shape}"
        )
    sizes = dict(zip(axes, shape, strict=True))
    other = [a for a in axes if a not in _CANONICAL and sizes[a] > 1]
    if other or len(set(axes)) != len(axes) or "Y" not in sizes or "X" not in sizes:
        detail = ", ".join(f"{a} ({_AXIS_NAMES.get(a, 'unknown')}) = {sizes[a]}" for a in other)
        raise ImageReadError(
            f"cannot interpret image '{name}': {source} axes {axes} ({_sizes_text(axes, shape)})"
            + (f" hold {detail}" if detail else "")
            + "; valid: Y and X, with C (channels), S (samples), Z and T"
        )
    needed = _unresolved(sizes, policy, 1)
    if needed:
        what = " and ".join(
            f"a {'Z stack' if a == 'Z' else 'time series'} ({a}={sizes[a]})"
            for a in "ZT" if sizes.get(a, 1) > 1 and getattr(policy, a.lower()) is None
        )
        raise StackError(
            f"'{name}' holds {what}: {source} axes {axes} ({_sizes_text(axes, shape)}); Z and T "
            f"are not channels. Declare how to read it: {' and '.join(needed)} "
            f"(or z / t in the spec's image section)"
        )
    for axis in "ZT":
        how, size = getattr(policy, axis.lower()), sizes.get(axis, 1)
        if isinstance(how, int) and size > 1 and how >= size:
            raise StackError(
                f"--{axis.lower()} {how} is out of range for '{name}': it has {axis}={size}; "
                f"valid: 0..{size - 1} (or {', '.join(PROJECTIONS)})"
            )


def select_channels_by_name(
    image: np.ndarray, declared: Sequence[str], policy: AxesPolicy, name: str
) -> np.ndarray:
    """Keep the channels ``policy.select`` names, in its order.

    Args:
        image: ``(C, H, W)`` image.
        declared: The file's channel names (may be empty); ``policy.names`` stands in for
            a file that declares none.
        policy: The reading policy.
        name: The file, for messages.

    Raises:
        ImageReadError: When a name is not among the channels (the message lists them),
            or no names are known for the file's channels.
    """
    if policy.select is None:
        return image
    names = tuple(declared) or tuple(policy.names or ())
    if len(names) != image.shape[0]:
        raise ImageReadError(
            f"cannot select channels {', '.join(policy.select)} of '{name}': the file declares no "
            f"channel names and the spec names {len(policy.names or ())} channel(s) for its "
            f"{image.shape[0]}; valid: an OME-TIFF with channel names, or image.channels naming "
            f"each of the file's channels"
        )
    missing = [n for n in policy.select if n not in names]
    if missing:
        raise ImageReadError(
            f"channel(s) {', '.join(missing)} not in '{name}'; valid: {', '.join(names)}"
        )
    return image[[names.index(n) for n in policy.select]]


def policy_from_image_section(section: Mapping[str, Any] | None) -> AxesPolicy:
    """The :class:`AxesPolicy` of a spec's image section as saved in a run or checkpoint.

    Sections saved before these keys existed give the default policy.
    """
    section = section or {}
    return AxesPolicy(
        z=section.get("z"),
        t=section.get("t"),
        series=section.get("series"),
        select=section.get("channels_select"),
        names=section.get("channels"),
    )


# -- helpers -------------------------------------------------------------------------------
def _sizes_text(axes: str, shape: Sequence[int]) -> str:
    return ", ".join(f"{a}={n}" for a, n in zip(axes, shape, strict=True))


def _unresolved(sizes: Mapping[str, int], policy: AxesPolicy, n_series: int) -> list[str]:
    """The options a file of these sizes still needs under ``policy``."""
    needed = [f"--{a.lower()} {CHOICES}" for a in "ZT"
              if sizes.get(a, 1) > 1 and getattr(policy, a.lower()) is None]
    if n_series > 1 and policy.series is None:
        needed.append("--series N")
    return needed


def _reduce(array: np.ndarray, how: str | int | None, axis: str, name: str) -> np.ndarray:
    """Reduce the leading axis of ``array`` as ``how`` says (a size-1 axis is dropped)."""
    size = array.shape[0]
    if size == 1:
        return array[0]
    if isinstance(how, int):
        return array[how]
    if how == "middle":
        return array[size // 2]
    if how == "max":
        return array.max(axis=0)
    if how == "min":
        return array.min(axis=0)
    if how == "mean":
        out = np.float64 if array.dtype == np.float64 else np.float32
        return array.mean(axis=0, dtype=np.float64).astype(out)
    if how == "sum":
        return array.sum(axis=0, dtype=_sum_dtype(array.dtype, size))
    raise StackError(f"'{name}' has {axis.upper()}={size} and no --{axis} {CHOICES}")


def _sum_dtype(dtype: np.dtype, n: int) -> np.dtype:
    """A dtype that holds the sum of ``n`` values of ``dtype`` without overflow."""
    if dtype.kind == "f":
        return np.dtype(np.float64 if dtype.itemsize >= 8 else np.float32)
    if dtype.kind == "b":
        dtype = np.dtype(np.uint8)
    info = np.iinfo(dtype)
    largest = max(abs(int(info.max)), abs(int(info.min))) * n
    if dtype.kind == "u":
        return np.dtype(np.uint32 if largest <= np.iinfo(np.uint32).max else np.uint64)
    return np.dtype(np.int32 if largest <= np.iinfo(np.int32).max else np.int64)
