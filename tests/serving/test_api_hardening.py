"""Requests a fuzzer sends, in this process (TestClient): bounded parameters, images the model cannot
read, deep or non-standard JSON, the OpenAPI document describing every answer, private state, and
rows older code stored. What needs a real server (the key before the body on a socket, kill -9) is
in ``test_serve_hardening.py``."""

from __future__ import annotations

import json
import sqlite3
import stat
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_helpers import auth, contribute, npy_bytes, upload_of

from cellclass.data.normalize import Normalizer
from cellclass.data.spec import DatasetSpec
from cellclass.errors import UploadError
from cellclass.inference.predictor import Predictor
from cellclass.serving.service import Service

FE = json.dumps({"particle_type": "Fe"})


# -- bounded parameters ---------------------------------------------------------------------
@pytest.mark.parametrize(("params", "message"), [
    ({"offset": 9223372036854775808}, ("query parameter 'offset': Input should be less than or equal to "
                                       "2147483647, got '9223372036854775808'")),
    ({"offset": 10**30, "limit": 5}, "query parameter 'offset': Input should be less than or equal to 2147483647"),
    ({"limit": 10**20}, "query parameter 'limit': Input should be less than or equal to 1000"),
    ({"offset": -1}, "query parameter 'offset': Input should be greater than or equal to 0, got '-1'"),
    ({"limit": "many"}, "query parameter 'limit': Input should be a valid integer"),
])
def test_integer_parameters_are_bounded(api: TestClient, api_keys: dict[str, str], params: dict, message: str) -> None:
    response = api.get("/v1/contributions", params=params, headers=auth(api_keys["curate"]))
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


# -- images the model cannot read -------------------------------------------------------------
@pytest.mark.parametrize(("name", "data", "message"), [
    ("empty.npy", npy_bytes(np.zeros((0, 8), np.float32)), "image 'empty.npy' holds no pixel values (shape (1, 0, 8))"),
    ("flat.npy", npy_bytes(np.zeros((8, 0), np.uint16)), "holds no pixel values (shape (1, 8, 0))"),
    ("none.npy", npy_bytes(np.zeros((1, 0, 0), np.uint8)), "holds no pixel values"),
    ("huge.npy", npy_bytes(np.full((8, 8), 1e300)), "holds float64 values up to 1e+300 in magnitude, beyond float32's range"),
    ("low.npy", npy_bytes(np.full((8, 8), -4e38)), "holds float64 values up to 4e+38 in magnitude"),
    ("inf.npy", npy_bytes(np.full((8, 8), np.inf, np.float16)), "holds NaN or infinite values"),
])
def test_images_the_model_cannot_read_get_422_on_every_upload_route(api: TestClient, api_keys: dict[str, str],
                                                                    name: str, data: bytes, message: str) -> None:
    key = api_keys["contribute"]
    for response in (api.post("/v1/predict", files={"image": (name, data)}, headers=auth(key)),
                     api.post("/v1/saliency", files={"image": (name, data)}, headers=auth(key)),
                     contribute(api, key, name, data)):
        assert response.status_code == 422, response.text
        assert message in response.json()["detail"]


def test_float64_within_float32_range_is_read(api: TestClient, api_keys: dict[str, str]) -> None:
    image = np.linspace(0, 3e38, 64).reshape(8, 8)  # float64, the largest just under float32's limit
    response = api.post("/v1/predict", files={"image": ("wide.npy", npy_bytes(image))}, headers=auth(api_keys["predict"]))
    assert response.status_code == 200, response.text
    probabilities = response.json()["predictions"][0]["tasks"]["particle_type"]["probabilities"]
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)


def test_values_that_overflow_once_normalized_are_refused(api_run: Path) -> None:
    predictor = Predictor.from_checkpoint(api_run)
    predictor.normalizer = Normalizer(mode="image", clip=False)  # per-image range, unclipped: no bound on the output
    service = Service(None, predictor, {}, {}, "", None, None, None, None)
    image = np.tile(np.array([3e38, -3e38], np.float32), (32, 16))  # finite, but its range overflows float32
    with pytest.raises(UploadError, match="image 0 has values so far from the training data's that they overflow"):
        service.prepare([np.ones((32, 32), np.float32), image][::-1])
    assert np.isfinite(service.prepare([np.arange(1024, dtype=np.float32).reshape(32, 32)])).all()


