"""Contributed labelled images: submit, list, fetch, and review them (``/v1/contributions``)."""

import functools
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool

from cellclass.errors import NotFoundError, PermissionDeniedError
from cellclass.serving import schemas
from cellclass.serving.contributions import MAX_JSON_DEPTH, ContributionStore
from cellclass.serving.dependencies import ServiceDep, StoreDep, read_upload, require
from cellclass.serving.display import display_npy
from cellclass.serving.keys import KEY_ID_PATTERN, ApiKey
from cellclass.serving.service import Service
from cellclass.serving.settings import ServeSettings

MAX_OFFSET = 2**31 - 1
"""Largest ``offset`` of a listing (a bound the database's integers hold)."""

ContributionId = Annotated[str, PathParam(min_length=1, max_length=64, description="A contribution's id.")]
ContributeKey = Annotated[ApiKey, require("contribute")]
CurateKey = Annotated[ApiKey, require("curate")]

_MEDIA_TYPES = {".tif": "image/tiff", ".tiff": "image/tiff", ".png": "image/png", ".npy": "application/octet-stream"}


async def add_contribution(service: Service, response: Response, image: UploadFile, key: ApiKey, labels: str,
                           metadata: str | None) -> dict[str, Any]:
    """Check and store one contribution (the body of ``POST /v1/contributions``); 200 when it already existed."""
    data = await read_upload(image, service.settings)
    upload, checked, extra = await service.run_cpu(service.check_contribution, data, image.filename, labels,
                                                   metadata)
    record, created = await run_in_threadpool(functools.partial(
        service.contributions.add, upload, checked, extra, contributor=key.key_id, dataset=service.dataset_id,
        model=service.identity))
    if not created:
        response.status_code = 200
    return {**record, "duplicate": not created}


