"""The HTTP API in this process (FastAPI's TestClient), router by router: the web page, probes,
predictions, contributions, keys, and the export of what the API collected.

The app is the real one, model loaded in its lifespan, SQLite store in a temporary folder;
what needs a process of its own (restart, kill, load, the fuzzer, a browser) is in the
``test_serve_*`` modules.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from fastapi.testclient import TestClient
from serve_helpers import api_settings, auth, contribute, npy_bytes, tiff_bytes

from cellclass.data.io import read_image_bytes
from cellclass.data.spec import DatasetSpec
from cellclass.serving.app import create_app
from cellclass.inference.predictor import Predictor


def png_bomb(side: int = 50000) -> bytes:
    """A PNG of a few hundred bytes whose header declares side x side pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 4096)) + chunk(b"IEND", b"")


def tiff_bomb(side: int = 50000) -> bytes:
    """A small TIFF whose ImageWidth and ImageLength were rewritten to side x side."""
    data = bytearray(tiff_bytes(np.zeros((8, 8), np.uint8)))
    (ifd,) = struct.unpack_from("<I", data, 4)
    (entries,) = struct.unpack_from("<H", data, ifd)
    for i in range(entries):
        at = ifd + 2 + 12 * i
        tag = struct.unpack_from("<H", data, at)[0]
        if tag in (256, 257):
            struct.pack_into("<HHII", data, at, tag, 4, 1, side)
    return bytes(data)


def one_line_detail(response) -> str:
    """The ``detail`` of an error answer, checked to be the whole body and one line."""
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and "\n" not in body["detail"], body
    return body["detail"]


@pytest.fixture
def app_of(api_run: Path, tmp_path: Path) -> Iterator:
    """Start apps of other settings on the trained run (each with its own state folder)."""
    clients: list[TestClient] = []

    def start(**overrides: object) -> TestClient:
        client = TestClient(create_app(api_settings(api_run, tmp_path / f"state{len(clients)}", **overrides)))
        clients.append(client.__enter__())
        return client

    yield start
    for client in clients:
        client.__exit__(None, None, None)


# -- the web page and the probes ------------------------------------------------------------
def test_probes_model_description_docs_and_page(api: TestClient) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    ready = api.get("/readyz").json()
    assert ready["status"] == "ready" and ready["database"] is True and ready["model"]["name"] == "lenet5"
    info = api.get("/v1/model").json()
    assert [t["name"] for t in info["tasks"]] == ["particle_type"]
    assert info["tasks"][0]["classes"] == ["Fe", "X-ray"]
    assert info["channels"] == ["53BP1"] and info["in_chans"] == 1 and info["image_size"] == 32
    assert info["model"]["name"] == "lenet5" and info["model"]["backend"] == "torch"
    assert info["limits"]["max_upload_bytes"] == 1024 * 1024 and info["limits"]["max_images"] == 4
    assert info["open_predict"] is False and info["limits"]["accepted_extensions"] == [".tif", ".tiff", ".png", ".npy"]
    spec = api.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/contributions", "/v1/model", "/healthz", "/readyz"} <= set(spec["paths"])
    assert "bearer" in json.dumps(spec["components"]["securitySchemes"]).lower()
    assert "/" not in spec["paths"] and not any(p.startswith("/static") for p in spec["paths"])
    assert api.get("/docs").status_code == 200
    page = api.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "cellclass" in page.text and "/static/app.js" in page.text
    assert "predict" in api.get("/static/app.js").text
    assert api.get("/static/style.css").status_code == 200
    assert api.get("/static/nothing.js").status_code == 404


def test_readiness_says_loading_until_the_lifespan_has_run(api_run: Path, tmp_path: Path) -> None:
    client = TestClient(create_app(api_settings(api_run, tmp_path / "state")))  # not entered: no lifespan
    response = client.get("/readyz")
    assert response.status_code == 503 and response.json() == {"status": "loading", "database": False}
    assert client.get("/healthz").json() == {"status": "ok"}
    assert not (tmp_path / "state").exists()  # nothing was loaded or opened