# -- JSON form fields -------------------------------------------------------------------------
@pytest.mark.parametrize(("labels", "metadata", "message"), [
    ("[" * 5000 + "]" * 5000, None, "the form field 'labels' nests arrays and objects 5000 levels deep; the limit is 16"),
    (FE, '{"a":' * 900 + "1" + "}" * 900, "the form field 'metadata' nests arrays and objects 900 levels deep"),
    (FE, '{"a": NaN}', "the form field 'metadata' holds NaN, which is not a JSON number; valid: standard JSON"),
    (FE, '{"a": [Infinity]}', "holds Infinity, which is not a JSON number"),
    (FE, '{"a": -Infinity}', "holds -Infinity, which is not a JSON number"),
    (FE, '{"a": 1e999}', "holds 1e999, which overflows to infinity"),
    (FE, '{"a": ' + "9" * 5000 + "}", "holds an integer of 5,000 digits"),
    (FE, '{"a": "\\ud800"}', "holds a string that is not valid Unicode"),
    ('{"particle_type": "\\udfff"}', None, "the form field 'labels' holds a string that is not valid Unicode"),
    ("x" * 16385, None, "form field 'labels': String should have at most 16384 characters"),
])
def test_json_fields_are_standard_and_bounded(api: TestClient, api_keys: dict[str, str], labels: str,
                                              metadata: str | None, message: str) -> None:
    image = npy_bytes(np.full((8, 8), len(labels) + len(metadata or ""), np.uint16))
    response = contribute(api, api_keys["contribute"], "cell.npy", image, labels, metadata)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


def test_metadata_within_the_bounds_is_stored_as_standard_json(api: TestClient, api_keys: dict[str, str]) -> None:
    nested: object = 1.5e300
    for _ in range(15):
        nested = {"level": nested}
    metadata = {"plate": "P7", "nested": nested, "big": 10**40, "text": "Zellkern \u00e9\u4e2d"}
    response = contribute(api, api_keys["contribute"], "ok.npy", npy_bytes(np.full((8, 8), 7, np.uint8)),
                          metadata=json.dumps(metadata))
    assert response.status_code == 201, response.text
    assert response.json()["metadata"] == metadata
    with sqlite3.connect(api.app.state.settings.state_dir / "cellclass.db") as db:
        stored = db.execute("SELECT metadata FROM contributions WHERE id = ?", (response.json()["id"],)).fetchone()[0]

    def refuse(name: str) -> None:
        raise ValueError(name)

    assert json.loads(stored, parse_constant=refuse) == metadata  # no NaN or Infinity in what was written


# -- the OpenAPI document ---------------------------------------------------------------------
EXPECTED_STATUSES = {
    ("/v1/predict", "post"): {"200", "400", "401", "403", "413", "415", "422"},
    ("/v1/saliency", "post"): {"200", "400", "401", "403", "413", "415", "422"},
    ("/v1/fields", "post"): {"200", "400", "401", "403", "413", "415", "422"},
    ("/v1/contributions", "post"): {"200", "201", "400", "401", "403", "413", "415", "422"},
    ("/v1/contributions", "get"): {"200", "401", "403", "422"},
    ("/v1/contributions/{contribution_id}", "get"): {"200", "401", "403", "404", "422"},
    ("/v1/contributions/{contribution_id}/image", "get"): {"200", "401", "403", "404", "422"},
    ("/v1/contributions/{contribution_id}/accept", "post"): {"200", "400", "401", "403", "404", "413", "422"},
    ("/v1/contributions/{contribution_id}/reject", "post"): {"200", "400", "401", "403", "404", "413", "422"},
    ("/v1/queue", "get"): {"200", "401", "403", "404", "422"},
    ("/v1/queue/{rank}", "get"): {"200", "401", "403", "404", "422"},
    ("/v1/queue/{rank}/image", "get"): {"200", "401", "403", "404", "413", "415", "422"},
    ("/v1/queue/{rank}/label", "post"): {"200", "201", "400", "401", "403", "404", "409", "413", "415", "422"},
    ("/v1/keys/me", "get"): {"200", "401"},
    ("/v1/model", "get"): {"200"},
    ("/readyz", "get"): {"200", "503"},
    ("/healthz", "get"): {"200"},
}


