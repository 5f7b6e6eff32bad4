"""The HTTP API and web page: :func:`create_app` builds a FastAPI app from :class:`ServeSettings`.

The model is loaded in the app's lifespan (start-up), once, as a :class:`~cellclass.serving.service.Service`;
concurrent prediction requests share forward passes through its
:class:`~cellclass.serving.batching.MicroBatcher`. The endpoints live in the routers of
:mod:`cellclass.serving.routes`; errors are answered as ``{"detail": message}`` with their
status (:mod:`cellclass.serving.handlers`). See ``docs/serving.md``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from cellclass import __version__
from cellclass.serving.gate import RequestGate
from cellclass.serving.handlers import add_exception_handlers
from cellclass.serving.routes import contributions, fields, keys, predict, probes, queue, web
from cellclass.serving.service import Service
from cellclass.serving.settings import ServeSettings

MAX_JSON_BODY = 64 * 1024
"""Largest JSON request body (a curator's review note)."""


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load the service of ``app.state.settings`` before the first request; release it after the last."""
    service = await run_in_threadpool(Service.load, app.state.settings)
    await service.batcher.start()
    app.state.service = service
    try:
        yield
    finally:
        await service.batcher.stop()
        service.close()


def create_app(settings: ServeSettings) -> FastAPI:
    """Build the API and web page for ``settings``; the model loads when the app starts.

    Args:
        settings: What to serve and how (see :class:`ServeSettings`).
    """
    app = FastAPI(
        title="cellclass",
        summary="Predictions and dataset contributions for fluorescence microscopy cell images.",
        description=("Upload TIFF, PNG or NPY images for per-task predictions, or a whole field of view for its "
                     "cells' predictions and the field's answer; contribute labelled images "
                     "for curators to accept into the next training run, or label the images a ranking "
                     "puts first (the labelling queue). Keys travel as "
                     "`Authorization: Bearer KEY` (roles: predict < contribute < curate)."),
        version=__version__,
        lifespan=lifespan,
    )
    # In this order in the OpenAPI document; the gate reads each route's key and body needs.
    routers = [web.router, probes.router, predict.make_router(settings), fields.make_router(settings),
               contributions.make_router(settings), queue.make_router(), keys.router]
    app.state.settings = settings
    app.add_middleware(RequestGate, routes=[route for router in routers for route in router.routes],
                       upload_bytes=settings.max_request_bytes, json_bytes=MAX_JSON_BODY)
    add_exception_handlers(app)
    for router in routers:
        app.include_router(router)
    app.mount("/static", web.static_files(), name="static")
    return app
