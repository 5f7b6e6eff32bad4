"""Request and response schemas of the HTTP API, and its documented error statuses (they make the OpenAPI document)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, Field


class ErrorResponse(BaseModel):
    """Every error: what was wrong, the value received, what is valid."""

    detail: str = Field(examples=["task 'particle_type' got unknown label 'Xray'; valid: Fe, X-ray"])


ERROR_TEXTS = {
    400: "The body is not parseable as its content type (malformed multipart or JSON).",
    401: "No key, or an unknown, malformed or revoked key.",
    403: "The key's role may not do this.",
    404: "No such contribution among those the key may see.",
    409: "The calling key already labelled this queue item.",
    413: "Request body, image file or pixel count over its limit.",
    415: "Not a TIFF, PNG or NPY image.",
    422: "Invalid image, labels or parameters.",
}
"""What each error status means, as the OpenAPI document says it."""


def error_responses(*codes: int, texts: Mapping[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of the given error statuses, each a ``{"detail": message}`` body.

    Args:
        codes: The statuses.
        texts: What a status means for these routes, where :data:`ERROR_TEXTS` does not say it.
    """
    texts = {**ERROR_TEXTS, **(texts or {})}
    return {code: {"model": ErrorResponse, "description": texts[code]} for code in codes}


UPLOAD_ERRORS = error_responses(400, 401, 403, 413, 415, 422)
"""The error statuses of an endpoint taking image files."""


class ModelIdentity(BaseModel):
    """Which model answered."""

    name: str | None = Field(description="Architecture name, e.g. lenet5 or resnet18.")
    run: str = Field(description="Run folder (or checkpoint) name.")
    epoch: int | None = Field(default=None, description="Epoch of the served checkpoint.")
    checkpoint_sha256: str = Field(description="SHA-256 of the checkpoint file.")
    backend: str = Field(description="torch or onnxruntime.")
    tta: bool = Field(description="Whether predictions average the 8 D4 transforms.")


class TaskInfo(BaseModel):
    """One label task of the model."""

    name: str
    type: str = Field(description="single, multilabel or binary.")
    classes: list[str]
    thresholds: list[float] | None = Field(default=None, description="Tuned per-class thresholds (multi-label).")


class Limits(BaseModel):
    """Upload limits."""

    max_upload_bytes: int
    max_pixels: int = Field(description="Largest image in pixel values (height x width x channels).")
    max_images: int = Field(description="Most images per request.")
    max_field_objects: int | None = Field(default=None, description="Most objects in a field sent to /v1/fields.")
    accepted_extensions: list[str]


class ModelInfo(BaseModel):
    """What the served model expects and returns."""

    model: ModelIdentity
    tasks: list[TaskInfo]
    channels: list[str] = Field(description="Channel names, in order.")
    in_chans: int = Field(description="Channels per image the model reads (after channel selection).")
    channel_indices: list[int] = Field(description="Channels kept from each upload (all when empty).")
    image_size: int = Field(description="Side of the square model input; uploads of any size are fitted to it.")
    fit: str = Field(description="How uploads are made square: pad, resize or crop.")
    dataset_id: str = Field(description="Identifier of the task/class definition contributions are checked against.")
    open_predict: bool = Field(description="Whether /v1/predict needs no key.")
    limits: Limits


class TaskPrediction(BaseModel):
    """One task's decision for one image."""

    label: str | list[str] = Field(description="Class name (a list for multi-label tasks, tuned thresholds).")
    probabilities: dict[str, float]


class ImagePrediction(BaseModel):
    """Predictions for one uploaded image."""

    filename: str
    tasks: dict[str, TaskPrediction]


class PredictResponse(BaseModel):
    """Predictions for every uploaded image, in upload order."""

    model: ModelIdentity
    predictions: list[ImagePrediction]


class FieldCell(BaseModel):
    """One cell of a field: where it is, its outline, and the model's answer for it."""

    object_id: int = Field(description="Its label value in the field's segmentation (1..N).")
    bbox: list[int] = Field(description="Bounding box [y0, x0, y1, x1] in field pixels (start inclusive, end "
                                        "exclusive).")
    centroid: list[float] = Field(description="[y, x] of its pixels' mean, in field pixels.")
    area: int = Field(description="Its pixels.")
    touches_border: bool = Field(description="Whether it touches the field's edge.")
    outline: list[list[float]] | None = Field(
        default=None, description="Its outer contour as [x, y] vertices (pixel centres at +0.5), simplified; null "
                                  "when outlines=false.")
    tasks: dict[str, TaskPrediction]