def test_the_openapi_document_describes_what_the_service_answers(api: TestClient, api_keys: dict[str, str]) -> None:
    headers = auth(api_keys["curate"])
    spec = api.get("/openapi.json").json()
    listed = {(path, method): set(op["responses"]) for path, ops in spec["paths"].items() for method, op in ops.items()}
    assert listed == EXPECTED_STATUSES
    for (path, method), statuses in listed.items():
        for status in statuses - {"200", "201", "503"}:
            content = spec["paths"][path][method]["responses"][status]["content"]
            assert content == {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    schemas = spec["components"]["schemas"]
    assert schemas["Body_contribute_v1_contributions_post"]["required"] == ["image", "labels"]
    assert schemas["Body_predict_v1_predict_post"]["properties"]["image"]["minItems"] == 1
    parameters = {p["name"]: p["schema"] for p in spec["paths"]["/v1/contributions"]["get"]["parameters"]}
    assert parameters["offset"]["maximum"] == 2**31 - 1 and parameters["limit"]["maximum"] == 1000
    assert parameters["status"]["anyOf"][0]["enum"] == ["pending", "accepted", "rejected"]

    # A request the framework refuses is answered as documented: {"detail": one line}.
    response = api.post("/v1/predict", files={"other": ("x.npy", b"")}, headers=headers)
    assert response.status_code == 422 and response.json() == {"detail": "form field 'image': Field required, got nothing"}
    response = api.post("/v1/contributions/abc/accept", json={"note": 5}, headers=headers)
    assert response.status_code == 422
    assert response.json()["detail"] == "JSON body field 'note': Input should be a valid string, got 5"
    response = api.post("/v1/contributions/abc/accept", json={"note": "x" * 70_000}, headers=headers)
    assert response.status_code == 413 and "over the limit of 65,536 bytes (a JSON body)" in response.json()["detail"]
    response = api.post("/v1/contributions/abc/accept", content=b"{not json", headers={
        **headers, "content-type": "application/json"})
    assert response.status_code == 422 and "JSON body field" in response.json()["detail"]
    response = api.request("OPTIONS", "/v1/contributions")
    assert response.status_code == 405 and response.headers["allow"] == "GET, POST"
    response = api.delete("/v1/contributions/abc")
    assert response.status_code == 405 and response.headers["allow"] == "GET"
    assert api.get("/v1/nothing").status_code == 404


# -- private state ----------------------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_folder_database_and_files_are_private(api: TestClient, api_keys: dict[str, str]) -> None:
    response = contribute(api, api_keys["contribute"], "private.npy", npy_bytes(np.full((8, 8), 3, np.uint8)))
    assert response.status_code in (200, 201), response.text
    state = api.app.state.settings.state_dir
    assert _mode(state) == 0o700 and _mode(state / "files") == 0o700
    for name in ("cellclass.db", "cellclass.db-wal", "cellclass.db-shm"):
        assert _mode(state / name) == 0o600, name
    sha = response.json()["sha256"]
    stored = state / "files" / sha[:2] / sha[2:4] / f"{sha}.npy"
    assert _mode(stored) == 0o600 and _mode(stored.parent) == 0o700 and _mode(stored.parent.parent) == 0o700


# -- rows older code stored -------------------------------------------------------------------
def test_rows_with_metadata_older_code_accepted_are_listed_readably(api: TestClient, api_keys: dict[str, str],
                                                                    tmp_path: Path) -> None:
    """Before the API bounded its JSON fields, metadata could nest hundreds of levels deep and hold
    NaN, Infinity or lone surrogates; such rows are listed (not a 500), their deep parts as JSON text."""
    service = api.app.state.service
    deep: object = "bottom"
    for _ in range(300):  # more than any response serializer nests
        deep = {"a": deep}
    odd = {"plate": "P9", "deep": deep, "nan": float("nan"), "inf": [float("-inf")], "lone": "x\ud800y"}
    record, created = service.contributions.add(upload_of(300), {"particle_type": "Fe"}, odd,
                                                contributor=api_keys["contribute"].split("_")[1],
                                                dataset=service.dataset_id, model=service.identity)
    assert created
    with service.db.transaction() as tx:  # a row deeper still, as no JSON encoder of Python writes it
        tx.execute("UPDATE contributions SET metadata = ? WHERE id = ?",
                   ('{"plate": "P8", "deeper": ' + "[" * 3000 + "]" * 3000 + "}", record["id"]))
    record, _ = service.contributions.add(upload_of(301), {"particle_type": "X-ray"}, odd,
                                          contributor=api_keys["contribute"].split("_")[1],
                                          dataset=service.dataset_id, model=service.identity)
    for key in (api_keys["curate"], api_keys["contribute"]):
        listed = api.get("/v1/contributions", params={"limit": 1000}, headers=auth(key))
        assert listed.status_code == 200, listed.text
    one = api.get(f"/v1/contributions/{record['id']}", headers=auth(api_keys["curate"]))
    assert one.status_code == 200, one.text
    metadata = one.json()["metadata"]
    assert metadata["plate"] == "P9" and metadata["nan"] == "NaN" and metadata["inf"] == ["-Infinity"]
    assert metadata["lone"] == "x\ufffdy"
    below: object = metadata["deep"]
    for _ in range(14):  # the metadata object is level 1, so 15 levels of "a" are kept as objects
        below = below["a"]
    assert isinstance(below["a"], str)
    text = below["a"]
    for _ in range(300 - 15):
        assert text.startswith('{"a": ')
        text = text[len('{"a": '):-1]
    assert text == '"bottom"'
    accepted = api.post(f"/v1/contributions/{record['id']}/accept", headers=auth(api_keys["curate"]))
    assert accepted.status_code == 200 and accepted.json()["metadata"] == metadata
    kept: object = "[" * 2985 + "]" * 2985  # the 3000 lists open at levels 2 to 3001: 15 are kept
    for _ in range(15):
        kept = [kept]
    deeper = [r for r in listed.json()["items"] if r["metadata"].get("plate") == "P8"]
    assert len(deeper) == 1 and deeper[0]["metadata"]["deeper"] == kept
    for status, plate in (("pending", "P8"), ("accepted", "P9")):
        exported = service.contributions.export(tmp_path / status, status=status)
        manifest = DatasetSpec.from_yaml(exported.spec).load_manifest()
        assert plate in {json.loads(m).get("plate") for m in manifest["metadata"]}
