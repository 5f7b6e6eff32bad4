"""The prepared image cache: decode every image once, read it back at memory speed.

``cellclass prepare`` (:func:`prepare_cache`) applies the deterministic part of
preprocessing once (decoding, channel selection, fitting to ``size x size``) and writes
the result as one ``.npy`` array ``(N, C, S, S)`` plus an index. Training, evaluation and
cross-validation then read batches from it (:class:`CachedImages`) instead of decoding
files: reading a cached image costs about a memory copy, decoding a TIFF or a set of
PNGs costs far more (``benchmarks/data_path.py``, figures in docs/benchmarks.md).

**Dtype.** With ``dtype="keep"`` (the default) an integer image stays in its dtype: a
uint16 BPS nucleus is stored as uint16, resized in float32 and rounded back (at most half
a grey level from the in-memory float path). Float sources are stored as float32; boolean
ones as uint8. ``dtype="float32"`` stores exactly what
:func:`cellclass.data.resize.load_images` returns. Normalization is *not* cached: it is
fitted on each run's training split and applied per batch.

**Key.** A cache lives in ``CACHE_DIR/<slot>-<fingerprint>/``. The *slot* hashes the
settings (size, fit, channels, dtype), the image root and the ordered list of source
files, so another row selection (``--where``) or setting gets its own cache. The
*fingerprint* hashes every source file's size and modification time (``hash="stat"``,
the default) or its bytes (``hash="content"``, for file systems whose times cannot be
trusted); for an OME-Zarr image, the files of its metadata and of its full-resolution
chunks (:func:`cellclass.data.io.image_files`). A cache whose fingerprint no longer matches the files is never used, and the
next build replaces it.

**Atomicity.** A build writes into ``.partial-<slot>-<fingerprint>/`` and renames it into
place only when complete, so a cache folder is either absent or whole. The partial folder
records how many rows are safely written (data synced before the count), so a killed
``prepare`` resumes where it stopped; one build per slot runs at a time (a file lock).

**Memory.** Builds write with ``pwrite`` in chunks; reads go through a memory map whose
pages are released right after each read (``madvise(MADV_DONTNEED)``), so neither grows a
process's resident memory with the dataset's size: training on a cache larger than RAM
works (``benchmarks/scale.py``). Releasing after every read matters: the kernel maps
whole page-cache folios (up to 2 MB on recent kernels) around each row touched, so a few
thousand random rows would otherwise map gigabytes. The training loader keeps a cache
no larger than its memory bound (``loader_memory_mb``) mapped instead: it cannot map more
than that, and its reads then skip the page faults.

Where: ``cache_dir`` argument, else ``$CELLCLASS_CACHE_DIR``, else a ``.cellclass-cache/``
folder beside the manifest (beside the image folder for ``folder`` layouts).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import mmap
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cellclass.atomic import atomic_path, atomic_write_text
from cellclass.data.io import image_files
from cellclass.data.resize import FIT_MODES, fit_image, load_images, select_channels
from cellclass.data.spec import ROW_COLUMN, DatasetSpec
from cellclass.errors import CacheError, ImageReadError
from cellclass.progress import ProgressFn

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

log = logging.getLogger(__name__)

__all__ = [
    "CACHE_DIR_ENV",
    "CACHE_FOLDER",
    "CacheSettings",
    "CachedImages",
    "PreparedCache",
    "find_cache",
    "images_for_training",
    "iter_images",
    "prepare_cache",
    "resolve_cache_dir",
]

CACHE_DIR_ENV = "CELLCLASS_CACHE_DIR"
"""Environment variable naming the folder of prepared caches."""

CACHE_FOLDER = ".cellclass-cache"
"""Default cache folder name, created beside the manifest."""

DTYPES = ("keep", "float32")
"""Valid :attr:`CacheSettings.dtype` values."""

HASH_MODES = ("stat", "content")
"""Valid :attr:`CacheSettings.hash` values."""

FORMAT_VERSION = 1
_CHUNK_BYTES = 32 * 2**20



@dataclass(frozen=True)
class CacheSettings:
    """The preprocessing a cache holds.

    Attributes:
        image_size: Side of the square images stored.
        fit: How images become square: ``pad``, ``resize`` or ``crop``
            (see :func:`cellclass.data.resize.fit_image`).
        channels: Channel indices kept, in order (all when ``None``).
        dtype: ``keep`` (the source's integer dtype, float32 for float sources) or
            ``float32``.
        hash: How source files are fingerprinted: ``stat`` (size and modification time)
            or ``content`` (SHA-256 of their bytes).
    """

    image_size: int
    fit: str = "pad"
    channels: tuple[int, ...] | None = None
    dtype: str = "keep"
    hash: str = "stat"

    def __post_init__(self) -> None:
        if not isinstance(self.image_size, (int, np.integer)) or self.image_size < 1:
            raise CacheError(f"cache image_size {self.image_size!r} is invalid; valid: an integer >= 1")
        if self.fit not in FIT_MODES:
            raise CacheError(f"cache fit mode {self.fit!r} is invalid; valid: {', '.join(FIT_MODES)}")
        if self.dtype not in DTYPES:
            raise CacheError(f"cache dtype {self.dtype!r} is invalid; valid: {', '.join(DTYPES)}")
        if self.hash not in HASH_MODES:
            raise CacheError(f"cache hash {self.hash!r} is invalid; valid: {', '.join(HASH_MODES)}")
        if self.channels is not None:
            channels = tuple(int(c) for c in self.channels)
            if not channels or any(c < 0 for c in channels):
                raise CacheError(f"cache channels {list(self.channels)!r} are invalid; valid: indices >= 0")
            object.__setattr__(self, "channels", channels)

    def preprocessing(self) -> dict[str, Any]:
        """The settings that change the stored pixels (``hash`` does not)."""
        return {"image_size": int(self.image_size), "fit": self.fit,
                "channels": None if self.channels is None else list(self.channels), "dtype": self.dtype}


# -- reading -----------------------------------------------------------------------------
class CachedImages:
    """A read-only ``(N, C, S, S)`` array in a ``.npy`` file, read without holding it.

    Indexing (an int, a slice, an int array or a boolean mask over rows) returns a new
    in-memory array, as indexing a ``numpy.memmap`` would. The pages a read maps are
    released as soon as it is copied out, so the process's resident memory stays bounded
    (by one read's rows times the page-cache folio size) whatever the file's size; the
    data stay in the operating system's page cache for the next epoch. Pickling keeps
    only the path, so data-loader workers reopen the file themselves.

    Args:
        path: ``.npy`` file written by :func:`prepare_cache`.
        release: Release the mapped pages after every read (``False`` keeps them mapped,
            as a plain memory map does, and lets resident memory grow with what was read).

    Raises:
        CacheError: When the file is not a readable 4-D ``.npy`` array.
    """

    def __init__(self, path: str | os.PathLike[str], release: bool = True) -> None:
        self.path = Path(path)
        self.release_each_read = bool(release)
        try:
            header = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise CacheError(f"cannot read cache array {str(self.path)!r}: {exc}; run `cellclass prepare` again") from None
        if header.ndim != 4:
            raise CacheError(f"cache array {str(self.path)!r} has shape {header.shape}; valid: (N, C, S, S)")
        self.shape: tuple[int, ...] = tuple(header.shape)
        self.dtype = header.dtype
        self.offset = int(header.offset)
        del header
        self._mmap: mmap.mmap | None = None
        self._array: np.ndarray | None = None
        self._pid = -1

    @property
    def ndim(self) -> int:
        """Number of dimensions (4)."""
        return 4

    @property
    def nbytes(self) -> int:
        """Size of the whole array in bytes."""
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"CachedImages({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "release_each_read": self.release_each_read, "shape": self.shape,
                "dtype": self.dtype, "offset": self.offset}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._mmap, self._array, self._pid = None, None, -1

    def _view(self) -> np.ndarray:
        if self._array is None or self._pid != os.getpid():
            with open(self.path, "rb") as handle:
                self._mmap = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            self._array = np.ndarray(self.shape, self.dtype, buffer=self._mmap, offset=self.offset)
            self._pid = os.getpid()
        return self._array

    def __getitem__(self, index: Any) -> np.ndarray:
        view = self._view()
        if isinstance(index, tuple):
            raise CacheError(f"CachedImages takes a row index, got the tuple {index!r}; index rows, then slice the result")
        if isinstance(index, (list, np.ndarray)):
            rows = np.asarray(index)
            if rows.dtype == bool:
                rows = np.flatnonzero(rows)
            out = view[rows.astype(np.int64, copy=False)]
        else:
            out = np.array(view[index])
        if self.release_each_read:
            self.release()
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = self[slice(None)]
        return out if dtype is None else out.astype(dtype, copy=False)

    def release(self) -> None:
        """Drop this process's mapped pages (the page cache keeps the data)."""
        if self._mmap is not None and hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED)

    def memmap(self) -> np.memmap:
        """The whole array as a read-only :class:`numpy.memmap` (pages are never released)."""
        return np.load(self.path, mmap_mode="r")


def iter_images(images: Any, rows: Sequence[int] | np.ndarray, chunk: int = 256) -> Iterator[np.ndarray]:
    """Yield ``images[i]`` for every ``i`` in ``rows``, reading ``chunk`` rows at a time.

    Lets code that needs every training image once (fitting a normalizer) run over a
    cache without holding the training set in memory.
    """
    rows = np.asarray(rows, dtype=np.int64)
    for start in range(0, len(rows), chunk):
        block = images[rows[start : start + chunk]]
        yield from block


@dataclass
class PreparedCache:
    """A complete cache on disk.

    Attributes:
        path: The cache folder (``images.npy``, ``index.csv``, ``meta.json``).
        meta: Contents of ``meta.json``: key, settings, shape, dtype, source fingerprint.
        built: Whether the call that returned this cache built it.
        resumed_from: Rows already written by an interrupted build that this one resumed.
    """

    path: Path
    meta: dict[str, Any]
    built: bool = False
    resumed_from: int = 0

    @property
    def key(self) -> str:
        """The cache key: ``<slot>-<fingerprint>``."""
        return str(self.meta["key"])

    @property
    def images(self) -> CachedImages:
        """The cached ``(N, C, S, S)`` array."""
        return CachedImages(self.path / "images.npy")

    @property
    def index(self) -> pd.DataFrame:
        """One row per image: position, manifest row, image id, source shape and dtype."""
        return pd.read_csv(self.path / "index.csv", dtype={"image_id": str})


# -- locations and keys -------------------------------------------------------------------
def resolve_cache_dir(spec: DatasetSpec, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Folder holding ``spec``'s caches: ``cache_dir``, ``$CELLCLASS_CACHE_DIR`` or the default.

    The default is ``.cellclass-cache/`` beside the manifest; for a ``folder`` layout
    (no manifest) beside the image folder, so the cache is never mistaken for a class.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser().resolve()
    env = os.environ.get(CACHE_DIR_ENV)
    if env:
        return Path(env).expanduser().resolve()
    if spec.manifest_path is not None:
        return spec.manifest_path.parent / CACHE_FOLDER
    return spec.image_root.parent / CACHE_FOLDER


def _sha(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


class _Sources:
    """The ordered source files of a manifest's rows and their fingerprints."""

    def __init__(self, spec: DatasetSpec, frame: pd.DataFrame) -> None:
        self.spec = spec
        self.records = frame.to_dict("records")
        self.paths = [[str(p) for p in spec.image_paths(r)] for r in self.records]
        self._stat: str | None = None
        self._content: str | None = None

    def stat_digest(self) -> str:
        if self._stat is None:
            self._stat = self._stat_digest()
        return self._stat

    def _stat_digest(self) -> str:
        h = hashlib.sha256()
        for record, paths in zip(self.records, self.paths, strict=True):
            for p in paths:
                try:
                    for f in image_files(p):  # an OME-Zarr image: its metadata and level-0 chunks
                        st = os.stat(f)
                        h.update(f"{st.st_size}:{st.st_mtime_ns}\n".encode())
                except OSError as exc:
                    raise ImageReadError(
                        f"row {record.get(ROW_COLUMN, '?')}: cannot read image {p!r}: {exc.strerror or exc} "
                        "(run `cellclass validate`)"
                    ) from None
        return h.hexdigest()

    def content_digest(self, workers: int = 4) -> str:
        if self._content is None:
            flat = [(r, p) for r, ps in zip(self.records, self.paths, strict=True) for p in ps]

            def digest(item: tuple[dict[str, Any], str]) -> str:
                record, p = item
                h = hashlib.sha256()
                try:
                    for f in image_files(p):
                        with open(f, "rb") as handle:
                            for block in iter(lambda handle=handle: handle.read(2**20), b""):
                                h.update(block)
                except OSError as exc:
                    raise ImageReadError(
                        f"row {record.get(ROW_COLUMN, '?')}: cannot read image {p!r}: {exc.strerror or exc} "
                        "(run `cellclass validate`)"
                    ) from None
                return h.hexdigest()

            total = hashlib.sha256()
            with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
                for d in pool.map(digest, flat):
                    total.update(d.encode())
            self._content = total.hexdigest()
        return self._content

    def digest(self, mode: str, workers: int = 4) -> str:
        return self.stat_digest() if mode == "stat" else self.content_digest(workers)


def _slot(spec: DatasetSpec, sources: _Sources, settings: CacheSettings) -> str:
    key: dict[str, Any] = {"format": FORMAT_VERSION, "settings": settings.preprocessing(),
                           "image_root": str(spec.image_root), "paths": sources.paths}
    # How stacks, series and channels are read changes the pixels; the key of a spec that
    # declares nothing about them stays as it was.
    axes = spec.image.axes_policy().to_dict()
    if spec.image.series_column:
        axes["series"] = [str(r[spec.image.series_column]) for r in sources.records]
    if axes:
        key["axes"] = axes
    return _sha(key)[:16]


def _folder_name(slot: str, mode: str, digest: str) -> str:
    return f"{slot}-{mode[0]}{digest[:16]}"


# -- finding ------------------------------------------------------------------------------
def find_cache(spec: DatasetSpec, settings: CacheSettings, *, frame: pd.DataFrame | None = None,
               cache_dir: str | os.PathLike[str] | None = None, any_hash: bool = False,
               workers: int = 4) -> PreparedCache | None:
    """Return the valid cache of ``spec``'s rows for ``settings``, or ``None``.

    A cache is valid when its folder is complete and its recorded fingerprint matches
    the source files now. Costs nothing when no cache of this slot exists; otherwise one
    ``stat`` per file (or a read of every file for content-hashed caches).

    Args:
        spec: Dataset.
        settings: Preprocessing asked for.
        frame: The manifest rows, in order (default: ``spec.load_manifest()``).
        cache_dir: Cache folder (see :func:`resolve_cache_dir`).
        any_hash: Accept a cache fingerprinted either way, not only by ``settings.hash``.
        workers: Threads hashing file contents.
    """
    frame = spec.load_manifest() if frame is None else frame
    sources = _Sources(spec, frame)
    root = resolve_cache_dir(spec, cache_dir)
    return _find(root, _slot(spec, sources, settings), sources, settings, any_hash, workers)


def _find(root: Path, slot: str, sources: _Sources, settings: CacheSettings, any_hash: bool,
          workers: int) -> PreparedCache | None:
    if not root.is_dir():
        return None
    for folder in sorted(root.glob(f"{slot}-*")):
        meta = _read_meta(folder)
        if meta is None:
            continue
        mode = meta.get("hash")
        if mode not in HASH_MODES or (not any_hash and mode != settings.hash):
            continue
        try:
            digest = sources.digest(mode, workers)
        except ImageReadError:
            return None
        if meta.get("fingerprint") == digest and folder.name == _folder_name(slot, mode, digest):
            return PreparedCache(folder, meta)
        log.info("cache %s is stale: a source file changed since it was prepared", folder)
    return None


def _read_meta(folder: Path) -> dict[str, Any] | None:
    """``meta.json`` of a complete cache folder, or ``None`` when it is not one."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("format") != FORMAT_VERSION or not (folder / "images.npy").is_file():
        return None
    return meta


# -- building -----------------------------------------------------------------------------
def prepare_cache(
    spec: DatasetSpec,
    settings: CacheSettings,
    *,
    frame: pd.DataFrame | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    workers: int = 4,
    progress: ProgressFn | None = None,
    rebuild: bool = False,
    chunk_rows: int | None = None,
) -> PreparedCache:
    """Build the cache of ``spec``'s rows for ``settings``, or return the valid one.

    Args:
        spec: Dataset.
        settings: Preprocessing to apply.
        frame: The manifest rows, in order (default: ``spec.load_manifest()``); the
            cache's rows follow it.
        cache_dir: Cache folder (see :func:`resolve_cache_dir`).
        workers: Decoding threads (the decoders release the GIL).
        progress: Called as ``progress("preparing cache", rows_done, rows_total)`` after each chunk.
        rebuild: Build again even when a valid cache exists.
        chunk_rows: Rows decoded and written per chunk (default: about 32 MB worth).

    Returns:
        The complete cache; ``built`` says whether this call wrote it.

    Raises:
        ImageReadError: When an image cannot be read or its channel count differs from
            the first image's; the message names the row.
        CacheError: When the images' dtypes cannot share one array with ``dtype="keep"``,
            or a source file changed while the cache was being written.
    """
    frame = spec.load_manifest() if frame is None else frame
    if not len(frame):
        raise CacheError(f"dataset {spec.name!r} has no row to prepare; check its manifest and --where filters")
    if chunk_rows is not None and chunk_rows < 1:
        raise CacheError(f"chunk_rows {chunk_rows!r} is invalid; valid: an integer >= 1")
    sources = _Sources(spec, frame)
    root = resolve_cache_dir(spec, cache_dir)
    slot = _slot(spec, sources, settings)
    root.mkdir(parents=True, exist_ok=True)
    with _slot_lock(root, slot):
        if not rebuild:
            found = _find(root, slot, sources, settings, False, workers)
            if found is not None:
                log.info("cache %s is up to date (%d images)", found.path, found.meta["shape"][0])
                return found
        digest = sources.digest(settings.hash, workers)
        name = _folder_name(slot, settings.hash, digest)
        return _build(spec, sources, settings, root, slot, name, digest, workers, progress, chunk_rows)


@contextlib.contextmanager
def _slot_lock(root: Path, slot: str) -> Iterator[None]:
    """One build per slot at a time, across processes (released when a process dies)."""
    if fcntl is None:  # pragma: no cover - not POSIX: no cross-process lock
        yield
        return
    with open(root / f".lock-{slot}", "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process preparing the same cache in %s", root)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _store_dtype(source: np.dtype, settings: CacheSettings) -> np.dtype:
    if settings.dtype == "float32" or source.kind == "f":
        return np.dtype(np.float32)
    if source.kind == "b":
        return np.dtype(np.uint8)
    return np.dtype(source)


def _build(spec: DatasetSpec, sources: _Sources, settings: CacheSettings, root: Path, slot: str,
           name: str, digest: str, workers: int, progress: ProgressFn | None,
           chunk_rows: int | None) -> PreparedCache:
    """Write the cache ``name`` into ``root``: start (or resume) its partial folder, write
    its rows chunk by chunk, describe it, and put it in place of the slot's stale caches."""
    stat_before = sources.stat_digest()
    build = _start_build(spec, sources, settings, root, slot, name)
    started = time.perf_counter()
    resumed = build.done
    if resumed:
        log.info("resuming the interrupted build of %s at row %d of %d", name, resumed, len(build.records))
    _write_rows(build, workers, chunk_rows, progress)
    if sources._stat_digest() != stat_before:
        shutil.rmtree(build.partial, ignore_errors=True)
        raise CacheError(f"source images of dataset {spec.name!r} changed while the cache was being "
                         "prepared; run `cellclass prepare` again once they are stable")
    _write_index(build)
    meta = {
        "format": FORMAT_VERSION,
        "key": name,
        "dataset": spec.name,
        "settings": settings.preprocessing(),
        "axes": spec.image.axes_policy().to_dict(),
        "hash": settings.hash,
        "fingerprint": digest,
        "n_files": sum(len(p) for p in sources.paths),
        "shape": list(build.shape),
        "dtype": build.dtype.str,
        "source_dtype": str(build.first_raw.dtype),
        "image_root": str(spec.image_root),
        "manifest": None if spec.manifest_path is None else str(spec.manifest_path),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "build_seconds": round(time.perf_counter() - started, 3),
        "resumed_from": resumed,
    }
    atomic_write_text(build.partial / "meta.json", json.dumps(meta, indent=2))
    (build.partial / "progress.json").unlink(missing_ok=True)
    final = _publish(build.partial, root, slot, name, settings)
    log.info("prepared %d images %s %s in %s (%.1f s)", len(build.records), "x".join(map(str, build.shape[1:])),
             build.dtype, final, meta["build_seconds"])
    return PreparedCache(final, meta, built=True, resumed_from=resumed)


@dataclass
class _Build:
    """A cache being written: its partial folder, its array's layout, and how far it got."""

    spec: DatasetSpec
    settings: CacheSettings
    records: list[dict[str, Any]]
    partial: Path
    state: dict[str, Any]
    first_raw: np.ndarray
    first: np.ndarray
    dtype: np.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.state["shape"])

    @property
    def done(self) -> int:
        return int(self.state["done"])

    @property
    def row_bytes(self) -> int:
        return int(np.prod(self.shape[1:])) * self.dtype.itemsize

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Row ``i`` as decoded and as stored.

        Raises:
            CacheError: When its dtype does not fit the cache's without loss.
            ImageReadError: When it cannot be read or has another channel count than the first.
        """
        record, settings = self.records[i], self.settings
        raw = self.first_raw if i == 0 else _read_row(self.spec, record)
        lossy = raw.dtype != self.first_raw.dtype and not np.can_cast(raw.dtype, self.dtype, "safe")
        if settings.dtype == "keep" and lossy:
            raise CacheError(
                f"row {record.get(ROW_COLUMN, '?')}: image dtype {raw.dtype} cannot be stored in the "
                f"cache's {self.dtype} (from the first image) without loss; valid: images of one dtype, "
                "or --dtype float32"
            )
        channels = list(settings.channels) if settings.channels is not None else None
        image = self.first if i == 0 else fit_image(select_channels(raw, channels), settings.image_size, settings.fit)
        if image.shape != self.first.shape:
            raise ImageReadError(
                f"row {record.get(ROW_COLUMN, '?')}: image has {image.shape[0]} channel(s), the first "
                f"row has {self.first.shape[0]}; run `cellclass validate`"
            )
        return raw, _to_dtype(image, self.dtype)


def _start_build(spec: DatasetSpec, sources: _Sources, settings: CacheSettings, root: Path, slot: str,
                 name: str) -> _Build:
    """The partial folder of cache ``name``: an interrupted build of the same array resumed,
    any other partial build of the slot removed, else a new sparse array."""
    for stale in root.glob(f".partial-{slot}-*"):
        if stale.name != f".partial-{name}":
            shutil.rmtree(stale, ignore_errors=True)
    partial = root / f".partial-{name}"
    state = _read_state(partial, name)
    records = sources.records
    channels = list(settings.channels) if settings.channels is not None else None
    first_raw = _read_row(spec, records[0])
    first = fit_image(select_channels(first_raw, channels), settings.image_size, settings.fit)
    dtype = _store_dtype(first_raw.dtype, settings)
    shape = (len(records), *first.shape)
    if state is not None and (tuple(state["shape"]) != shape or state["dtype"] != dtype.str):
        log.info("discarding an interrupted build of another shape in %s", partial)
        state = None
    if state is None:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        offset = _create_array(partial / "images.npy", shape, dtype)
        state = {"key": name, "shape": list(shape), "dtype": dtype.str, "offset": offset, "done": 0}
        _write_state(partial, state)
    return _Build(spec, settings, records, partial, state, first_raw, first, dtype)


def _write_rows(build: _Build, workers: int, chunk_rows: int | None, progress: ProgressFn | None) -> None:
    """Decode and write the rows not yet done, a chunk at a time, each chunk on disk before
    the progress file counts it (so that a build cut short resumes after its last chunk)."""
    n, done, row_bytes = len(build.records), build.done, build.row_bytes
    chunk = chunk_rows or max(1, _CHUNK_BYTES // row_bytes)
    fd = os.open(build.partial / "images.npy", os.O_RDWR)
    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            while done < n:
                stop = min(n, done + chunk)
                block = np.empty((stop - done, *build.shape[1:]), dtype=build.dtype)
                described = []
                for j, (raw, image) in enumerate(pool.map(build.row, range(done, stop))):
                    block[j] = image
                    described.append(["x".join(map(str, raw.shape)), str(raw.dtype)])
                _pwrite_all(fd, memoryview(block).cast("B"), build.state["offset"] + done * row_bytes)
                os.fsync(fd)  # the rows are on disk before the count that vouches for them
                atomic_write_text(build.partial / f"rows-{done:012d}.json", json.dumps(described))
                done = stop
                build.state = {**build.state, "done": done}
                _write_state(build.partial, build.state)
                if progress is not None:
                    progress("preparing cache", done, n)
    finally:
        os.close(fd)


def _write_index(build: _Build) -> None:
    """``index.csv``: each row's position, manifest row, image id, and source shape and dtype.

    Raises:
        CacheError: When the chunks written do not describe every row (the partial folder
            is removed).
    """
    n, records = len(build.records), build.records
    described = []
    for part in sorted(build.partial.glob("rows-*.json")):
        described += json.loads(part.read_text())
        part.unlink()
    if len(described) != n:
        shutil.rmtree(build.partial, ignore_errors=True)
        raise CacheError(f"the interrupted build in {str(build.partial)!r} was inconsistent ({len(described)} rows "
                         f"described for {n}); it was removed: run `cellclass prepare` again")
    index = pd.DataFrame({
        "position": np.arange(n),
        ROW_COLUMN: [r.get(ROW_COLUMN, i + 1) for i, r in enumerate(records)],
        "image_id": [build.spec.image_id(r) for r in records],
        "source_shape": [d[0] for d in described],
        "source_dtype": [d[1] for d in described],
    })
    with atomic_path(build.partial / "index.csv") as tmp:
        index.to_csv(tmp, index=False)


def _publish(partial: Path, root: Path, slot: str, name: str, settings: CacheSettings) -> Path:
    """Rename the finished ``partial`` folder to ``root / name``; remove the slot's other caches
    of the same fingerprint mode (stale versions of these rows and settings)."""
    final = root / name
    if final.exists():  # the same key built before and deleted in part: replace it whole
        shutil.rmtree(final)
    os.rename(partial, final)
    _fsync_dir(root)
    mode_prefix = f"{slot}-{settings.hash[0]}"
    for old in root.glob(f"{mode_prefix}*"):
        if old != final and old.is_dir():
            log.info("removing the stale cache %s", old)
            shutil.rmtree(old, ignore_errors=True)
    return final


def _read_row(spec: DatasetSpec, record: dict[str, Any]) -> np.ndarray:
    try:
        return spec.read_image(record)
    except ImageReadError as exc:
        raise ImageReadError(f"row {record.get(ROW_COLUMN, '?')}: {exc} (run `cellclass validate`)") from None


def _to_dtype(image: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.kind in "ui":
        info = np.iinfo(dtype)
        image = np.clip(np.rint(image), info.min, info.max)
    return image.astype(dtype, copy=False)


def _create_array(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> int:
    """Write a ``.npy`` header and extend the file to its full (sparse) size; return the data offset."""
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape}
    with open(path, "wb") as handle:
        np.lib.format.write_array_header_2_0(handle, header)
        offset = handle.tell()
        handle.truncate(offset + int(np.prod(shape)) * dtype.itemsize)
    return offset


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _read_state(partial: Path, name: str) -> dict[str, Any] | None:
    try:
        state = json.loads((partial / "progress.json").read_text())
    except (OSError, ValueError):
        return None
    if state.get("key") != name or not (partial / "images.npy").is_file():
        return None
    return state


def _write_state(partial: Path, state: dict[str, Any]) -> None:
    atomic_write_text(partial / "progress.json", json.dumps(state))


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- the training hook --------------------------------------------------------------------
def images_for_training(
    spec: DatasetSpec,
    frame: pd.DataFrame,
    *,
    size: int,
    mode: str = "pad",
    channels: Sequence[int] | None = None,
    workers: int = 4,
    build: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    progress: ProgressFn | None = None,
) -> np.ndarray | CachedImages:
    """The images of ``frame``'s rows at ``size``: from a valid cache when there is one.

    Looks for a valid cache of these rows and settings (``dtype`` ``keep`` first, then
    ``float32``; either fingerprint). Without one, builds it when ``build`` is true, and
    otherwise decodes every image into memory with
    :func:`~cellclass.data.resize.load_images`.

    Returns:
        A :class:`CachedImages` reader over the cache, or an in-memory float32 array.
    """
    channels = tuple(channels) if channels else None
    sources = _Sources(spec, frame)
    root = resolve_cache_dir(spec, cache_dir)
    for dtype in DTYPES:
        settings = CacheSettings(size, mode, channels, dtype)
        found = _find(root, _slot(spec, sources, settings), sources, settings, True, workers)
        if found is not None:
            log.info("reading images from the prepared cache %s", found.path)
            return found.images
    if build:
        return prepare_cache(spec, CacheSettings(size, mode, channels), frame=frame, cache_dir=cache_dir,
                             workers=workers, progress=progress).images
    return load_images(spec, frame, size=size, mode=mode, channels=channels, workers=workers, progress=progress)
