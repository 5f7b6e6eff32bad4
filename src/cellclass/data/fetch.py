"""Retrieval of the NASA BPS microscopy benchmark from its public S3 bucket.

:func:`fetch_bps` reads ``meta.csv`` from ``s3://nasa-bps-training-data/Microscopy/train``
(anonymous, unsigned requests: no AWS account needed), keeps the rows asked for (hours
after exposure, doses, particle types, a limit), downloads their TIFFs in parallel and
writes a ready ``bps`` spec (``cellclass.yaml``) beside them.

Every file is checked three ways before it is kept: the size the bucket listing gives,
the ``Content-Length`` of the download and the bytes received must agree, and the file
must decode as an image (:func:`cellclass.data.io.read_image`). A file that fails is
reported, not kept. Files are written to a temporary name and renamed into place, so a
file with the final name is always complete; a second run skips the files already there
with the right size, so an interrupted retrieval resumes where it stopped. Transient
failures (connection errors, throttling, short reads) are retried with exponential
backoff.

The endpoint, bucket and prefix are arguments, so the same code runs against a mirror
or a local S3 server (the tests use ``moto_server`` on loopback).
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pandas as pd
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from cellclass.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from cellclass.data.io import read_image
from cellclass.data.presets import bps
from cellclass.errors import FetchError, ImageReadError
from cellclass.progress import ProgressFn

log = logging.getLogger(__name__)

__all__ = [
    "BPS_BUCKET",
    "BPS_PREFIX",
    "FetchProblem",
    "FetchResult",
    "fetch_bps",
    "make_client",
    "select_bps_rows",
]

BPS_BUCKET = "nasa-bps-training-data"
"""The public bucket of the NASA BPS microscopy benchmark."""

BPS_PREFIX = "Microscopy/train"
"""Folder of the training images and ``meta.csv`` in :data:`BPS_BUCKET`."""

BPS_REGION = "us-west-2"
BPS_COLUMNS = ("filename", "dose_Gy", "particle_type", "hr_post_exposure")
SOURCE_MANIFEST = "meta.source.csv"
"""The bucket's full ``meta.csv``, kept beside the selection for provenance."""

_CHUNK = 1 << 20


@dataclass(frozen=True)
class FetchProblem:
    """A file that could not be retrieved intact.

    Attributes:
        filename: Name in the manifest.
        reason: What went wrong, with the values seen.
    """

    filename: str
    reason: str


@dataclass
class FetchResult:
    """What :func:`fetch_bps` did.

    Attributes:
        out: Output folder.
        selected: Rows selected from the bucket's ``meta.csv``.
        downloaded: Files downloaded by this call.
        skipped: Files already complete on disk (resumed).
        bytes_downloaded: Bytes written by this call.
        problems: Files missing, truncated or corrupt (not kept).
        manifest: The written ``meta.csv`` (the selected rows whose file is complete).
        spec: The written ``cellclass.yaml`` (a ``bps`` spec).
    """

    out: Path
    selected: int = 0
    downloaded: int = 0
    skipped: int = 0
    bytes_downloaded: int = 0
    problems: list[FetchProblem] = field(default_factory=list)
    manifest: Path | None = None
    spec: Path | None = None

    @property
    def ok(self) -> bool:
        """Whether every selected file is complete on disk."""
        return not self.problems


class _Retryable(Exception):
    """A failure worth another attempt (short read, connection error, throttling)."""


class _Corrupt(Exception):
    """A failure another attempt would repeat (size mismatch, undecodable, missing)."""


def make_client(endpoint_url: str | None = None, *, workers: int = 8, region: str = BPS_REGION,
                signed: bool = False) -> Any:
    """An S3 client for public buckets.

    Args:
        endpoint_url: Another S3 endpoint (a mirror, a local server); path-style
            addressing is used with it.
        workers: Parallel downloads the connection pool must serve.
        region: Region of the bucket.
        signed: Sign requests with the environment's AWS credentials instead of sending
            anonymous (unsigned) ones; only for buckets that refuse anonymous reads.
    """
    options: dict[str, Any] = {
        "retries": {"max_attempts": 3, "mode": "standard"},
        "max_pool_connections": max(10, workers),
        "connect_timeout": 10,
        "read_timeout": 60,
    }
    if not signed:
        options["signature_version"] = UNSIGNED
    if endpoint_url:
        options["s3"] = {"addressing_style": "path"}
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region,
                                          config=Config(**options))


