"""Training batches, normalized and augmented whole, streamed by worker processes.

The training loop decides *which* rows form each batch (its own seeded generator, saved
in checkpoints so a resumed run sees the same order); :class:`BatchLoader` turns those
row lists into ready tensors: read the rows (from a prepared cache or an in-memory
array), normalize them, apply the batch augmentation, lay them out channels-last. With
``workers > 0`` this happens in persistent worker processes (one torch thread each)
while the model trains on the previous batch.

**Determinism.** Each batch's augmentation is drawn from its own generator, seeded from
the loop's augmentation generator in the main process when the epoch starts. A batch's
pixels therefore do not depend on the number of workers or on which worker made it, and
saving the main generator's state at the end of an epoch is enough to resume.

**Memory.** What the loader holds is bounded by ``max_memory_mb``: the prefetch depth is
chosen so that the batches queued by all workers fit in it (at least one per worker).
Reading from a :class:`~cellclass.data.cache.CachedImages` larger than that bound
releases the pages of every read, keeping the source out of resident memory too, so an
epoch over a cache larger than RAM runs in a bounded footprint (``benchmarks/scale.py``);
a cache within the bound stays mapped, which spares every read its page faults.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from cellclass.allocator import return_large_buffers
from cellclass.data.augment import AugmentConfig, BatchAugment
from cellclass.data.cache import CachedImages
from cellclass.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["BatchLoader", "default_workers"]

_MAX_PREFETCH = 8
_SEED_BOUND = 2**62


def default_workers(images: Any, devices: int = 1) -> int:
    """Worker processes to use when none are configured.

    None (0) for an in-memory array: reading it costs nothing, workers would only add
    start-up time. For a cache, a quarter of the cores per training process, at most
    four: none below four cores, where a worker could only run by preempting the
    training threads, which slows training more than making the batches in-line.
    """
    if isinstance(getattr(images, "images", images), np.ndarray):
        return 0
    return max(0, min(4, (os.cpu_count() or 1) // (4 * max(1, devices))))


class _Batches(Dataset):
    """Maps ``(rows, seed)`` to one normalized, augmented batch tensor."""

    def __init__(self, images: Any, augment: AugmentConfig | None, channels_last: bool) -> None:
        self.images = images
        self.augment = augment
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item: tuple[np.ndarray, int | None]) -> torch.Tensor:
        rows, seed = item
        if self.augment is not None and seed is not None:
            # From in-memory normalized images, each sample is read straight into its
            # augmented form (augment.BatchAugment.take): no copy of the batch in between.
            batch = BatchAugment(self.augment, seed).take(self.images, rows)
        else:
            batch = torch.from_numpy(np.ascontiguousarray(self.images[rows], dtype=np.float32))
        return batch.contiguous(memory_format=self.memory_format)


class _EpochItems(Sampler):
    """The current epoch's ``(rows, seed)`` items; replaced every epoch."""

    def __init__(self) -> None:
        self.items: list[tuple[np.ndarray, int | None]] = []

    def __iter__(self) -> Iterator[tuple[np.ndarray, int | None]]:
        return iter(list(self.items))

    def __len__(self) -> int:
        return len(self.items)


_WORKER_NICENESS = 10


def _init_worker(_: int) -> None:
    # Workers share the cores with the training process: one thread each, or the
    # oversubscription costs more than the workers save. A lower priority lets the
    # training threads run unpreempted (a descheduled thread stalls the others at the
    # next barrier) while the workers fill the time they leave idle.
    torch.set_num_threads(1)
    try:
        os.nice(_WORKER_NICENESS)
    except OSError:  # not permitted here: run at the same priority
        pass
    return_large_buffers()


def _bound_mapped_pages(images: Any, max_memory_mb: float) -> None:
    """Keep a prepared cache that fits in ``max_memory_mb`` mapped; release the others after each read.

    Releasing a cache's pages after every read bounds resident memory whatever its size,
    but each read then faults its pages in again, a visible part of a small network's
    step. A cache no larger than the memory bound cannot map more than the bound, so it
    stays mapped.
    """
    source = getattr(images, "images", images)
    if isinstance(source, CachedImages):
        source.release_each_read = source.nbytes > max_memory_mb * 2**20


