"""Exceptions raised by cellclass.

Every message follows one shape: what was wrong, the value received, what is valid.
The CLI catches :class:`CellclassError` and prints its message without a traceback.
"""

from __future__ import annotations


class CellclassError(Exception):
    """Base class of every error cellclass raises on purpose."""


class ImageReadError(CellclassError):
    """An image file is missing, truncated, undecodable or of an unsupported layout."""


class SpecError(CellclassError):
    """A dataset spec (YAML, preset or command line) is invalid."""


class LabelError(CellclassError):
    """A label value is unknown, empty or malformed."""


class ModelError(CellclassError):
    """A model name, argument or weight file is invalid."""


class MissingDependencyError(CellclassError):
    """An optional dependency is not installed; the message names the extra to install."""


class SplitError(CellclassError):
    """A train/validation/test split or a k-fold cannot be made as asked."""


class CacheError(CellclassError):
    """A prepared image cache cannot be built, found or read as asked."""


class FetchError(CellclassError):
    """A dataset cannot be retrieved from its remote store as asked."""


class TrackingError(CellclassError):
    """An experiment tracker name, URI or store cannot be used as asked."""


class SweepError(CellclassError):
    """A sweep file, its metric or parameters, or its study cannot be used as asked."""


class StackError(ImageReadError):
    """An image file holds a Z stack, a time series or several series (positions) and
    nothing says how to make one ``(C, H, W)`` image of it."""


class ConfigError(CellclassError, ValueError):
    """A setting (of training, augmentation, normalization or the loader) has an invalid key or value."""


class NormalizationError(CellclassError, ValueError):
    """Images cannot be normalized as asked (no training image, channel counts differ, not fitted)."""


class ImageWriteError(CellclassError, ValueError):
    """An array cannot be written in the asked image format (its shape or dtype does not fit)."""


class OutputPathError(CellclassError):
    """An output path cannot be used: it is one of the inputs, or a folder where a file is needed."""


# Exports
class ModelPackageError(CellclassError):
    """A model package (bioimage.io, MLflow model) cannot be written or read as asked: a
    baseline instead of a network, a missing test image, metadata the format refuses."""


class ModelRegistryError(CellclassError):
    """A registered model name, version or ``models:/`` URI cannot be resolved or used as asked."""
