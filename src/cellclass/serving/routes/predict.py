"""The model and its predictions: ``/v1/model``, ``/v1/predict``, ``/v1/saliency``."""

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, Response, UploadFile

from cellclass.errors import PayloadTooLargeError
from cellclass.serving import schemas
from cellclass.serving.dependencies import PredictorDep, ServiceDep, SettingsDep, read_upload, require
from cellclass.serving.keys import ApiKey
from cellclass.serving.service import Service
from cellclass.serving.settings import ServeSettings
from cellclass.serving.uploads import ACCEPTED_EXTENSIONS

PredictKey = Annotated[ApiKey | None, require("predict", open_setting=True)]


async def model_info(service: ServiceDep, p: PredictorDep, settings: SettingsDep) -> dict[str, Any]:
    """Tasks, classes, channels and input size of the served model."""
    return {
        "model": service.identity,
        "tasks": [{"name": e.name, "type": e.type, "classes": e.classes, "thresholds": p.thresholds.get(e.name)}
                  for e in p.encoders.values()],
        "channels": p.channels, "in_chans": p.in_chans, "channel_indices": p.channel_indices,
        "image_size": p.image_size, "fit": p.fit, "dataset_id": service.dataset_id,
        "open_predict": settings.open_predict,
        "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_pixels": settings.max_pixels,
                   "max_images": settings.max_images, "max_field_objects": settings.max_field_objects,
                   "accepted_extensions": list(ACCEPTED_EXTENSIONS)},
    }


async def predictions(service: Service, images: list[UploadFile]) -> dict[str, Any]:
    """Per-task probabilities and labels of uploaded images, in upload order (the body of ``/v1/predict``).

    Raises:
        PayloadTooLargeError: When there are more images than ``max_images``.
        UploadError: When an image cannot be read or is not one the model can use.
    """
    if len(images) > service.settings.max_images:
        raise PayloadTooLargeError(f"got {len(images)} images in one request; the limit is "
                                   f"{service.settings.max_images}")
    blobs = [(await read_upload(u, service.settings), u.filename) for u in images]
    uploads, x = await service.run_cpu(service.decode_and_prepare, blobs)
    probabilities = await service.batcher.submit(x)
    results = service.predictor.describe(probabilities)
    return {"model": service.identity,
            "predictions": [{"filename": u.filename, "tasks": r} for u, r in zip(uploads, results, strict=True)]}


async def saliency(
    service: ServiceDep,
    image: Annotated[UploadFile, File(description="One image: TIFF, PNG or NPY.")],
    _key: PredictKey,
    task: Annotated[str | None, Form(max_length=200, description="Task to explain (default: the first).")] = None,
    class_name: Annotated[str | None, Form(max_length=200,
                                           description="Class to explain (default: the predicted one).")] = None,
) -> Response:
    """Grad-CAM of the last convolutional layer: a PNG of the image and its overlay side by side."""
    data = await read_upload(image, service.settings)

    def work() -> tuple[bytes, dict[str, str]]:
        return service.saliency_png(service.decode(data, image.filename), task, class_name)

    png, headers = await service.run_cpu(work)
    return Response(png, media_type="image/png", headers=headers)


def make_router(settings: ServeSettings) -> APIRouter:
    """The router of the model and its predictions; its image field documents ``settings``' limits."""
    router = APIRouter(tags=["predict"])
    router.get("/v1/model", response_model=schemas.ModelInfo)(model_info)

    @router.post("/v1/predict", response_model=schemas.PredictResponse, responses=schemas.UPLOAD_ERRORS)
    async def predict(
        service: ServiceDep,
        image: Annotated[list[UploadFile], File(min_length=1, description=(
            f"Image file(s): TIFF, PNG or NPY; repeat the field for several (at most {settings.max_images}, "
            f"{settings.max_request_bytes:,} bytes in all)."))],
        _key: PredictKey,
    ) -> dict[str, Any]:
        """Per-task probabilities and labels (tuned thresholds) for one or more images."""
        return await predictions(service, image)

    router.post("/v1/saliency", response_class=Response, responses={
        200: {"content": {"image/png": {}}, "description": "The image beside its Grad-CAM overlay."},
        **schemas.UPLOAD_ERRORS})(saliency)
    return router
