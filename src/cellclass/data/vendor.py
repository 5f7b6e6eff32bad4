"""Vendor microscope formats (Zeiss CZI, Nikon ND2, Leica LIF), read through ``bioio``.

Each format is read by its maintained ``bioio`` plugin (``bioio-czi``, ``bioio-nd2``,
``bioio-lif``), all in the ``vendor`` extra: ``pip install 'cellclass[vendor]'``. A file
of these formats read without it raises
:class:`~cellclass.errors.MissingDependencyError` naming the extra.

bioio presents every file as scenes of ``T, C, Z, Y, X`` (and ``S`` for the samples of
RGB cameras): a scene is a series (``--series N``), Z and T follow the
:class:`~cellclass.data.axes.AxesPolicy` rules as for any other file (Z > 1 or T > 1
needs a projection), the channel names are the file's own.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import numpy as np

from cellclass.data.axes import AxesPolicy, ImageAxes, check_axes, choose_series, to_chw
from cellclass.errors import ImageReadError, MissingDependencyError

__all__ = ["VENDOR_EXTENSIONS", "describe_with_bioio", "read_with_bioio"]

VENDOR_EXTENSIONS: dict[str, tuple[str, str]] = {
    ".czi": ("bioio_czi", "Zeiss CZI"),
    ".nd2": ("bioio_nd2", "Nikon ND2"),
    ".lif": ("bioio_lif", "Leica LIF"),
}
"""Extensions read through a bioio plugin: the plugin's module and the format's name."""

EXTRA_HINT = "pip install 'cellclass[vendor]'"

# Errors bioio and its plugins raise for files they cannot read.
_READ_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, KeyError, IndexError, RuntimeError,
                                             NotImplementedError, TypeError)


def read_with_bioio(
    path: str | os.PathLike[str], policy: AxesPolicy, *, plugin: str | None = None
) -> tuple[np.ndarray, tuple[str, ...]]:
    """Read one scene of a file through bioio as ``(C, H, W)``.

    Args:
        path: The file.
        policy: Which scene (``series``), and how Z and T are reduced.
        plugin: Module of the bioio reader plugin to use (``bioio_czi``); None picks it
            from the extension (:data:`VENDOR_EXTENSIONS`), else lets bioio choose.

    Returns:
        ``(image, channel_names)`` in the file's dtype.

    Raises:
        MissingDependencyError: When bioio or the plugin is not installed.
        StackError: When the file holds several scenes, Z > 1 or T > 1 and ``policy`` does
            not say which or how.
        ImageReadError: When the file is missing or cannot be read.
    """
    name = os.fspath(path)
    image, errors = _open(name, plugin)
    try:
        scenes = list(image.scenes)
        shapes = []
        for scene in scenes:
            image.set_scene(scene)
            shapes.append((image.dims.order, tuple(int(n) for n in image.shape)))
        index = choose_series(shapes, policy, name, "bioio")
        image.set_scene(scenes[index])
        axes, shape = shapes[index]
        check_axes(axes, shape, policy, name, "bioio")  # refuse before reading pixels
        values = np.asarray(image.get_image_data(axes))
        names = tuple(str(n) for n in (image.channel_names or ()))
    except errors as exc:
        raise ImageReadError(f"cannot read image '{name}' through bioio: {type(exc).__name__}: {exc}") from exc
    if not values.dtype.isnative:
        values = values.astype(values.dtype.newbyteorder("="))
    chw = to_chw(values, axes, policy, name, "bioio")
    return chw, names if len(names) == chw.shape[0] else ()


def describe_with_bioio(path: str | os.PathLike[str], *, plugin: str | None = None) -> ImageAxes:
    """What a file declares through bioio: the first scene's axes, sizes, dtype, channels.

    Raises:
        MissingDependencyError: When bioio or the plugin is not installed.
        ImageReadError: When the file cannot be read.
    """
    name = os.fspath(path)
    image, errors = _open(name, plugin)
    try:
        series = []
        for scene in image.scenes:
            image.set_scene(scene)
            series.append((image.dims.order, tuple(int(n) for n in image.shape)))
        image.set_scene(image.scenes[0])
        names = tuple(str(n) for n in (image.channel_names or ()))
        dtype = str(image.dtype)
    except errors as exc:
        raise ImageReadError(f"cannot read image '{name}' through bioio: {type(exc).__name__}: {exc}") from exc
    axes, shape = series[0]
    return ImageAxes(name, "bioio", axes, shape, dtype, declared=True, channel_names=names,
                     series=tuple(series))


def _open(name: str, plugin: str | None) -> tuple[Any, tuple[type[Exception], ...]]:
    """The file opened by bioio, and the errors its reading raises for a bad file."""
    ext = os.path.splitext(name)[1].lower()
    module, label = VENDOR_EXTENSIONS.get(ext, (plugin, ext or "this format"))
    module = plugin or module
    try:
        bioio = importlib.import_module("bioio")
        reader = importlib.import_module(module).Reader if module else None
        bioio_errors = importlib.import_module("bioio_base.exceptions")
    except ImportError as exc:
        package = (exc.name or module or "bioio").replace("_", "-")
        raise MissingDependencyError(
            f"reading {label} file '{name}' needs the vendor extra ({package} is not installed); "
            f"install it with: {EXTRA_HINT}"
        ) from None
    if not os.path.isfile(name):
        raise ImageReadError(f"cannot read image '{name}': file does not exist")
    errors = (*_READ_ERRORS, *(getattr(bioio_errors, n) for n in ("UnsupportedFileFormatError", "UnexpectedShapeError",
                                                                 "InvalidDimensionOrderingError") if hasattr(bioio_errors, n)))
    try:
        image = bioio.BioImage(name, reader=reader) if reader is not None else bioio.BioImage(name)
    except errors as exc:
        raise ImageReadError(f"cannot read image '{name}' through bioio: {type(exc).__name__}: {exc}") from exc
    return image, errors
