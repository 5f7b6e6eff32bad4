"""A field of view in, its cells and the field's answer out: the work of ``POST /v1/fields``.

A served cell model (trained on ``cellclass crops`` output) gets a whole field. The field
is segmented with the default scikit-image backend (:mod:`cellclass.data.segment`: nuclei,
and whole cells grown on a cytoplasm or membrane channel where one is chosen), each object
is cut as the training cells were (the crop settings the checkpoint records: size,
masking, border; else crops of the model's input size, as ``crops`` cuts by default), the
crops are classified, and their probabilities aggregated to the field's answer
(:mod:`cellclass.evaluation.fields`, with the field thresholds tuned on the validation
fields). Each cell comes back with its object id, bounding box, centroid, area, its
outline as a polygon (:func:`outline`) and its per-task probabilities and labels.

The segmentation defaults are the training cells' where the checkpoint records them
(nucleus channel, cell channel, their parameters), else the nuclear channel found by its
name (:data:`~cellclass.data.masks.NUCLEAR_CHANNEL_NAMES`, else channel 0) and nuclei only.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from skimage import measure

from cellclass.data.crops import CellProps, crop_cells
from cellclass.data.masks import NUCLEAR_CHANNEL_NAMES
from cellclass.data.segment import CellParams, NucleusParams, segment_cells, segment_nuclei
from cellclass.errors import CellclassError, UploadError
from cellclass.evaluation.fields import (
    Aggregation,
    FieldAnswers,
    answer_fields,
    choose_thresholds,
    parse_aggregation,
    task_aggregations,
)

OUTLINE_POINTS = 200
"""Most vertices of a returned outline: polygons are simplified until they have no more."""

PREVIEW_SIDE = 1024
"""Longest side of the preview PNG (the field is shrunk to it, never enlarged)."""

NO_CELL_CHANNEL = "none"
"""The ``cell_channel`` value that segments nuclei only, where the run recorded a cell channel."""


@dataclass(frozen=True)
class FieldRequest:
    """What the caller chose: channels, cell growth, aggregation and what to return.

    Attributes:
        nucleus_channel: An index or channel name (None: the run's, else by name, else 0).
        cell_channel: An index or channel name to grow whole cells on; ``none`` for nuclei
            only; None: the run's choice.
        membrane: The cell channel marks membranes (None: the run's choice, else False).
        aggregate: How cells make the field's answer (see :func:`parse_aggregation`).
        outlines: Return each cell's outline polygon.
        preview: Return a PNG of the field as a data URL (to draw the outlines on).
    """

    nucleus_channel: str | None = None
    cell_channel: str | None = None
    membrane: bool | None = None
    aggregate: str | None = None
    outlines: bool = True
    preview: bool = False


@dataclass
class SegmentedField:
    """A field cut into the crops the model reads.

    Attributes:
        labels: The ``(H, W)`` label image.
        cells: ``(object id, props)`` of every object cropped, in label order.
        crops: Their ``(C, S, S)`` crops, in the field's dtype.
        n_objects: Objects found (cropped or not).
        segmentation: How the field was segmented and cut, as the response reports it.
    """

    labels: np.ndarray
    cells: list[tuple[int, CellProps]]
    crops: list[np.ndarray]
    n_objects: int
    segmentation: dict[str, Any]


@dataclass
class FieldReader:
    """Segments and cuts fields as a served cell model's training cells were cut.

    Args:
        channels: The model's channel names (of its input, after channel selection).
        channel_indices: The channels the model keeps of each upload (all when empty).
        in_chans: The channels the model reads.
        image_size: The model's input side (the crop side where no crop settings are recorded).
        crops: The checkpoint's crop settings (:attr:`Checkpoint.crops`), or None.
        max_objects: Most objects a field may hold.
    """

    channels: Sequence[str]
    channel_indices: Sequence[int]
    in_chans: int
    image_size: int
    crops: Mapping[str, Any] | None
    max_objects: int

    def cut(self, image: np.ndarray, request: FieldRequest) -> SegmentedField:
        """Segment ``image`` (``(C, H, W)``) and crop its objects.

        Raises:
            UploadError: On a field of another channel count than the model's, a channel
                that is not one of the field's, more objects than :attr:`max_objects`, or an
                image the segmentation refuses.
        """
        self._check_channels(image.shape[0])
        recorded = (self.crops or {}).get("segmentation") or {}
        nucleus = self._channel(request.nucleus_channel, image.shape[0], "nucleus_channel",
                                recorded.get("nucleus_channel"))
        cell = None
        if request.cell_channel is None and recorded.get("cell_channel") is not None:
            cell = self._channel(str(recorded["cell_channel"]), image.shape[0], "cell_channel", None)
        elif request.cell_channel not in (None, NO_CELL_CHANNEL):
            cell = self._channel(request.cell_channel, image.shape[0], "cell_channel", None)
        if cell is not None and cell == nucleus:
            raise UploadError(f"cell_channel {request.cell_channel!r} is the nucleus channel ({nucleus}); valid: a "
                              f"cytoplasm or membrane channel other than the nuclear stain, or {NO_CELL_CHANNEL!r}")
        try:
            labels = segment_nuclei(image, nucleus, _nucleus_params(recorded))
            cell_params = _cell_params(recorded, request.membrane)
            if cell is not None:
                labels = segment_cells(labels, image, cell, cell_params)
        except CellclassError as exc:
            raise UploadError(f"the field cannot be segmented: {exc}") from None
        n_objects = int(labels.max(initial=0))
        if n_objects > self.max_objects:
            raise UploadError(f"the field holds {n_objects} objects; the limit is {self.max_objects} per field "
                              f"(CELLCLASS_MAX_FIELD_OBJECTS, `cellclass serve --max-field-objects`); valid: a "
                              f"smaller field, or a server with a higher limit")
        settings = self._crop_settings()
        cells, crops = [], []
        for object_id, crop, props in crop_cells(image, labels, **settings):
            cells.append((object_id, props))
            crops.append(crop)
        segmentation = {
            "backend": "skimage", "nucleus_channel": nucleus, "cell_channel": cell,
            "membrane": bool(cell is not None and cell_params.membrane), "n_objects": n_objects,
            "n_skipped": n_objects - len(cells), "crop": settings,
            "crop_settings_from": "the run's training crops" if self.crops else "the model's input size "
                                                                                 "(the run records no crop settings)",
        }
        return SegmentedField(labels, cells, crops, n_objects, segmentation)

    def _check_channels(self, n_channels: int) -> None:
        """Refuse a field the model cannot read before it is segmented."""
        fits = n_channels > max(self.channel_indices) if self.channel_indices else n_channels == self.in_chans
        if not fits:
            names = f" ({', '.join(self.channels)})" if self.channels else ""
            wanted = (f"at least {max(self.channel_indices) + 1}, of which it reads {len(self.channel_indices)}"
                      if self.channel_indices else str(self.in_chans))
            raise UploadError(f"the field has {n_channels} channel(s); the model expects {wanted}{names}")

    def _crop_settings(self) -> dict[str, Any]:
        """The keyword arguments of :func:`crop_cells`: the recorded ones, else a crop of the model's size."""
        recorded = self.crops or {}
        settings = {"size": int(recorded.get("size") or self.image_size)}
        for name in ("mask_neighbours", "mask_background", "border", "pad", "min_area", "max_area"):
            if recorded.get(name) is not None:
                settings[name] = recorded[name]
        return settings

    def _channel(self, value: str | None, n_channels: int, what: str, recorded: int | None) -> int:
        """The upload's channel index of ``value`` (an index or one of the model's channel names)."""
        names = list(self.channels)

        def raw(j: int) -> int:  # a name's index in the upload, through the model's channel selection
            return int(self.channel_indices[j]) if self.channel_indices else j

        if value is None:
            if recorded is not None:
                index = int(recorded)
            else:
                lowered = [n.lower() for n in names]
                found = [lowered.index(c) for c in NUCLEAR_CHANNEL_NAMES if c in lowered]
                index = raw(found[0]) if found else 0
        else:
            text = str(value).strip()
            if text.isdigit():
                index = int(text)
            elif text.lower() in [n.lower() for n in names]:
                index = raw([n.lower() for n in names].index(text.lower()))
            else:
                valid = ", ".join(names) if names else "none named"
                raise UploadError(f"{what} {value!r} is not a channel of the model; valid: an index from 0 to "
                                  f"{n_channels - 1}, or a name ({valid})")
        if index >= n_channels:
            raise UploadError(f"{what} {index} is out of range: the field has {n_channels} channel(s); valid: 0 to "
                              f"{n_channels - 1}")
        return index


def aggregation_of(encoders: Mapping[str, Any], text: str | None) -> dict[str, Aggregation]:
    """Each task's aggregation of a request's ``aggregate`` text.

    Raises:
        UploadError: When the text is no aggregation, or one that does not fit a task.
    """
    try:
        return task_aggregations(encoders, parse_aggregation(text))
    except CellclassError as exc:
        raise UploadError(str(exc)) from None


def field_answer(predictor: Any, probabilities: Mapping[str, np.ndarray],
                 aggregations: Mapping[str, Aggregation]) -> tuple[FieldAnswers, dict[str, str]]:
    """The field's answer from its cells' probabilities, with the field thresholds tuned on validation fields."""
    thresholds, sources = choose_thresholds(predictor.encoders, aggregations, predictor.field_thresholds,
                                            predictor.thresholds)
    n = len(next(iter(probabilities.values())))
    answers = answer_fields("field", ["field"] * n, probabilities, predictor.encoders, aggregations, thresholds)
    return answers, sources


def describe_field(predictor: Any, field: SegmentedField, probabilities: Mapping[str, np.ndarray] | None,
                   aggregations: Mapping[str, Aggregation], request: FieldRequest) -> dict[str, Any]:
    """The response body, less the model identity and file name: the cells, the field's answer, how they were made."""
    results = [] if probabilities is None else predictor.describe(probabilities)
    cells = []
    for (object_id, props), tasks in zip(field.cells, results, strict=True):
        cells.append({
            "object_id": int(object_id), "bbox": [int(v) for v in props.bbox],
            "centroid": [round(props.centroid_y, 2), round(props.centroid_x, 2)], "area": int(props.area),
            "touches_border": bool(props.touches_border),
            "outline": outline(field.labels, object_id, props.bbox) if request.outlines else None,
            "tasks": tasks,
        })
    answer = None
    if probabilities is not None:
        answers, sources = field_answer(predictor, probabilities, aggregations)
        decoded = answers.decoded(predictor.encoders)
        answer = {task: {"label": decoded[task][0], "aggregation": answers.aggregations[task].key,
                         "thresholds": sources.get(task, "argmax (single-label task)"),
                         "probabilities": dict(zip(encoder.classes, map(float, answers.probs[task][0]), strict=True))}
                  for task, encoder in predictor.encoders.items()}
    height, width = field.labels.shape
    return {"height": int(height), "width": int(width), "segmentation": field.segmentation, "n_cells": len(cells),
            "cells": cells, "field": answer}


def outline(labels: np.ndarray, object_id: int, bbox: Sequence[int]) -> list[list[float]]:
    """The object's outer contour as ``[x, y]`` vertices in field pixels (pixel centres at ``+0.5``), simplified.

    The longest iso-line at 0.5 of the object's mask (:func:`skimage.measure.find_contours`),
    simplified by :func:`skimage.measure.approximate_polygon` until it has at most
    :data:`OUTLINE_POINTS` vertices.
    """
    y0, x0, y1, x1 = (int(v) for v in bbox)
    mask = np.pad(labels[y0:y1, x0:x1] == object_id, 1).astype(np.float32)
    contours = measure.find_contours(mask, 0.5)
    if not contours:
        return []
    contour, tolerance = max(contours, key=len), 0.25
    simplified = measure.approximate_polygon(contour, tolerance)
    while len(simplified) > OUTLINE_POINTS:
        tolerance *= 2
        simplified = measure.approximate_polygon(contour, tolerance)
    # Back to field coordinates: -1 for the padding, +0.5 to put pixel centres at their middle.
    return [[round(float(c) + x0 - 0.5, 1), round(float(r) + y0 - 0.5, 1)] for r, c in simplified]


def preview_png(image: np.ndarray) -> str:
    """A PNG of the field as a ``data:`` URL: channels 0, 1, 2 as red, green, blue (one channel: grey).

    Each channel is scaled between its 1st and 99.8th percentiles; the field is shrunk to
    :data:`PREVIEW_SIDE` pixels on its longest side.
    """
    planes = []
    for plane in np.asarray(image)[:3]:
        plane = plane.astype(np.float32)
        low, high = np.percentile(plane, (1.0, 99.8))
        planes.append(np.clip((plane - low) / (high - low if high > low else 1.0), 0, 1))
    if len(planes) == 1:
        rgb = planes * 3
    else:
        rgb = planes + [np.zeros_like(planes[0])] * (3 - len(planes))
    picture = Image.fromarray((np.stack(rgb, axis=-1) * 255).astype(np.uint8))
    picture.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _nucleus_params(recorded: Mapping[str, Any]) -> NucleusParams:
    """The nucleus settings the training cells were segmented with (the default backend's), else the defaults."""
    if recorded.get("backend") == "skimage" and isinstance(recorded.get("params"), Mapping):
        return NucleusParams.from_dict(dict(recorded["params"]))
    return NucleusParams()


def _cell_params(recorded: Mapping[str, Any], membrane: bool | None) -> CellParams:
    """The cell settings the training cells were grown with, ``membrane`` applied where given."""
    values = dict(recorded.get("cell_params") or {}) if isinstance(recorded.get("cell_params"), Mapping) else {}
    if membrane is not None:
        values["membrane"] = bool(membrane)
    return CellParams.from_dict(values)
