"""Content-addressed file stores for contributed images: a local folder or S3.

A file is stored under its SHA-256, so the same image contributed twice is stored once,
and its name cannot be chosen by the uploader. Writes are atomic and durable: a local file
is written to a temporary name, flushed to disk (``fsync``), moved into place and its
folder flushed, all before the database row that points to it commits; an S3 object
appears whole or not at all. Local folders are private to the service's user (0700,
files 0600).

A process killed between writing a file and committing its row leaves a file no row
points to, or a ``.tmp`` file; :meth:`LocalFileStore.remove_unreferenced` removes them
when the service starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import stat
import tempfile
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Protocol

from cellclass.errors import MissingDependencyError, NotFoundError, StoreError

try:
    import fcntl
except ImportError:  # POSIX only: on Windows, leftovers of interrupted writes are left in place
    fcntl = None

log = logging.getLogger(__name__)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_EXTENSION = re.compile(r"^\.[a-z0-9]{1,8}$")
_CONTENT_NAME = re.compile(r"^([0-9a-f]{64})(\.[a-z0-9]{1,8})$")
_TEMPORARY_NAME = re.compile(r"^\.[0-9a-f]{64}\.[a-z0-9]{1,8}\..+\.tmp$")
_LOCK_NAME = ".lock"


def private_folder(path: str | Path, *, tighten: bool = False) -> Path:
    """Create ``path`` (and missing parents) readable by this user only (mode 0700).

    Args:
        path: The folder.
        tighten: Also remove group and other permissions from an existing folder
            (for the service's own state folder), with a warning.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if tighten and os.name == "posix":
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            os.chmod(path, mode & 0o700)
            log.warning("made %s private to its owner (mode %04o, was %04o)", path, mode & 0o700, mode)
    return path


def _fsync_folder(path: Path) -> None:
    """Flush a folder's entries (a rename or a new file in it) to disk, where the platform can."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore(Protocol):
    """What the contribution store needs of a file store."""

    url: str

    def put(self, sha256: str, extension: str, data: bytes) -> bool:
        """Store ``data``; return False when it was already there."""

    def get(self, sha256: str, extension: str) -> bytes:
        """Return a stored file's bytes."""

    def delete(self, sha256: str, extension: str) -> None:
        """Remove a stored file (no error when absent)."""

    def close(self) -> None:
        """Release what the store holds (connections, locks)."""


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
        self._lock: Any = None
        try:
            private_folder(self.root)
        except OSError as exc:
            raise StoreError(f"cannot create the file store folder {str(self.root)!r}: {exc}") from exc

    def path(self, sha256: str, extension: str) -> Path:
        """Where a file is (or would be) stored."""
        return self.root / _relative_key(sha256, extension)

    def put(self, sha256: str, extension: str, data: bytes) -> bool:
        """Store ``data`` atomically and durably unless an identical file is already there.

        When this returns, the file's bytes and its name are on disk (``fsync`` of the
        file, then of each folder that gained an entry), so a row committed afterwards
        never points to a file a power cut could lose.
        """
        path = self.path(sha256, extension)
        if path.is_file() and path.stat().st_size == len(data):
            return False
        gained = [path.parent]  # folders that gain an entry: the file's, and the parents of new folders
        for folder in (path.parent.parent, path.parent):
            if not folder.is_dir():
                folder.mkdir(mode=0o700, exist_ok=True)
                gained.append(folder.parent)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # mode 0600
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        for folder in dict.fromkeys(gained):
            _fsync_folder(folder)
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

    def remove_unreferenced(self, referenced: Callable[[], Collection[tuple[str, str]]]) -> list[Path] | None:
        """Remove what interrupted writes left: ``.tmp`` files and content files no row points to.

        Only files named as this store names them (``ab/cd/<sha256>.<ext>`` and their
        temporary ``.<sha256>.<ext>.*.tmp``) are considered; anything else in the folder is
        left alone. Another server using the folder could be between writing a file and
        committing its row, so nothing is removed while one does: every server holds a
        shared lock on ``.lock`` in the folder from its start (POSIX ``flock``), and the
        cleanup runs only under an exclusive one.

        Args:
            referenced: Gives ``(sha256, extension)`` of every file a database row points
                to; called under the exclusive lock.

        Returns:
            The removed files, or None when another process holds the folder (or the
            platform has no ``flock``) and nothing was looked at.
        """
        if fcntl is None:
            log.info("no flock on this platform: leftovers of interrupted writes in %s are not cleaned", self.root)
            return None
        if self._lock is None:
            self._lock = open(self.root / _LOCK_NAME, "a+b")  # noqa: SIM115 (held until close())
            os.chmod(self.root / _LOCK_NAME, 0o600)
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("another process uses the file store %s: leftovers of interrupted writes are left to it",
                     self.root)
            fcntl.flock(self._lock, fcntl.LOCK_SH)
            return None
        try:
            removed = self._remove_leftovers(set(referenced()))
        finally:
            fcntl.flock(self._lock, fcntl.LOCK_SH)  # held while serving, so a later server leaves ours alone
        return removed

    def _remove_leftovers(self, referenced: set[tuple[str, str]]) -> list[Path]:
        removed = []
        for path in sorted(self.root.glob("??/??/*")):
            name = path.name
            content = _CONTENT_NAME.match(name)
            if content is not None:
                sha256, extension = content.groups()
                if (sha256, extension) in referenced or path.parent.name != sha256[2:4] \
                        or path.parent.parent.name != sha256[:2]:
                    continue
            elif not _TEMPORARY_NAME.match(name):
                continue
            if not path.is_file() or path.is_symlink():
                continue
            path.unlink()
            removed.append(path)
            log.warning("removed %s: %s", path, "a file no contribution points to" if content
                        else "a temporary file of an interrupted write")
        if removed:
            log.warning("removed %d leftover file(s) of interrupted writes from %s", len(removed), self.root)
        return removed

    def close(self) -> None:
        """Release the folder's lock."""
        if self._lock is not None:
            with contextlib.suppress(OSError):
                self._lock.close()
            self._lock = None


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

    def close(self) -> None:
        """Nothing to release (boto3 clients close with the process)."""


def open_file_store(url: str) -> FileStore:
    """A :class:`LocalFileStore` for a folder, an :class:`S3FileStore` for ``s3://``."""
    if url.startswith("s3://"):
        return S3FileStore(url)
    if "://" in url:
        raise StoreError(f"unsupported file store {url!r}; valid: a folder or s3://BUCKET/PREFIX")
    return LocalFileStore(url)
