"""A small asyncio micro-batcher: concurrent requests share one forward pass.

Requests put their normalized images on a queue and await a future. One consumer task
takes the first waiting request, gathers more until ``max_batch`` images are queued or
``max_wait_ms`` have passed, runs the model once on the concatenated batch in a worker
thread (one at a time, so inference never competes with itself for cores), and hands
each request its rows. While a batch runs, newcomers queue up and form the next one, so
batches grow with the load and a lone request waits at most ``max_wait_ms``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

InferFn = Callable[[np.ndarray], dict[str, np.ndarray]]


@dataclass
class BatchStats:
    """Counters of the batches run so far."""

    batches: int = 0
    images: int = 0
    requests: int = 0
    largest: int = 0
    busy_seconds: float = 0.0

    def as_dict(self) -> dict[str, float]:
        """Plain-dict form, with the mean batch size."""
        return {"batches": self.batches, "images": self.images, "requests": self.requests,
                "largest_batch": self.largest, "mean_batch": round(self.images / self.batches, 3) if self.batches else 0.0,
                "busy_seconds": round(self.busy_seconds, 3)}


@dataclass
class _Item:
    x: np.ndarray
    future: asyncio.Future[dict[str, np.ndarray]]
    queued_at: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Batch concurrent calls of ``infer`` (normalized ``(N, C, S, S)`` in, per-task arrays out).

    Args:
        infer: The batched function, e.g. ``Predictor.predict_normalized``.
        max_batch: Most images in one call (a single larger request runs alone).
        max_wait_ms: Longest time the first request of a batch waits for company.
    """

    def __init__(self, infer: InferFn, *, max_batch: int = 32, max_wait_ms: float = 2.0) -> None:
        self.infer = infer
        self.max_batch = max_batch
        self.max_wait = max_wait_ms / 1000.0
        self.stats = BatchStats()
        self._queue: asyncio.Queue[_Item] | None = None
        self._task: asyncio.Task[None] | None = None
        self._executor: ThreadPoolExecutor | None = None

    @property
    def running(self) -> bool:
        """Whether the consumer task is alive."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the consumer task (in the running event loop)."""
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cellclass-infer")
        self._task = asyncio.create_task(self._run(), name="cellclass-micro-batcher")

    async def stop(self) -> None:
        """Stop the consumer; requests still queued fail with :class:`RuntimeError`."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while self._queue is not None and not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(RuntimeError("the server is shutting down"))
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        self._task = None

    async def submit(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Queue a normalized batch and wait for its outputs.

        Raises:
            RuntimeError: When the batcher is not running.
            Exception: Whatever ``infer`` raised for the batch this request was part of.
        """
        if self._queue is None or not self.running:
            raise RuntimeError("the micro-batcher is not running; call start() first")
        future: asyncio.Future[dict[str, np.ndarray]] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Item(x, future))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None  # set by start()
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            size = len(items[0].x)
            deadline = loop.time() + self.max_wait
            while size < self.max_batch:
                try:
                    if self._queue.empty():
                        remaining = deadline - loop.time()
                        if remaining <= 0:
                            break
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    else:
                        item = self._queue.get_nowait()
                except TimeoutError:
                    break
                if size + len(item.x) > self.max_batch:
                    # Too big to join: it starts the next batch instead.
                    await self._run_batch(loop, items)
                    items, size = [item], len(item.x)
                    deadline = loop.time() + self.max_wait
                    continue
                items.append(item)
                size += len(item.x)
            await self._run_batch(loop, items)

    async def _run_batch(self, loop: asyncio.AbstractEventLoop, items: list[_Item]) -> None:
        live = [i for i in items if not i.future.done()]  # a client may have gone away
        if not live:
            return
        x = live[0].x if len(live) == 1 else np.concatenate([i.x for i in live])
        started = time.perf_counter()
        try:
            outputs = await loop.run_in_executor(self._executor, self.infer, x)
        except Exception as exc:  # noqa: BLE001 (handed to every waiting request, which reports it)
            for item in live:
                if not item.future.done():
                    item.future.set_exception(exc)
            return
        finally:
            self.stats.busy_seconds += time.perf_counter() - started
        self.stats.batches += 1
        self.stats.images += len(x)
        self.stats.requests += len(live)
        self.stats.largest = max(self.stats.largest, len(x))
        start = 0
        for item in live:
            n = len(item.x)
            if not item.future.done():
                item.future.set_result({k: v[start : start + n] for k, v in outputs.items()})
            start += n
