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


# Data preparation and sweeps


class SimulationError(CellclassError, ValueError):
    """A simulator argument is out of range or the output folder is already a dataset."""


class PlateSimulationError(CellclassError, ValueError):
    """A plate simulation was asked for with invalid settings."""


class CropError(CellclassError):
    """Crops, tiles or their dataset cannot be made as asked (settings, masks, manifest)."""


class SegmentationError(CellclassError):
    """A field, a parameter, a mask file or a backend cannot be segmented or used as asked."""


class TrialCrash(SweepError):
    """A trial raised an unexpected error (recorded in the study); its worker stops."""


# The prediction service
# Each carries the HTTP status it maps to: the API answers ``{"detail": message}`` with
# :attr:`ServiceError.status_code`; the CLI prints them as one-line messages.
class ServiceError(CellclassError):
    """Base class of the service's errors; ``status_code`` is the HTTP status."""

    status_code: int = 400


class AuthenticationError(ServiceError):
    """No API key, or a key that is unknown or revoked (HTTP 401)."""

    status_code = 401


class PermissionDeniedError(ServiceError):
    """A valid API key whose role does not allow the operation (HTTP 403)."""

    status_code = 403


class NotFoundError(ServiceError):
    """A contribution, key or dataset that does not exist (HTTP 404)."""

    status_code = 404


class ConflictError(ServiceError):
    """A request that contradicts what is stored, e.g. a queue item this key already labelled (HTTP 409)."""

    status_code = 409


class QueueError(ServiceError):
    """A labelling queue (a ranking CSV and its pool of images) that cannot be served as given."""


class UploadError(ServiceError):
    """An upload that is not an acceptable image: bad name, type, content or labels (HTTP 422)."""

    status_code = 422


class UnsupportedMediaError(UploadError):
    """An upload whose name or content is not a TIFF, PNG or NPY image (HTTP 415)."""

    status_code = 415


class PayloadTooLargeError(UploadError):
    """An upload over the byte or pixel-count limits, decompression bombs included (HTTP 413)."""

    status_code = 413


class StoreError(ServiceError):
    """The contribution database or file store cannot be opened or used as asked (HTTP 500)."""

    status_code = 500


class ExportError(ServiceError):
    """A model or contributions cannot be exported as asked."""


# Training, checkpoints, evaluation and model export


class TrainingError(CellclassError):
    """Training cannot start or continue as asked."""


class CheckpointError(CellclassError):
    """A checkpoint is missing, unreadable or not a cellclass checkpoint."""


class EvaluationError(CellclassError, ValueError):
    """Arrays, options or tables given to an evaluation function are inconsistent."""


class ModelExportError(CellclassError):
    """A network cannot be exported (ONNX) as asked, or an exported model does not fit its checkpoint."""
# Exports
class ModelPackageError(CellclassError):
    """A model package (bioimage.io, MLflow model) cannot be written or read as asked: a
    baseline instead of a network, a missing test image, metadata the format refuses."""


class ModelRegistryError(CellclassError):
    """A registered model name, version or ``models:/`` URI cannot be resolved or used as asked."""


# Embeddings and ranking images for labelling


class EmbeddingError(CellclassError):
    """Features cannot be taken from a model, mapped or aggregated as asked (a baseline has none)."""


class EnsembleError(CellclassError, ValueError):
    """Models cannot make an ensemble as given: a path that holds none, an ``ensemble.yaml``
    that cannot be read, or members whose tasks or classes differ."""


class RankingError(CellclassError, ValueError):
    """Images cannot be ranked for labelling as asked: strategy, budget, pool or ensemble."""
