"""The labelling queue: ranked images to label one by one (``/v1/queue``), on a server started with ``--queue``.

Labelling an item contributes its image with the labels given, as ``POST /v1/contributions``
does (pending until a curator reviews it); the queue records which key labelled which item.
"""

import functools
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Response
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool

from cellclass.serving import schemas
from cellclass.serving.dependencies import QueueDep, ServiceDep, require
from cellclass.serving.display import display_npy
from cellclass.serving.keys import ApiKey
from cellclass.serving.labelling import LabellingQueue, QueueItem

MAX_INDEX = 2**31 - 1
"""Largest rank, ``after`` and ``offset`` (a bound the database's integers hold)."""

QueueRank = Annotated[int, PathParam(ge=1, le=MAX_INDEX, description="The item's rank (1 = ask first).")]
ContributeKey = Annotated[ApiKey, require("contribute")]
MaxSide = Annotated[int, Query(ge=16, le=4096, description=(
    "Largest height or width sent; a larger image is reduced by averaging blocks of pixels."))]

NO_QUEUE = {404: "No labelling queue on this server, or no item of that rank."}
NPY_CONTENT = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}


def item_body(described: dict[str, Any]) -> dict[str, Any]:
    """A :class:`~cellclass.serving.schemas.QueueItem` body of one :meth:`LabellingQueue.describe` result."""
    item: QueueItem = described["item"]
    return {"rank": item.rank, "image": item.image, "score": item.score, "strategy": item.strategy,
            "tasks": item.tasks, "labels": described["labels"], "labelled_by_me": described["labelled_by_me"]}


def queue_info(queue: LabellingQueue) -> dict[str, Any]:
    """The :class:`~cellclass.serving.schemas.QueueInfo` of ``queue``."""
    return {"ranking": queue.source.name, "size": len(queue.items), "strategies": queue.strategies}


async def list_queue(
    queue: QueueDep,
    key: ContributeKey,
    unlabelled_by: Annotated[Literal["anyone", "me"], Query(description=(
        "anyone: leave out items any key labelled; me: leave out only those the calling key labelled."))] = "anyone",
    after: Annotated[int, Query(ge=0, le=MAX_INDEX, description="Only items ranked after this rank.")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 20,
    offset: Annotated[int, Query(ge=0, le=MAX_INDEX)] = 0,
) -> dict[str, Any]:
    """The next items to label, in rank order, with the model's guess and probabilities."""
    page = await run_in_threadpool(functools.partial(queue.page, key.key_id, unlabelled_by=unlabelled_by,
                                                     after=after, offset=offset, limit=limit))
    return {"queue": queue_info(queue), "unlabelled_by": unlabelled_by, "total": page["total"],
            "labelled": page["labelled"], "limit": limit, "offset": offset, "after": after,
            "items": [item_body(d) for d in page["items"]]}


async def get_item(queue: QueueDep, rank: QueueRank, key: ContributeKey) -> dict[str, Any]:
    """One item of the queue, labelled or not."""
    item = queue.item(rank)
    return item_body(await run_in_threadpool(queue.describe, item, None, key.key_id))


async def item_image(service: ServiceDep, queue: QueueDep, rank: QueueRank, _key: ContributeKey,
                     max_side: MaxSide = 1024) -> Response:
    """The item's image for display: an NPY file of ``(C, H, W)`` in its own dtype (8 or 16 bits kept).

    Other integer images come as 16 bits where their values fit, else float32, as do
    floating-point ones. Headers give the original shape and dtype and the reduction factor.
    """
    item = queue.item(rank)

    def work() -> tuple[bytes, dict[str, str]]:
        return display_npy(service.queue_upload(item).image, max_side)

    data, headers = await service.run_cpu(work)
    headers["Content-Disposition"] = f'inline; filename="queue-{rank}.npy"'
    return Response(data, media_type="application/octet-stream", headers=headers)


async def label_item(service: ServiceDep, queue: QueueDep, rank: QueueRank, key: ContributeKey,
                     body: schemas.QueueLabel, response: Response) -> dict[str, Any]:
    """Label the item: its image becomes a pending contribution with these labels (201; 200 when it existed)."""
    item = queue.item(rank)
    existing = await run_in_threadpool(queue.label_of, item, key.key_id)
    if existing is not None:  # answered before the image is read; the transaction below checks again
        raise queue.already_labelled(item, key.key_id, existing)
    upload, labels = await service.run_cpu(service.check_queue_label, item, body.labels)
    record, created = await run_in_threadpool(functools.partial(
        service.contributions.add, upload, labels, item.metadata(queue.source.name), contributor=key.key_id,
        dataset=service.dataset_id, model=service.identity, also=queue.recorder(item, key.key_id)))
    if not created:
        response.status_code = 200
    return {**record, "duplicate": not created}


def make_router() -> APIRouter:
    """The router of the labelling queue."""
    router = APIRouter(tags=["queue"])
    errors = functools.partial(schemas.error_responses, texts=NO_QUEUE)
    router.get("/v1/queue", response_model=schemas.QueuePage, responses=errors(401, 403, 404, 422))(list_queue)
    router.get("/v1/queue/{rank}", response_model=schemas.QueueItem,
               responses=errors(401, 403, 404, 422))(get_item)
    router.get("/v1/queue/{rank}/image", response_class=Response,
               responses={200: {"content": NPY_CONTENT, "description": "NPY of (C, H, W)."},
                          **errors(401, 403, 404, 413, 415, 422)})(item_image)
    existed = {"model": schemas.Contribution, "description": "The same contribution already existed."}
    router.post("/v1/queue/{rank}/label", status_code=201, response_model=schemas.Contribution,
                responses={200: existed, **errors(400, 401, 403, 404, 409, 413, 415, 422)})(label_item)
    return router
