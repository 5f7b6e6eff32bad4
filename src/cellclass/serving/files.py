"""Content-addressed file stores for contributed images: a local folder or S3.

A file is stored under its SHA-256, so the same image contributed twice is stored once,
and its name cannot be chosen by the uploader. Writes are atomic: a local file is written
to a temporary name and moved into place; an S3 object appears whole or not at all.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Protocol

from cellclass.atomic import atomic_write_bytes
from cellclass.errors import MissingDependencyError
from cellclass.serving.errors import NotFoundError, StoreError

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_EXTENSION = re.compile(r"^\.[a-z0-9]{1,8}$")


class FileStore(Protocol):
    """What the contribution store needs of a file store."""

    url: str

    def put(self, sha256: str, extension: str, data: bytes) -> bool:
        """Store ``data``; return False when it was already there."""

    def get(self, sha256: str, extension: str) -> bytes:
        """Return a stored file's bytes."""

    def delete(self, sha256: str, extension: str) -> None:
        """Remove a stored file (no error when absent)."""


def _relative_key(sha256: str, extension: str) -> str:
    if not _SHA256.match(sha256) or not _EXTENSION.match(extension):
        raise StoreError(
            f"invalid content address {sha256!r}{extension!r}; valid: 64 lower-case hex digits "
            f"and an extension such as '.tif'"
        )
    return f"{sha256[:2]}/{sha256[2:4]}/{sha256}{extension}"


class LocalFileStore:
    """Files under a folder, as ``ab/cd/abcd...ef.tif``.

    Args:
        root: The folder (created when missing).
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.url = str(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the file store folder {str(self.root)!r}: {exc}") from exc

    def path(self, sha256: str, extension: str) -> Path:
        """Where a file is (or would be) stored."""
        return self.root / _relative_key(sha256, extension)

    def put(self, sha256: str, extension: str, data: bytes) -> bool:
        """Store ``data`` atomically unless an identical file is already there."""
        path = self.path(sha256, extension)
        if path.is_file() and path.stat().st_size == len(data):
            return False
        atomic_write_bytes(path, data)
        return True

    def get(self, sha256: str, extension: str) -> bytes:
        """Return a stored file's bytes.

        Raises:
            NotFoundError: When the file is missing.
        """
        path = self.path(sha256, extension)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise NotFoundError(f"stored file {str(path)!r} is missing from the file store") from None

    def delete(self, sha256: str, extension: str) -> None:
        """Remove a stored file (no error when absent)."""
        self.path(sha256, extension).unlink(missing_ok=True)


class S3FileStore:
    """Files in an S3 bucket (or an S3-compatible store: set ``AWS_ENDPOINT_URL``).

    Args:
        url: ``s3://bucket/prefix``; credentials and region come from boto3's usual
            sources (environment, ``~/.aws``, instance role).
        client: A boto3 S3 client to use instead of making one.
    """

    def __init__(self, url: str, client: Any = None) -> None:
        match = re.match(r"^s3://([^/]+)/?(.*)$", url)
        if not match:
            raise StoreError(f"invalid S3 URL {url!r}; valid: s3://BUCKET/PREFIX")
        self.url = url
        self.bucket = match.group(1)
        self.prefix = match.group(2).strip("/")
        if client is None:
            try:
                import boto3
            except ImportError:
                raise MissingDependencyError(
                    "an s3:// file store needs boto3, which is not installed: pip install boto3"
                ) from None
            client = boto3.client("s3")
        self.client = client

    def key(self, sha256: str, extension: str) -> str:
        """The object key of a file."""
        relative = _relative_key(sha256, extension)
        return f"{self.prefix}/{relative}" if self.prefix else relative

    def put(self, sha256: str, extension: str, data: bytes) -> bool:
        """Upload ``data`` unless the object already exists."""
        from botocore.exceptions import ClientError

        key = self.key(sha256, extension)
        try:
            self.client.head_object(Bucket=self.bucket, Key=key)
            return False
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise StoreError(f"cannot check s3://{self.bucket}/{key}: {exc}") from exc
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=data)
        except ClientError as exc:
            raise StoreError(f"cannot upload s3://{self.bucket}/{key}: {exc}") from exc
        return True

    def get(self, sha256: str, extension: str) -> bytes:
        """Download a stored file.

        Raises:
            NotFoundError: When the object is missing.
        """
        from botocore.exceptions import ClientError

        key = self.key(sha256, extension)
        try:
            return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise NotFoundError(f"stored file s3://{self.bucket}/{key} is missing") from None
            raise StoreError(f"cannot download s3://{self.bucket}/{key}: {exc}") from exc

    def delete(self, sha256: str, extension: str) -> None:
        """Remove a stored object (no error when absent)."""
        self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256, extension))


def open_file_store(url: str) -> FileStore:
    """A :class:`LocalFileStore` for a folder, an :class:`S3FileStore` for ``s3://``."""
    if url.startswith("s3://"):
        return S3FileStore(url)
    if "://" in url:
        raise StoreError(f"unsupported file store {url!r}; valid: a folder or s3://BUCKET/PREFIX")
    return LocalFileStore(url)