# -- selection ----------------------------------------------------------------------------
def select_bps_rows(
    meta: pd.DataFrame,
    *,
    hours: Sequence[float] | None = None,
    doses: Sequence[float] | None = None,
    particles: Sequence[str] | None = None,
    limit: int | None = None,
) -> pd.DataFrame:
    """Rows of a BPS ``meta.csv`` matching every filter given.

    Args:
        meta: The manifest, read as text.
        hours: Hours after exposure to keep (e.g. ``[4]``).
        doses: Doses in Gy to keep (compared as numbers: ``1`` matches ``1.0``).
        particles: Particle types to keep (case-insensitive: ``xray`` does not match,
            ``x-ray`` does).
        limit: Keep at most this many rows, evenly spaced over the selection (so every
            plate and condition stays represented), in manifest order.

    Raises:
        FetchError: When a filter value matches no row (the message lists the valid
            values) or ``limit`` is below 1.
    """
    keep = np.ones(len(meta), dtype=bool)
    if hours:
        values = pd.to_numeric(meta["hr_post_exposure"], errors="coerce").to_numpy()
        keep &= _numeric_match("hours", hours, values)
    if doses:
        values = pd.to_numeric(meta["dose_Gy"], errors="coerce").to_numpy()
        keep &= _numeric_match("doses", doses, values)
    if particles:
        names = meta["particle_type"].astype(str).str.strip()
        valid = sorted(set(names))
        lowered = {v.lower(): v for v in valid}
        unknown = [p for p in particles if p.strip().lower() not in lowered]
        if unknown:
            raise FetchError(f"particle type(s) {unknown} are not in meta.csv; valid: {', '.join(valid)}")
        keep &= names.isin([lowered[p.strip().lower()] for p in particles]).to_numpy()
    selected = meta[keep]
    if limit is not None:
        if limit < 1:
            raise FetchError(f"limit {limit!r} is invalid; valid: an integer >= 1")
        if limit < len(selected):
            positions = np.unique(np.linspace(0, len(selected) - 1, limit).round().astype(int))
            selected = selected.iloc[positions]
    return selected.reset_index(drop=True)


def _numeric_match(name: str, wanted: Sequence[float], values: np.ndarray) -> np.ndarray:
    present = sorted({float(v) for v in values if not np.isnan(v)})
    mask = np.zeros(len(values), dtype=bool)
    for w in wanted:
        hit = np.isclose(values, float(w), rtol=0, atol=1e-9)
        if not hit.any():
            raise FetchError(f"{name} value {w!r} is not in meta.csv; valid: {', '.join(f'{v:g}' for v in present)}")
        mask |= hit
    return mask


# -- retrieval ----------------------------------------------------------------------------
def fetch_bps(
    out: str | os.PathLike[str],
    *,
    hours: Sequence[float] | None = None,
    doses: Sequence[float] | None = None,
    particles: Sequence[str] | None = None,
    limit: int | None = None,
    workers: int = 8,
    endpoint_url: str | None = None,
    bucket: str = BPS_BUCKET,
    prefix: str = BPS_PREFIX,
    retries: int = 4,
    backoff: float = 0.5,
    client: Any = None,
    progress: ProgressFn | None = None,
) -> FetchResult:
    """Download (part of) the BPS benchmark into ``out`` and write a ready ``bps`` spec.

    Args:
        out: Output folder; files already complete in it are kept (resume).
        hours: Hours after exposure to keep.
        doses: Doses (Gy) to keep.
        particles: Particle types to keep (``Fe``, ``X-ray``).
        limit: At most this many images, evenly spaced over the selection.
        workers: Parallel downloads.
        endpoint_url: Another S3 endpoint (mirror, local server).
        bucket: Bucket name.
        prefix: Folder of ``meta.csv`` and the images in the bucket.
        retries: Further attempts after a transient failure.
        backoff: Seconds before the first retry; doubled at each further one.
        client: An S3 client to use (default: :func:`make_client`, unsigned).
        progress: Called as ``progress("downloading", files_done, files_total)``.

    Returns:
        What was downloaded, skipped and found corrupt, and the written manifest and spec.

    Raises:
        FetchError: When ``meta.csv`` cannot be read, lacks the BPS columns, a filter
            matches nothing, or the bucket cannot be listed.
    """
    if workers < 1:
        raise FetchError(f"workers {workers!r} is invalid; valid: an integer >= 1")
    if retries < 0 or backoff < 0:
        raise FetchError(f"retries {retries!r} and backoff {backoff!r} are invalid; valid: numbers >= 0")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _remove_partial_files(out)
    client = client if client is not None else make_client(endpoint_url, workers=workers)
    prefix = prefix.strip("/")
    where = f"s3://{bucket}/{prefix}"

    raw = _get_small(client, bucket, f"{prefix}/meta.csv", retries, backoff, where)
    meta = _parse_meta(raw, where)
    atomic_write_bytes(out / SOURCE_MANIFEST, raw)
    selected = select_bps_rows(meta, hours=hours, doses=doses, particles=particles, limit=limit)
    result = FetchResult(out=out, selected=len(selected))
    log.info("%d of %d rows of %s/meta.csv selected", len(selected), len(meta), where)

    todo, present = _plan(selected, _list_sizes(client, bucket, prefix, where), out, where, result)
    if progress is not None:
        progress("downloading", len(selected) - len(todo), len(selected))
    if result.skipped:
        log.info("%d file(s) already complete in %s: skipped", result.skipped, out)
    _download_all(client, bucket, prefix, out, todo, result, present, workers=workers, retries=retries,
                  backoff=backoff, progress=progress, total=len(selected))

    filters = {"hours": list(hours or []), "doses": list(doses or []), "particles": list(particles or []),
               "limit": limit}
    _write_outputs(out, selected[selected["filename"].isin(present)], result,
                   {"source": where, "endpoint_url": endpoint_url, "filters": filters})
    log.info("%d downloaded, %d already present, %d problem(s); spec written to %s",
             result.downloaded, result.skipped, len(result.problems), result.spec)
    return result


