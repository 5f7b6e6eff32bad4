"""Whole fields of view: ``/v1/fields`` segments a field, classifies each cell and answers for the field."""

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile

from cellclass.serving import schemas
from cellclass.serving.dependencies import ServiceDep, read_upload, require
from cellclass.serving.fields import FieldRequest, aggregation_of, describe_field, preview_png
from cellclass.serving.keys import ApiKey
from cellclass.serving.service import Service
from cellclass.serving.settings import ServeSettings

PredictKey = Annotated[ApiKey | None, require("predict", open_setting=True)]

CHANNEL_HELP = "an index from 0 or one of the model's channel names"


async def field_predictions(service: Service, image: UploadFile, request: FieldRequest) -> dict[str, Any]:
    """The body of ``/v1/fields``: the field's cells, each classified, and the field's answer.

    Raises:
        UploadError: When the image cannot be read or used, a channel or the aggregation is
            invalid, or the field holds more objects than ``max_field_objects``.
    """
    predictor = service.predictor
    aggregations = aggregation_of(predictor.encoders, request.aggregate)  # a mistake is refused before any work
    data = await read_upload(image, service.settings)

    def cut() -> tuple[Any, Any, Any]:
        upload = service.decode(data, image.filename)
        field = service.fields.cut(upload.image, request)
        x = service.prepare(field.crops) if field.crops else None
        return upload, field, x

    upload, field, x = await service.run_cpu(cut)
    probabilities = None if x is None else await service.batcher.submit(x)

    def describe() -> dict[str, Any]:
        body = describe_field(predictor, field, probabilities, aggregations, request)
        body["preview"] = preview_png(upload.image) if request.preview else None
        return body

    body = await service.run_cpu(describe)
    return {"model": service.identity, "filename": upload.filename, **body}


def make_router(settings: ServeSettings) -> APIRouter:
    """The router of whole fields; its form fields document ``settings``' limits."""
    router = APIRouter(tags=["fields"])

    @router.post("/v1/fields", response_model=schemas.FieldResponse, responses=schemas.UPLOAD_ERRORS)
    async def fields(
        service: ServiceDep,
        image: Annotated[UploadFile, File(description=(
            f"One field of view: TIFF, PNG or NPY, the model's channels (at most {settings.max_upload_bytes:,} bytes "
            f"and {settings.max_field_objects:,} objects)."))],
        _key: PredictKey,
        nucleus_channel: Annotated[str | None, Form(max_length=100, description=(
            f"Channel of the nuclear stain: {CHANNEL_HELP} (default: the training cells', else the channel named "
            "dapi, hoechst, dna, nuclei, nucleus, h2b or blue, else 0)."))] = None,
        cell_channel: Annotated[str | None, Form(max_length=100, description=(
            f"A cytoplasm or membrane channel to grow whole cells on: {CHANNEL_HELP}, or 'none' for nuclei only "
            "(default: the training cells' choice)."))] = None,
        membrane: Annotated[bool | None, Form(description=(
            "The cell channel marks membranes, not cytoplasm (default: the training cells' choice)."))] = None,
        aggregate: Annotated[str | None, Form(max_length=20, description=(
            "How the cells make the field's answer: mean, max, topk or topk:K (multi-label; default mean), "
            "majority or mean (single-label; default majority)."))] = None,
        outlines: Annotated[bool, Form(description="Return each cell's outline polygon.")] = True,
        preview: Annotated[bool, Form(description="Return the field as a PNG data URL.")] = False,
    ) -> dict[str, Any]:
        """Segment a field (scikit-image), cut each object as the training cells were, classify every cell and
        aggregate their probabilities to the field's answer."""
        request = FieldRequest(nucleus_channel=nucleus_channel, cell_channel=cell_channel, membrane=membrane,
                               aggregate=aggregate, outlines=outlines, preview=preview)
        return await field_predictions(service, image, request)

    return router