class BatchLoader:
    """Turns lists of rows into training batches, in worker processes or in-line.

    Args:
        images: Indexable by an int array, returning float32 ``(n, C, H, W)`` (a
            :class:`~cellclass.data.normalize.NormalizedView`).
        batch_size: Rows per batch (sets the prefetch depth).
        augment: The loop's augmenter: its config is applied to every batch and its
            generator seeds each batch's draws. ``None``: no augmentation.
        workers: Worker processes; 0 reads and augments in the calling process.
        max_memory_mb: Bound on the memory of the batches the workers queue, and on the
            pages of a prepared cache kept mapped: a cache larger than this releases its
            pages after every read, a smaller one stays mapped (it sets the cache's
            ``release_each_read``).
        channels_last: Return channels-last tensors.

    Raises:
        ConfigError: When ``workers`` is negative or ``max_memory_mb`` not positive.
    """

    def __init__(self, images: Any, *, batch_size: int, augment: BatchAugment | None = None, workers: int = 0,
                 max_memory_mb: float = 512, channels_last: bool = False) -> None:
        if workers < 0:
            raise ConfigError(f"loader workers = {workers!r} is invalid; valid: an integer >= 0")
        if max_memory_mb <= 0:
            raise ConfigError(f"loader max_memory_mb = {max_memory_mb!r} is invalid; valid: a number > 0")
        self.augment = augment
        self.workers = int(workers)
        _bound_mapped_pages(images, max_memory_mb)
        self._items = _EpochItems()
        self._dataset = _Batches(images, augment.config if augment is not None else None, channels_last)
        shape = tuple(images.shape)
        self.batch_bytes = int(batch_size * int(np.prod(shape[1:])) * 4)
        self.prefetch = 0
        self._loader: DataLoader | None = None
        if self.workers:
            budget = int(max_memory_mb * 2**20)
            self.prefetch = int(min(_MAX_PREFETCH, max(1, budget // (self.workers * max(1, self.batch_bytes)))))
            if budget < self.workers * self.batch_bytes:
                log.warning("max_memory_mb = %s holds less than one batch per worker (%.1f MB each); "
                            "prefetching one batch per worker", max_memory_mb, self.batch_bytes / 2**20)
            self._loader = DataLoader(
                self._dataset, sampler=self._items, batch_size=None, num_workers=self.workers,
                persistent_workers=True, prefetch_factor=self.prefetch, worker_init_fn=_init_worker,
            )
            log.info("streaming batches with %d worker(s), %d batch(es) prefetched each (%.1f MB per batch)",
                     self.workers, self.prefetch, self.batch_bytes / 2**20)

    @property
    def max_batches_in_flight(self) -> int:
        """Batches queued by the workers at most (0 in-line)."""
        return self.workers * self.prefetch

    def epoch(self, batches: Sequence[np.ndarray]) -> Iterator[torch.Tensor]:
        """Yield one tensor per row list in ``batches``, in order.

        The augmentation seeds of all batches are drawn at once, before the first batch
        is made, so the augmenter's generator state after this call does not depend on
        how far the caller iterates.
        """
        seeds: list[int | None]
        if self.augment is not None:
            draws = torch.randint(_SEED_BOUND, (len(batches),), generator=self.augment.generator)
            seeds = [int(s) for s in draws]
        else:
            seeds = [None] * len(batches)
        items = [(np.asarray(rows, dtype=np.int64), seed) for rows, seed in zip(batches, seeds, strict=True)]
        return self._iterate(items)

    def _iterate(self, items: list[tuple[np.ndarray, int | None]]) -> Iterator[torch.Tensor]:
        if self._loader is None:
            for item in items:
                yield self._dataset[item]
            return
        self._items.items = items
        yield from self._loader

    def close(self) -> None:
        """Stop the worker processes (they also stop when the loader is garbage-collected)."""
        if self._loader is not None:
            iterator = getattr(self._loader, "_iterator", None)
            if iterator is not None and hasattr(iterator, "_shutdown_workers"):
                iterator._shutdown_workers()
            self._loader = None

    def __enter__(self) -> BatchLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