async def list_contributions(
    store: StoreDep,
    key: ContributeKey,
    status: Annotated[Literal["pending", "accepted", "rejected"] | None, Query(description="Review status.")] = None,
    contributor: Annotated[str | None, Query(pattern=KEY_ID_PATTERN, description="Key id (curators only).")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
) -> dict[str, Any]:
    """Curators see every contribution; a contribute key sees its own."""
    if not key.allows("curate"):
        if contributor not in (None, key.key_id):
            raise PermissionDeniedError(f"key {key.key_id} (role {key.role!r}) may list only its own "
                                        f"contributions, asked for contributor {contributor!r}; valid: "
                                        f"{key.key_id}, or a curate key")
        contributor = key.key_id
    items, total = await run_in_threadpool(lambda: store.list(
        status=status, contributor=contributor, limit=limit, offset=offset))
    return {"total": total, "limit": limit, "offset": offset, "items": items}


async def visible(store: ContributionStore, contribution_id: str, key: ApiKey) -> dict[str, Any]:
    """A contribution ``key`` may see: any for a curator, its own for a contributor.

    Raises:
        NotFoundError: When there is none of that id among them.
    """
    record = await run_in_threadpool(store.get, contribution_id)
    if not key.allows("curate") and record["contributor"] != key.key_id:
        raise NotFoundError(f"no contribution with id {contribution_id!r} among key {key.key_id}'s own")
    return record


async def get_contribution(store: StoreDep, contribution_id: ContributionId, key: ContributeKey) -> dict[str, Any]:
    """One contribution (curators: any; contributors: their own)."""
    return await visible(store, contribution_id, key)


async def contribution_image(
    service: ServiceDep,
    store: StoreDep,
    contribution_id: ContributionId,
    key: ContributeKey,
    format_: Annotated[Literal["original", "npy"], Query(alias="format", description=(
        "original: the file as uploaded; npy: its (C, H, W) channels for display, 8 or 16 bits kept."))] = "original",
    max_side: Annotated[int, Query(ge=16, le=4096, description=(
        "With format=npy: largest height or width sent (larger images are reduced by block means)."))] = 1024,
) -> Response:
    """The contributed file, as uploaded, or its channels for display (the web page's review)."""
    record = await visible(store, contribution_id, key)
    data = await run_in_threadpool(store.image, record)
    if format_ == "npy":
        name = record["sha256"] + record["extension"]
        array, headers = await service.run_cpu(
            lambda: display_npy(service.predictor.read_image_bytes(data, name), max_side))
        return Response(array, media_type="application/octet-stream",
                        headers={**headers, "Content-Disposition": f'inline; filename="{record["sha256"]}.npy"'})
    return Response(data, media_type=_MEDIA_TYPES.get(record["extension"], "application/octet-stream"),
                    headers={"Content-Disposition": f'attachment; filename="{record["sha256"]}{record["extension"]}"'})


async def review(store: ContributionStore, contribution_id: str, status: str, key: ApiKey,
                 body: schemas.Review | None) -> dict[str, Any]:
    """Set a contribution's review status, with the curator's note."""
    note = body.note if body is not None else None
    return await run_in_threadpool(lambda: store.review(contribution_id, status, reviewer=key.key_id, note=note))


async def accept(store: StoreDep, contribution_id: ContributionId, key: CurateKey,
                 body: schemas.Review | None = None) -> dict[str, Any]:
    """Accept a contribution into the next training export (curators)."""
    return await review(store, contribution_id, "accepted", key, body)


async def reject(store: StoreDep, contribution_id: ContributionId, key: CurateKey,
                 body: schemas.Review | None = None) -> dict[str, Any]:
    """Reject a contribution (curators)."""
    return await review(store, contribution_id, "rejected", key, body)


def make_router(settings: ServeSettings) -> APIRouter:
    """The router of contributions; the form fields of a submission are bounded by ``settings``."""
    router = APIRouter(tags=["contributions"])
    errors = schemas.error_responses

    existed = {"model": schemas.Contribution, "description": "The same contribution already existed."}

    @router.post("/v1/contributions", status_code=201, response_model=schemas.Contribution,
                 responses={200: existed, **schemas.UPLOAD_ERRORS})
    async def contribute(
        service: ServiceDep,
        response: Response,
        image: Annotated[UploadFile, File(description="The image: TIFF, PNG or NPY.")],
        key: ContributeKey,
        labels: Annotated[str, Form(max_length=settings.max_metadata_bytes, description=(
            'JSON object of task to label(s), e.g. {"particle_type": "Fe"}; nested at most '
            f'{MAX_JSON_DEPTH} levels, at most {settings.max_metadata_bytes:,} bytes.'))],
        metadata: Annotated[str | None, Form(max_length=settings.max_metadata_bytes, description=(
            "Optional JSON object (plate, well, microscope, ...): standard JSON (no NaN or Infinity), "
            f"nested at most {MAX_JSON_DEPTH} levels, at most {settings.max_metadata_bytes:,} bytes."))] = None,
    ) -> dict[str, Any]:
        """Contribute a labelled image; it waits as ``pending`` until a curator accepts or rejects it."""
        return await add_contribution(service, response, image, key, labels, metadata)

    router.get("/v1/contributions", response_model=schemas.ContributionList,
               responses=errors(401, 403, 422))(list_contributions)
    router.get("/v1/contributions/{contribution_id}", response_model=schemas.Contribution,
               responses=errors(401, 403, 404, 422))(get_contribution)
    router.get("/v1/contributions/{contribution_id}/image", response_class=Response,
               responses={200: {"content": {"image/tiff": {}, "image/png": {}, "application/octet-stream": {}}},
                          **errors(401, 403, 404, 422)})(contribution_image)
    router.post("/v1/contributions/{contribution_id}/accept", response_model=schemas.Contribution,
                responses=errors(400, 401, 403, 404, 413, 422))(accept)
    router.post("/v1/contributions/{contribution_id}/reject", response_model=schemas.Contribution,
                responses=errors(400, 401, 403, 404, 413, 422))(reject)
    return router
