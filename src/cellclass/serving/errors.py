"""Exceptions of the prediction service, each carrying the HTTP status it maps to.

They are :class:`cellclass.errors.CellclassError` subclasses, so the CLI prints them as
one-line messages; the HTTP API turns them into ``{"detail": message}`` responses with
:attr:`ServiceError.status_code`. Messages follow the house shape: what was wrong, the
value received, what is valid.
"""

from __future__ import annotations

from cellclass.errors import CellclassError


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
