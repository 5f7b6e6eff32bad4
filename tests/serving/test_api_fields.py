"""``POST /v1/fields`` through TestClient: a simulated field segmented, cut and classified as the
training cells were, its answer aggregated, and every refusal one line with its 4xx status."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from serve_helpers import api_settings, auth, npy_bytes

from cellclass.data.io import read_image
from cellclass.evaluation.aggregate import aggregate_multilabel
from cellclass.inference.checkpoint import Checkpoint
from cellclass.inference.predictor import Predictor
from cellclass.serving.app import create_app
from cellclass.serving.fields import outline

TASK = "localization"


@pytest.fixture(scope="module")
def fields_api(field_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """The app serving the cell model (2 MiB uploads)."""
    state = tmp_path_factory.mktemp("fields-state")
    with TestClient(create_app(api_settings(field_run["run"], state, max_upload_bytes=2 * 1024 * 1024))) as client:
        yield client


@pytest.fixture(scope="module")
def predict_key(fields_api: TestClient) -> str:
    return fields_api.app.state.service.keys.create("predict")[0]


def post_field(client: TestClient, key: str | None, name: str, data: bytes, **form: str) -> object:
    return client.post("/v1/fields", files={"image": (name, data)}, data=form, headers=auth(key))


def test_a_field_needs_a_predict_key(fields_api: TestClient, field_tiff: tuple[str, bytes, np.ndarray]) -> None:
    _, data, _ = field_tiff
    refused = post_field(fields_api, None, "f.tif", data)
    assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
    assert post_field(fields_api, "cc_not-a-key", "f.tif", data).status_code == 401


def test_a_simulated_field_gives_its_cells_cut_as_the_training_cells_were(
        fields_api: TestClient, predict_key: str, field_run: dict[str, Path],
        field_tiff: tuple[str, bytes, np.ndarray]) -> None:
    field_id, data, image = field_tiff
    response = post_field(fields_api, predict_key, "field.tif", data)
    assert response.status_code == 200, response.text
    body = response.json()
    _, height, width = image.shape
    assert (body["height"], body["width"], body["filename"]) == (height, width, "field.tif")
    seg = body["segmentation"]
    assert seg["nucleus_channel"] == 2 and seg["cell_channel"] == 0  # as the training cells were segmented
    assert seg["crop"] == {"size": 32, "mask_neighbours": True, "mask_background": False, "border": "pad",
                           "pad": "zero", "min_area": 1}
    assert seg["crop_settings_from"] == "the run's training crops"

    # The same objects as `cellclass segment` + `crops` made for training, one per row of cells.csv.
    cells = pd.read_csv(field_run["cells"] / "cells.csv", dtype={"field_id": str})
    mine = cells[cells.field_id == field_id].reset_index(drop=True)
    assert body["n_cells"] == len(body["cells"]) == len(mine) == seg["n_objects"] > 0 and seg["n_skipped"] == 0
    for cell, row in zip(body["cells"], mine.itertuples(), strict=True):
        y0, x0, y1, x1 = cell["bbox"]
        assert 0 <= y0 < y1 <= height and 0 <= x0 < x1 <= width  # boxes inside the image
        assert cell["object_id"] == row.object_id and cell["area"] == row.area
        assert cell["bbox"] == [row.bbox_y0, row.bbox_x0, row.bbox_y1, row.bbox_x1]
        assert cell["centroid"] == pytest.approx([row.centroid_y, row.centroid_x], abs=0.01)
        xs, ys = np.array(cell["outline"]).T
        assert len(xs) >= 3 and x0 <= xs.min() and xs.max() <= x1 and y0 <= ys.min() and ys.max() <= y1

    # Each cell classified as its training crop is; the field's answer is their mean, cut at the thresholds
    # tuned on the validation fields.
    predictor = Predictor.from_checkpoint(field_run["run"])
    crops = [read_image(field_run["cells"] / c) for c in mine.crop]
    expected = predictor.predict_normalized(predictor.normalize(predictor.prepare(crops)))[TASK]
    classes = predictor.encoders[TASK].classes
    got = np.array([[cell["tasks"][TASK]["probabilities"][c] for c in classes] for cell in body["cells"]])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    thresholds = Checkpoint.load(field_run["run"]).field_thresholds[TASK]["mean"]
    field = aggregate_multilabel(["f"] * len(got), got, method="mean", thresholds=thresholds)
    answer = body["field"][TASK]
    assert answer["aggregation"] == "mean"
    assert answer["thresholds"] == "per class, tuned on the validation fields (mean of their cells)"
    assert answer["label"] == [c for c, keep in zip(classes, field.labels[0], strict=True) if keep]
    np.testing.assert_allclose([answer["probabilities"][c] for c in classes], field.proba[0], atol=1e-6)
    assert body["preview"] is None


def test_options_change_the_segmentation_and_the_aggregation(fields_api: TestClient, predict_key: str,
                                                             field_tiff: tuple[str, bytes, np.ndarray]) -> None:
    _, data, _ = field_tiff
    nuclei = post_field(fields_api, predict_key, "f.tif", data, cell_channel="none", nucleus_channel="blue",
                        aggregate="topk:2", outlines="false", preview="true").json()
    assert nuclei["segmentation"]["cell_channel"] is None and nuclei["segmentation"]["nucleus_channel"] == 2
    assert all(cell["outline"] is None for cell in nuclei["cells"])
    assert nuclei["field"][TASK]["aggregation"] == "topk_mean:2"
    assert "the run holds no field thresholds for topk_mean:2" in nuclei["field"][TASK]["thresholds"]
    assert nuclei["preview"].startswith("data:image/png;base64,")
    whole = post_field(fields_api, predict_key, "f.tif", data, aggregate="max").json()
    # Cells grown from the nuclei cover them: every nucleus lies in the box of the cell of its number.
    boxes = {c["object_id"]: c["bbox"] for c in whole["cells"]}
    for cell in nuclei["cells"]:
        y0, x0, y1, x1 = boxes[cell["object_id"]]
        assert y0 <= cell["bbox"][0] and x0 <= cell["bbox"][1] and cell["bbox"][2] <= y1 and cell["bbox"][3] <= x1
    assert whole["field"][TASK]["aggregation"] == "max"


def test_an_empty_field_has_no_cell_and_no_answer(fields_api: TestClient, predict_key: str) -> None:
    body = post_field(fields_api, predict_key, "empty.npy", npy_bytes(np.zeros((4, 64, 64), np.uint8))).json()
    assert body["n_cells"] == 0 and body["cells"] == [] and body["field"] is None
    assert body["segmentation"]["n_objects"] == 0


@pytest.mark.parametrize(("name", "make", "form", "status", "fragment"), [
    ("f.tif", lambda d: b"not a tiff", {}, 415, "is not a TIFF image"),
    ("f.tif", lambda d: d, {"aggregate": "majority"}, 422,
     "aggregation 'majority' does not apply to task 'localization', which is multi-label; valid for it: mean"),
    ("f.tif", lambda d: d, {"aggregate": "median"}, 422, "aggregation 'median' is invalid; valid: mean, max"),
    ("f.tif", lambda d: d, {"aggregate": "x" * 21}, 422, "form field 'aggregate': String should have at most 20"),
    ("f.tif", lambda d: d, {"nucleus_channel": "dapi"}, 422,
     ("nucleus_channel 'dapi' is not a channel of the model; valid: an index from 0 to 3, or a name (red, green, "
      "blue, yellow)")),
    ("f.tif", lambda d: d, {"nucleus_channel": "7"}, 422, "nucleus_channel 7 is out of range: the field has 4"),
    ("f.tif", lambda d: d, {"cell_channel": "2"}, 422, "cell_channel '2' is the nucleus channel (2)"),
    ("f.tif", lambda d: d, {"outlines": "maybe"}, 422, "form field 'outlines'"),
    ("two.npy", lambda d: npy_bytes(np.full((2, 64, 64), 9, np.uint8)), {}, 422,
     "the field has 2 channel(s); the model expects 4 (red, green, blue, yellow)"),
    ("three.npy", lambda d: npy_bytes(np.random.default_rng(0).integers(0, 255, (3, 96, 96), dtype=np.uint8)),
     {"nucleus_channel": "0", "cell_channel": "none"}, 422, "the field has 3 channel(s); the model expects 4"),
])
def test_a_field_it_cannot_use_is_refused_in_one_line(fields_api: TestClient, predict_key: str,
                                                      field_tiff: tuple[str, bytes, np.ndarray], name: str,
                                                      make: object, form: dict[str, str], status: int,
                                                      fragment: str) -> None:
    response = post_field(fields_api, predict_key, name, make(field_tiff[1]), **form)  # type: ignore[operator]
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and fragment in detail, detail


def test_a_field_of_too_many_objects_is_refused(field_run: dict[str, Path], tmp_path: Path,
                                                field_tiff: tuple[str, bytes, np.ndarray]) -> None:
    settings = api_settings(field_run["run"], tmp_path / "state", open_predict=True, max_upload_bytes=2 * 1024 * 1024,
                            max_field_objects=2)
    with TestClient(create_app(settings)) as client:
        response = post_field(client, None, "f.tif", field_tiff[1])
        info = client.get("/v1/model").json()
    assert response.status_code == 422
    masks = pd.read_csv(field_run["seg"] / "masks.csv", dtype={"Id": str})
    n = int(masks.n_objects[masks.Id == field_tiff[0]].iloc[0])
    assert response.json()["detail"] == (
        f"the field holds {n} objects; the limit is 2 per field (CELLCLASS_MAX_FIELD_OBJECTS, `cellclass serve "
        f"--max-field-objects`); valid: a smaller field, or a server with a higher limit")
    assert info["limits"]["max_field_objects"] == 2


def test_the_openapi_document_lists_the_field_endpoint(fields_api: TestClient) -> None:
    operation = fields_api.get("/openapi.json").json()["paths"]["/v1/fields"]["post"]
    assert set(operation["responses"]) == {"200", "400", "401", "403", "413", "415", "422"}
    assert operation["tags"] == ["fields"] and operation["security"]


def test_an_outline_follows_the_object() -> None:
    labels = np.zeros((12, 12), np.uint16)
    labels[2:6, 3:9] = 1  # a 4 x 6 rectangle: its outline runs through the edge pixels' centres
    points = np.array(outline(labels, 1, (2, 3, 6, 9)))
    assert points[:, 0].min() == pytest.approx(3.0) and points[:, 0].max() == pytest.approx(9.0)
    assert points[:, 1].min() == pytest.approx(2.0) and points[:, 1].max() == pytest.approx(6.0)
    assert len(points) <= 10  # simplified to its corners (and the iso-line's cut corners)
    big = np.zeros((600, 600), np.uint16)
    yy, xx = np.mgrid[:600, :600]
    big[(yy - 300) ** 2 + (xx - 300) ** 2 < 290 ** 2] = 1
    assert 3 <= len(outline(big, 1, (10, 10, 591, 591))) <= 200


def test_channel_names_go_through_the_models_channel_selection() -> None:
    from cellclass.errors import UploadError
    from cellclass.serving.fields import FieldReader, FieldRequest

    reader = FieldReader(channels=["Marker", "DNA"], channel_indices=[1, 3], in_chans=2, image_size=16, crops=None,
                         max_objects=50)
    rng = np.random.default_rng(3)
    field = rng.integers(0, 50, (4, 64, 64)).astype(np.uint16)
    field[3, 20:30, 20:30] = 4000  # one bright nucleus on the upload's channel 3, the model's "DNA"
    cut = reader.cut(field, FieldRequest())
    assert cut.segmentation["nucleus_channel"] == 3  # found by its name, dna
    assert cut.n_objects == 1 and cut.crops[0].shape == (4, 16, 16) and cut.segmentation["n_skipped"] == 0
    assert cut.segmentation["crop"] == {"size": 16}
    assert "the model's input size" in cut.segmentation["crop_settings_from"]
    assert reader.cut(field, FieldRequest(nucleus_channel="marker")).segmentation["nucleus_channel"] == 1
    with pytest.raises(UploadError, match=r"the field has 3 channel\(s\); the model expects at least 4, of which it "
                                          r"reads 2 \(Marker, DNA\)"):
        reader.cut(field[:3], FieldRequest())