# -- predictions ----------------------------------------------------------------------------
def test_predict_gives_probabilities_labels_and_identity(api: TestClient, api_keys: dict[str, str], api_run: Path,
                                                          bps_images: list[tuple[str, bytes, str]]) -> None:
    (name_a, tif_a, _), (name_b, tif_b, _) = bps_images[:2]
    array_b = read_image_bytes(tif_b, name_b)
    png_b = bytes(imagecodecs.png_encode(array_b[0]))
    response = api.post("/v1/predict", headers=auth(api_keys["predict"]),
                        files=[("image", (name_a, tif_a)), ("image", ("b.png", png_b)),
                               ("image", ("b.npy", npy_bytes(array_b)))])
    assert response.status_code == 200, response.text
    body = response.json()
    checkpoint = api_run / "checkpoints" / "best.ckpt"
    assert body["model"]["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert body["model"]["name"] == "lenet5" and body["model"]["run"] == "run"
    assert [p["filename"] for p in body["predictions"]] == [name_a, "b.png", "b.npy"]
    expected = Predictor.from_checkpoint(api_run).predict_images([read_image_bytes(tif_a, name_a), array_b])
    for got, want in zip(body["predictions"], [expected[0], expected[1], expected[1]], strict=True):
        result = got["tasks"]["particle_type"]
        assert set(result["probabilities"]) == {"Fe", "X-ray"}
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert result["label"] == max(result["probabilities"], key=result["probabilities"].get)
        assert result["label"] == want["particle_type"]["label"]
        for cls, p in want["particle_type"]["probabilities"].items():
            assert result["probabilities"][cls] == pytest.approx(p, abs=1e-5)


@pytest.mark.parametrize("tta", [False, True])
def test_the_tta_setting_decides_how_the_service_predicts(app_of, api_run: Path, bps_images, tta: bool) -> None:
    client = app_of(tta=tta, open_predict=True)
    files = [("image", (name, tif)) for name, tif, _ in bps_images[:4]]
    body = client.post("/v1/predict", files=files).json()
    assert body["model"]["tta"] is tta and client.get("/v1/model").json()["model"]["tta"] is tta
    images = [read_image_bytes(tif, name) for name, tif, _ in bps_images[:4]]
    expected = Predictor.from_checkpoint(api_run, tta=tta).predict_images(images)
    other = Predictor.from_checkpoint(api_run, tta=not tta).predict_images(images)
    got = [p["tasks"]["particle_type"]["probabilities"]["Fe"] for p in body["predictions"]]
    assert got == pytest.approx([e["particle_type"]["probabilities"]["Fe"] for e in expected], abs=1e-5)
    assert got != pytest.approx([o["particle_type"]["probabilities"]["Fe"] for o in other], abs=1e-5)


def test_predict_needs_a_valid_key(api: TestClient, api_keys: dict[str, str], bps_images) -> None:
    name, tif, _ = bps_images[0]
    files = {"image": (name, tif)}
    response = api.post("/v1/predict", files=files)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "needs an API key with role 'predict'" in one_line_detail(response)
    response = api.post("/v1/predict", files=files, headers=auth("cc_00000000_" + "x" * 43))
    assert response.status_code == 401 and "unknown API key" in response.json()["detail"]
    assert "malformed API key" in api.post("/v1/predict", files=files, headers=auth("not-a-key")).json()["detail"]
    response = api.post("/v1/predict", files=files, headers={"Authorization": f"Basic {api_keys['predict']}"})
    assert response.status_code == 401 and "got none" in response.json()["detail"]  # only bearer tokens count
    keys = api.app.state.service.keys
    revoked = keys.create("predict", "to revoke")[0]
    keys.revoke(revoked)
    response = api.post("/v1/predict", files=files, headers=auth(revoked))
    assert response.status_code == 401 and "was revoked" in response.json()["detail"]
    for role in ("contribute", "curate"):  # stronger roles include predict
        assert api.post("/v1/predict", files=files, headers=auth(api_keys[role])).status_code == 200


def test_open_predict_opens_predictions_and_nothing_else(app_of, bps_images) -> None:
    client = app_of(open_predict=True)
    name, tif, particle = bps_images[0]
    assert client.get("/v1/model").json()["open_predict"] is True
    assert client.post("/v1/predict", files={"image": (name, tif)}).status_code == 200
    assert client.post("/v1/saliency", files={"image": (name, tif)}).status_code == 200
    response = contribute(client, None, name, tif, {"particle_type": particle})
    assert response.status_code == 401 and "role 'contribute'" in response.json()["detail"]
    assert client.get("/v1/contributions").status_code == 401
    assert client.get("/v1/keys/me").status_code == 401


@pytest.mark.parametrize(("name", "data", "status", "message"), [
    ("../x.tif", b"II*\x00", 422, "is not a plain file name"),
    ("dir/x.tif", b"II*\x00", 422, "is not a plain file name"),
    (".hidden.tif", b"II*\x00", 422, "is not a plain file name"),
    ("notes.txt", b"hello", 415, "has extension '.txt'; valid: .tif, .tiff, .png, .npy"),
    ("fake.tif", b"<html>not an image</html>", 415, "is not a TIFF image"),
    ("fake.png", b"II*\x00" + b"\0" * 20, 415, "is not a PNG image"),
    ("empty.png", b"", 422, "is empty"),
    ("bomb.png", png_bomb(), 413, "declares 2,500,000,000 pixel values"),
    ("bomb.tif", tiff_bomb(), 413, "declares 2,500,000,000 pixel values"),
    ("truncated.png", png_bomb(64)[:40], 422, "cannot"),
    ("rgb.tif", tiff_bytes(np.zeros((3, 32, 32), np.uint16)), 422, "has 3 channel(s); the model expects 1 (53BP1)"),
    ("nan.npy", npy_bytes(np.full((32, 32), np.nan, np.float32)), 422, "NaN or infinite"),
    ("big.npy", npy_bytes(np.zeros((600, 600), np.float32)), 413, "the limit is 1,048,576 bytes"),
])
def test_bad_uploads_are_refused_with_clear_errors(api: TestClient, api_keys: dict[str, str], name: str, data: bytes,
                                                   status: int, message: str) -> None:
    key = api_keys["contribute"]
    for response in (api.post("/v1/predict", files={"image": (name, data)}, headers=auth(key)),
                     api.post("/v1/saliency", files={"image": (name, data)}, headers=auth(key)),
                     contribute(api, key, name, data, {"particle_type": "Fe"})):
        assert response.status_code == status, response.text
        assert message in one_line_detail(response)


def test_request_limits(api: TestClient, api_keys: dict[str, str], bps_images) -> None:
    tif = bps_images[0][1]
    headers = auth(api_keys["predict"])
    response = api.post("/v1/predict", files=[("image", (f"{i}.tif", tif)) for i in range(5)], headers=headers)
    assert response.status_code == 413 and "got 5 images in one request; the limit is 4" in response.json()["detail"]
    big = b"II*\x00" + b"\0" * (3 * 1024 * 1024)  # over one 1 MiB image + 1 MiB: refused before parsing
    response = api.post("/v1/predict", files={"image": ("huge.tif", big)}, headers=headers)
    assert response.status_code == 413 and "over the limit of 2,097,152 bytes" in response.json()["detail"]
    # Several images share the bound: four of 0.6 MiB each are refused as one request.
    part = b"II*\x00" + b"\0" * (600 * 1024)
    response = api.post("/v1/predict", files=[("image", (f"{i}.tif", part)) for i in range(4)], headers=headers)
    assert response.status_code == 413 and "over the limit of 2,097,152 bytes" in response.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the body is counted as it arrives
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.tif"\r\n\r\n'
        for _ in range(7):
            yield b"\0" * (1024 * 1024)

    response = api.post("/v1/predict", content=chunks(),
                        headers={**headers, "content-type": "multipart/form-data; boundary=b"})
    assert response.status_code == 413 and "over the limit of 2,097,152 bytes" in response.json()["detail"]
    assert api.get("/healthz").status_code == 200


def test_saliency_overlay_png(api: TestClient, api_keys: dict[str, str], bps_images) -> None:
    name, tif, _ = bps_images[0]
    headers = auth(api_keys["predict"])
    response = api.post("/v1/saliency", files={"image": (name, tif)}, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-cellclass-task"] == "particle_type"
    assert response.headers["x-cellclass-class"] in ("Fe", "X-ray")
    assert response.headers["x-cellclass-layer"] == "features.4"
    assert 0.0 <= float(response.headers["x-cellclass-probability"]) <= 1.0
    png = imagecodecs.png_decode(response.content)
    assert png.ndim == 3 and png.shape[2] == 3 and png.shape[1] > 2 * png.shape[0] - 20
    chosen = api.post("/v1/saliency", files={"image": (name, tif)}, data={"class_name": "X-ray"}, headers=headers)
    assert chosen.headers["x-cellclass-class"] == "X-ray"
    bad = api.post("/v1/saliency", files={"image": (name, tif)}, data={"task": "dose"}, headers=headers)
    assert bad.status_code == 422 and "unknown task 'dose'; valid: particle_type" in bad.json()["detail"]
    bad = api.post("/v1/saliency", files={"image": (name, tif)}, data={"class_name": "Proton"}, headers=headers)
    assert bad.status_code == 422 and "has no class 'Proton'; valid: Fe, X-ray" in bad.json()["detail"]
    assert api.post("/v1/saliency", files={"image": (name, tif)}).status_code == 401


# -- contributions --------------------------------------------------------------------------
def test_contribute_401_without_key_403_with_predict_key_201_with_contribute_key(
        api: TestClient, api_keys: dict[str, str], bps_images) -> None:
    name, tif, particle = bps_images[3]
    response = contribute(api, None, name, tif, {"particle_type": particle})
    assert response.status_code == 401 and "role 'contribute'" in one_line_detail(response)
    assert response.headers["www-authenticate"] == "Bearer"
    response = contribute(api, api_keys["predict"], name, tif, {"particle_type": particle})
    assert response.status_code == 403
    assert "has role 'predict'" in response.json()["detail"] and "contribute, curate" in response.json()["detail"]
    response = contribute(api, api_keys["contribute"], name, tif, {"particle_type": particle},
                          {"plate": "P242", "note": "test"})
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["status"] == "pending" and record["labels"] == {"particle_type": particle}
    assert record["sha256"] == hashlib.sha256(tif).hexdigest() and record["shape"][0] == 1
    assert record["metadata"] == {"plate": "P242", "note": "test"} and record["duplicate"] is False
    assert record["contributor"] == api_keys["contribute"].split("_")[1] and record["filename"] == name
    again = contribute(api, api_keys["contribute"], name, tif, {"particle_type": particle},
                       {"plate": "P242", "note": "test"})
    assert again.status_code == 200 and again.json()["id"] == record["id"] and again.json()["duplicate"] is True
    state = api.app.state.settings.state_dir
    stored = list((state / "files").rglob("*.tif"))
    assert hashlib.sha256(tif).hexdigest() + ".tif" in {p.name for p in stored}


@pytest.mark.parametrize(("labels", "message"), [
    ({"particle": "Fe"}, "unknown task(s) ['particle']; valid tasks: particle_type"),
    ({"particle_type": "Xray"}, "task 'particle_type' got unknown label 'Xray'; valid: Fe, X-ray"),
    ({"particle_type": ["Fe"]}, "task 'particle_type' takes one class name"),
    ({}, "labels must be a non-empty JSON object"),
    ("{not json", "the form field 'labels' is not valid JSON"),
    ("", "form field 'labels': Field required, got nothing"),
])
def test_labels_are_checked_against_the_model(api: TestClient, api_keys: dict[str, str], bps_images, labels: object,
                                              message: str) -> None:
    name, tif, _ = bps_images[5]
    response = contribute(api, api_keys["contribute"], name, tif, labels)
    assert response.status_code == 422 and message in one_line_detail(response)


def test_metadata_must_be_an_object(api: TestClient, api_keys: dict[str, str], bps_images) -> None:
    name, tif, _ = bps_images[5]
    response = contribute(api, api_keys["contribute"], name, tif, {"particle_type": "Fe"}, "[1, 2]")
    assert response.status_code == 422 and "metadata must be a JSON object, got [1, 2]" in response.json()["detail"]


def test_nothing_is_written_when_a_contribution_fails(api: TestClient, api_keys: dict[str, str], bps_images) -> None:
    files = api.app.state.settings.state_dir / "files"

    def snapshot() -> tuple[int, list[Path]]:
        total = api.get("/v1/contributions", headers=auth(api_keys["curate"])).json()["total"]
        return total, sorted(p for p in files.rglob("*") if p.is_file())

    before = snapshot()
    name, tif, _ = bps_images[7]
    key = api_keys["contribute"]
    assert contribute(api, key, name, tif, {"particle_type": "Xray"}).status_code == 422
    assert contribute(api, key, name, tif, {"particle_type": "Fe"}, "{broken").status_code == 422
    assert contribute(api, key, "rgb.tif", tiff_bytes(np.ones((3, 8, 8), np.uint16)), {"particle_type": "Fe"}).status_code == 422
    assert snapshot() == before
    assert not [p for p in files.rglob("*.tmp")]


def test_listing_visibility_and_review(api: TestClient, api_keys: dict[str, str], bps_images) -> None:
    (name_a, tif_a, label_a), (name_b, tif_b, label_b) = bps_images[10], bps_images[11]
    a, curator = auth(api_keys["contribute"]), auth(api_keys["curate"])
    id_a = contribute(api, api_keys["contribute"], name_a, tif_a, {"particle_type": label_a}).json()["id"]
    id_b = contribute(api, api_keys["contribute_b"], name_b, tif_b, {"particle_type": label_b}).json()["id"]
    mine = api.get("/v1/contributions", params={"limit": 1000}, headers=a).json()
    assert id_a in {r["id"] for r in mine["items"]} and id_b not in {r["id"] for r in mine["items"]}
    assert {r["contributor"] for r in mine["items"]} == {api_keys["contribute"].split("_")[1]}
    own = api_keys["contribute"].split("_")[1]
    assert api.get("/v1/contributions", params={"contributor": own}, headers=a).json()["total"] == mine["total"]
    other = api_keys["contribute_b"].split("_")[1]
    denied = api.get("/v1/contributions", params={"contributor": other}, headers=a)
    assert denied.status_code == 403 and "may list only its own contributions" in one_line_detail(denied)
    not_an_id = api.get("/v1/contributions", params={"contributor": "someone"}, headers=a)
    assert not_an_id.status_code == 422
    assert "query parameter 'contributor': String should match pattern '^[0-9a-f]{8}$', got 'someone'" \
        in not_an_id.json()["detail"]
    assert api.get("/v1/contributions", headers=auth(api_keys["predict"])).status_code == 403
    everything = {r["id"] for r in api.get("/v1/contributions", params={"limit": 1000}, headers=curator).json()["items"]}
    assert {id_a, id_b} <= everything
    of_b = api.get("/v1/contributions", params={"contributor": other, "limit": 1000}, headers=curator).json()
    assert id_b in {r["id"] for r in of_b["items"]} and {r["contributor"] for r in of_b["items"]} == {other}
    page = api.get("/v1/contributions", params={"limit": 1, "offset": 1}, headers=curator).json()
    assert (page["limit"], page["offset"], len(page["items"])) == (1, 1, 1) and page["total"] >= 2
    assert api.get(f"/v1/contributions/{id_b}", headers=a).status_code == 404
    assert api.get(f"/v1/contributions/{id_b}/image", headers=a).status_code == 404
    assert api.get(f"/v1/contributions/{id_b}", headers=curator).json()["id"] == id_b
    image = api.get(f"/v1/contributions/{id_a}/image", headers=a)
    assert image.content == tif_a and image.headers["content-type"] == "image/tiff"
    assert image.headers["content-disposition"] == f'attachment; filename="{hashlib.sha256(tif_a).hexdigest()}.tif"'
    response = api.post(f"/v1/contributions/{id_a}/accept", headers=a)
    assert response.status_code == 403 and "valid roles: curate" in response.json()["detail"]
    accepted = api.post(f"/v1/contributions/{id_a}/accept", json={"note": "looks right"}, headers=curator).json()
    assert accepted["status"] == "accepted" and accepted["review_note"] == "looks right"
    assert accepted["reviewed_by"] == api_keys["curate"].split("_")[1]
    assert api.post(f"/v1/contributions/{id_b}/reject", headers=curator).json()["status"] == "rejected"
    missing = api.post("/v1/contributions/nope/accept", headers=curator)
    assert missing.status_code == 404 and "no contribution with id 'nope'" in missing.json()["detail"]
    assert api.get("/v1/contributions/nope", headers=curator).status_code == 404
    rejected = api.get("/v1/contributions", params={"status": "rejected", "limit": 1000}, headers=curator).json()["items"]
    assert id_b in {r["id"] for r in rejected}
    bad = api.get("/v1/contributions", params={"status": "maybe"}, headers=curator)
    assert bad.status_code == 422
    assert bad.json()["detail"] == ("query parameter 'status': Input should be 'pending', 'accepted' or "
                                    "'rejected', got 'maybe'")


# -- keys -----------------------------------------------------------------------------------
def test_whoami_names_the_calling_key(api: TestClient, api_keys: dict[str, str]) -> None:
    body = api.get("/v1/keys/me", headers=auth(api_keys["contribute"])).json()
    assert body == {"key_id": api_keys["contribute"].split("_")[1], "role": "contribute", "name": "lab A"}
    assert api.get("/v1/keys/me", headers=auth(api_keys["predict"])).json()["role"] == "predict"
    response = api.get("/v1/keys/me")
    assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"


# -- export of what the API collected -------------------------------------------------------
def test_accepted_contributions_export_as_a_training_set(app_of, bps_images, tmp_path: Path) -> None:
    client = app_of()
    keys = client.app.state.service.keys
    contributor, curator = keys.create("contribute")[0], auth(keys.create("curate")[0])
    chosen = bps_images[20:26]
    ids = []
    for i, (name, tif, particle) in enumerate(chosen):
        response = contribute(client, contributor, name, tif, {"particle_type": particle},
                              {"plate": name.split("_")[0], "index": i})
        assert response.status_code == 201, response.text
        ids.append(response.json()["id"])
    for contribution_id in ids[:-2]:
        assert client.post(f"/v1/contributions/{contribution_id}/accept", headers=curator).status_code == 200
    assert client.post(f"/v1/contributions/{ids[-1]}/reject", headers=curator).status_code == 200

    result = client.app.state.service.contributions.export(tmp_path / "export")
    assert (result.n_rows, result.n_images) == (4, 4)
    assert result.dataset_id == client.get("/v1/model").json()["dataset_id"]
    spec = DatasetSpec.from_yaml(result.spec)
    frame = spec.load_manifest()
    assert list(frame["contribution_id"]) == ids[:-2]
    assert spec.labels(frame, "particle_type") == [particle for _, _, particle in chosen[:-2]]
    assert spec.tasks[0].classes == ["Fe", "X-ray"] and spec.image.column == "filename"
    assert [json.loads(m)["index"] for m in frame["metadata"]] == [0, 1, 2, 3]
    for (name, tif, _), row in zip(chosen[:-2], frame.to_dict("records"), strict=True):
        assert (result.out / row["filename"]).read_bytes() == tif
        assert row["source_filename"] == name