class FieldTaskAnswer(BaseModel):
    """One task's answer for the whole field, aggregated from its cells."""

    label: str | list[str] = Field(description="Class name (a list for multi-label tasks).")
    probabilities: dict[str, float] = Field(description="Aggregated probabilities (vote shares for majority).")
    aggregation: str = Field(description="mean, max, topk_mean:K, majority.")
    thresholds: str = Field(description="Where the multi-label thresholds come from.")


class FieldSegmentation(BaseModel):
    """How the field was segmented and cut into the crops the model read."""

    backend: str = Field(description="skimage: threshold and watershed, no weights.")
    nucleus_channel: int
    cell_channel: int | None = Field(description="The channel whole cells were grown on; null for nuclei only.")
    membrane: bool
    n_objects: int = Field(description="Objects found.")
    n_skipped: int = Field(description="Objects not classified (cut by the border, or outside the area bounds).")
    crop: dict[str, Any] = Field(description="The crop settings: size, masking, border, area bounds.")
    crop_settings_from: str


class FieldResponse(BaseModel):
    """A field's cells and the field's answer."""

    model: ModelIdentity
    filename: str
    height: int
    width: int
    segmentation: FieldSegmentation
    n_cells: int = Field(description="Cells classified.")
    cells: list[FieldCell]
    field: dict[str, FieldTaskAnswer] | None = Field(description="The field's answer per task; null without a cell.")
    preview: str | None = Field(default=None, description="The field as a PNG data URL (preview=true).")


class Contribution(BaseModel):
    """A contributed labelled image."""

    id: str
    status: str = Field(description="pending, accepted or rejected.")
    labels: dict[str, str | list[str]]
    metadata: dict[str, Any]
    filename: str = Field(description="The uploaded file's name.")
    sha256: str = Field(description="Content address of the stored file.")
    size_bytes: int
    shape: list[int] = Field(description="Decoded (C, H, W).")
    dtype: str
    contributor: str = Field(description="Id of the key that contributed it.")
    dataset_id: str
    created_at: str
    reviewed_at: str | None = None
    reviewed_by: str | None = None
    review_note: str | None = None
    duplicate: bool = Field(default=False, description="True when this exact contribution already existed.")


class ContributionList(BaseModel):
    """A page of contributions, oldest first."""

    total: int
    limit: int
    offset: int
    items: list[Contribution]


class Review(BaseModel):
    """A curator's optional note on an accept or reject."""

    note: str | None = Field(default=None, max_length=2000)


class QueueInfo(BaseModel):
    """The ranking served as the labelling queue."""

    ranking: str = Field(description="File name of the ranking CSV.")
    size: int = Field(description="Images in the ranking.")
    strategies: list[str] = Field(description="Ranking strategies of its images.")


class QueueItem(BaseModel):
    """One ranked image, with the model's guess when it was ranked."""

    rank: int = Field(description="Place in the ranking (1 = ask first); the item's id.")
    image: str = Field(description="Path of the image as the ranking gives it.")
    score: float | None = Field(description="The ranking strategy's score.")
    strategy: str
    tasks: dict[str, TaskPrediction] = Field(description="The model's guess and probabilities per task.")
    labels: int = Field(description="How many keys labelled it.")
    labelled_by_me: bool = Field(description="Whether the calling key labelled it.")


class QueuePage(BaseModel):
    """A page of the items still to label, in rank order."""

    queue: QueueInfo
    unlabelled_by: str = Field(description="anyone: items nobody labelled; me: items the calling key did not.")
    total: int = Field(description="Items still to label ranked after `after`.")
    labelled: int = Field(description="Items left out as labelled.")
    limit: int
    offset: int
    after: int
    items: list[QueueItem]


class QueueLabel(BaseModel):
    """The labels a person gives a queue item."""

    labels: dict[str, Any] = Field(description='Task to label(s), e.g. {"particle_type": "Fe"}; a list of class '
                                               'names for a multi-label task.',
                                   examples=[{"particle_type": "Fe"}])


class KeyInfo(BaseModel):
    """The calling key's public record."""

    key_id: str
    role: str
    name: str


class Health(BaseModel):
    """Liveness."""

    status: str


class Ready(BaseModel):
    """Readiness: model loaded, database answering, batcher running."""

    status: str
    model: ModelIdentity | None = None
    database: bool
    batching: dict[str, float] = Field(default_factory=dict)