def _write_outputs(out: Path, kept: pd.DataFrame, result: FetchResult, source: dict[str, Any]) -> None:
    """The manifest of the complete files, the ``bps`` spec and ``fetch.json`` (what was
    asked for, from where, and what came of it)."""
    with atomic_path(out / "meta.csv") as tmp:
        kept.to_csv(tmp, index=False)
    result.manifest = out / "meta.csv"
    result.spec = bps(out).to_yaml(out / "cellclass.yaml")
    report = {
        **source,
        **{k: v for k, v in asdict(result).items() if k not in ("out", "manifest", "spec", "problems")},
        "problems": [asdict(p) for p in result.problems],
    }
    atomic_write_text(out / "fetch.json", json.dumps(report, indent=2))


def _plan(selected: pd.DataFrame, sizes: dict[str, int], out: Path, where: str,
          result: FetchResult) -> tuple[list[tuple[str, int]], set[str]]:
    """The selected files to download (name and listed size) and those already complete in
    ``out``; a file the bucket does not list is a problem in ``result``."""
    todo: list[tuple[str, int]] = []
    present: set[str] = set()
    for name in selected["filename"]:
        expected = sizes.get(name)
        dest = out / name
        if expected is None:
            result.problems.append(FetchProblem(name, f"not in the bucket listing of {where}/"))
        elif dest.is_file() and dest.stat().st_size == expected:
            result.skipped += 1
            present.add(name)
        else:
            todo.append((name, expected))
    return todo, present


def _download_all(client: Any, bucket: str, prefix: str, out: Path, todo: list[tuple[str, int]],
                  result: FetchResult, present: set[str], *, workers: int, retries: int, backoff: float,
                  progress: ProgressFn | None, total: int) -> None:
    """Download ``todo`` in parallel into ``out``, adding each file to ``present`` or to
    ``result``'s problems, and its bytes to ``result``; progress counts to ``total``, the
    files selected."""
    done = total - len(todo)
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        pending: dict[Future, str] = {
            pool.submit(_download, client, bucket, f"{prefix}/{name}", out / name, expected, retries, backoff): name
            for name, expected in todo
        }
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                name = pending.pop(future)
                try:
                    result.bytes_downloaded += future.result()
                    result.downloaded += 1
                    present.add(name)
                except _Corrupt as exc:
                    result.problems.append(FetchProblem(name, str(exc)))
                    log.warning("%s: %s", name, exc)
                done += 1
                if progress is not None:
                    progress("downloading", done, total)
    finally:
        # On an interruption, files in flight finish (each is atomic); queued ones are dropped.
        pool.shutdown(wait=True, cancel_futures=True)


def _parse_meta(raw: bytes, where: str) -> pd.DataFrame:
    try:
        meta = pd.read_csv(io.BytesIO(raw), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        raise FetchError(f"cannot parse {where}/meta.csv: {exc}") from None
    meta = meta[[c for c in meta.columns if not str(c).startswith("Unnamed")]]
    missing = [c for c in BPS_COLUMNS if c not in meta.columns]
    if missing:
        raise FetchError(f"{where}/meta.csv lacks column(s) {missing}; it has {list(meta.columns)}; "
                         f"valid: a BPS manifest with {', '.join(BPS_COLUMNS)}")
    return meta


def _status(exc: Exception) -> tuple[str, int]:
    response = getattr(exc, "response", None) or {}
    code = str(response.get("Error", {}).get("Code", ""))
    status = int(response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code, status


def _transient(exc: Exception) -> bool:
    """Whether a botocore error is worth retrying (5xx, throttling, connection trouble)."""
    if isinstance(exc, ClientError):
        code, status = _status(exc)
        return status >= 500 or status == 429 or code in ("SlowDown", "Throttling", "RequestTimeout")
    return isinstance(exc, BotoCoreError)


def _get_small(client: Any, bucket: str, key: str, retries: int, backoff: float, where: str) -> bytes:
    """Fetch a small object (the manifest) with retries."""
    for attempt in range(retries + 1):
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            data = response["Body"].read()
            if len(data) != int(response.get("ContentLength", len(data))):
                raise _Retryable(f"received {len(data)} of {response['ContentLength']} bytes")
            return data
        except (BotoCoreError, ClientError, _Retryable) as exc:
            if isinstance(exc, (BotoCoreError, ClientError)) and not _transient(exc) or attempt == retries:
                code, status = _status(exc)
                hint = {"NoSuchBucket": f"bucket {bucket!r} does not exist",
                        "NoSuchKey": f"no object {key!r}"}.get(code, str(exc))
                raise FetchError(f"cannot download {where}/meta.csv: {hint}; check --endpoint-url, --bucket "
                                 f"and --prefix") from None
            _sleep(backoff, attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _list_sizes(client: Any, bucket: str, prefix: str, where: str) -> dict[str, int]:
    """Size of every object directly under ``prefix``, by file name."""
    sizes: dict[str, int] = {}
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": f"{prefix}/"}
    while True:
        try:
            page = client.list_objects_v2(**kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise FetchError(f"cannot list {where}/: {exc}") from None
        for item in page.get("Contents", []):
            name = item["Key"][len(prefix) + 1 :]
            if name and "/" not in name:
                sizes[name] = int(item["Size"])
        if not page.get("IsTruncated"):
            return sizes
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def _download(client: Any, bucket: str, key: str, dest: Path, expected: int, retries: int,
              backoff: float) -> int:
    """Download one object to ``dest`` atomically after checking its size and decoding it.

    Returns:
        Bytes written.

    Raises:
        _Corrupt: When the object is missing, its size disagrees with the listing, it
            cannot be decoded, or every attempt failed.
    """
    last = ""
    for attempt in range(retries + 1):
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part{dest.suffix}")
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            length = int(response["ContentLength"])
            if length != expected:
                raise _Corrupt(f"size mismatch: the object is {length} bytes, the bucket listing says {expected}")
            received = 0
            body = response["Body"]
            with open(tmp, "wb") as handle:
                for block in iter(lambda: body.read(_CHUNK), b""):
                    handle.write(block)
                    received += len(block)
            if received != length:
                raise _Retryable(f"received {received} of {length} bytes")
            try:
                read_image(tmp)
            except ImageReadError as exc:
                raise _Corrupt(f"corrupt: {length} bytes as listed, but {str(exc).replace(str(tmp), dest.name)}") from None
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, dest)
            return length
        except _Corrupt:
            raise
        except (BotoCoreError, ClientError, _Retryable, OSError) as exc:
            if isinstance(exc, ClientError) and not _transient(exc):
                code, status = _status(exc)
                raise _Corrupt(f"cannot download: {code or status} ({exc})") from None
            last = str(exc)
            if attempt < retries:
                log.info("%s: %s; retrying (%d of %d)", dest.name, last, attempt + 1, retries)
                _sleep(backoff, attempt)
        finally:
            tmp.unlink(missing_ok=True)
    raise _Corrupt(f"failed after {retries + 1} attempt(s): {last}")


def _sleep(backoff: float, attempt: int) -> None:
    time.sleep(backoff * (2**attempt))


def _remove_partial_files(out: Path) -> None:
    for leftover in out.glob(".*.part*"):
        leftover.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
