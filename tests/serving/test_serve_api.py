"""The HTTP API through a real `cellclass serve` process on loopback."""

from __future__ import annotations

import hashlib
import json
import struct
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pytest
from serve_helpers import Server, npy_bytes, tiff_bytes

pytestmark = pytest.mark.slow  # every test trains its run through the CLI or starts `cellclass serve` (a real process)


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


def contribute(client, name: str, data: bytes, labels: object, metadata: object = None):
    form = {"labels": labels if isinstance(labels, str) else json.dumps(labels)}
    if metadata is not None:
        form["metadata"] = metadata if isinstance(metadata, str) else json.dumps(metadata)
    return client.post("/v1/contributions", files={"image": (name, data)}, data=form)


def test_probes_model_description_docs_and_page(server: Server) -> None:
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz").json()
        assert ready["status"] == "ready" and ready["database"] is True
        info = c.get("/v1/model").json()
        assert [t["name"] for t in info["tasks"]] == ["particle_type"]
        assert info["tasks"][0]["classes"] == ["Fe", "X-ray"]
        assert info["channels"] == ["53BP1"] and info["in_chans"] == 1 and info["image_size"] == 32
        assert info["model"]["name"] == "lenet5" and info["model"]["backend"] == "torch"
        assert info["limits"]["max_upload_bytes"] == 1024 * 1024 and info["limits"]["max_images"] == 4
        spec = c.get("/openapi.json").json()
        assert {"/v1/predict", "/v1/contributions", "/v1/model", "/healthz", "/readyz"} <= set(spec["paths"])
        assert "bearer" in json.dumps(spec["components"]["securitySchemes"]).lower()
        assert c.get("/docs").status_code == 200
        page = c.get("/")
        assert page.status_code == 200 and "cellclass" in page.text and "/static/app.js" in page.text
        assert "predict" in c.get("/static/app.js").text


def test_predict_gives_probabilities_labels_and_identity(server: Server, keys: dict[str, str], served_run: Path,
                                                          bps_images: list[tuple[str, bytes, str]]) -> None:
    from cellclass.data.io import read_image_bytes
    from cellclass.inference.predictor import Predictor

    (name_a, tif_a, _), (name_b, tif_b, _) = bps_images[:2]
    array_b = read_image_bytes(tif_b, name_b)
    png_b = bytes(imagecodecs.png_encode(array_b[0]))
    with server.client(keys["predict"]) as c:
        response = c.post("/v1/predict", files=[("image", (name_a, tif_a)), ("image", ("b.png", png_b)),
                                                ("image", ("b.npy", npy_bytes(array_b)))])
    assert response.status_code == 200, response.text
    body = response.json()
    checkpoint = served_run / "checkpoints" / "best.ckpt"
    assert body["model"]["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert body["model"]["name"] == "lenet5" and body["model"]["run"] == "run"
    assert [p["filename"] for p in body["predictions"]] == [name_a, "b.png", "b.npy"]
    expected = Predictor.from_checkpoint(served_run).predict_images([read_image_bytes(tif_a, name_a), array_b])
    for got, want in zip(body["predictions"], [expected[0], expected[1], expected[1]], strict=True):
        result = got["tasks"]["particle_type"]
        assert set(result["probabilities"]) == {"Fe", "X-ray"}
        assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert result["label"] == max(result["probabilities"], key=result["probabilities"].get)
        assert result["label"] == want["particle_type"]["label"]
        for cls, p in want["particle_type"]["probabilities"].items():
            assert result["probabilities"][cls] == pytest.approx(p, abs=1e-5)


def test_predict_needs_a_valid_key(server: Server, keys: dict[str, str], bps_images) -> None:
    name, tif, _ = bps_images[0]
    files = {"image": (name, tif)}
    with server.client() as c:
        response = c.post("/v1/predict", files=files)
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert "needs an API key with role 'predict'" in response.json()["detail"]
    with server.client("cc_00000000_" + "x" * 43) as c:
        response = c.post("/v1/predict", files=files)
        assert response.status_code == 401 and "unknown API key" in response.json()["detail"]
    with server.client("not-a-key") as c:
        assert "malformed API key" in c.post("/v1/predict", files=files).json()["detail"]
    revoked = server.key("predict", "to revoke")
    from cellclass.serving.database import Database
    from cellclass.serving.keys import KeyStore

    db = Database(f"sqlite:///{server.state_dir / 'cellclass.db'}")
    KeyStore(db).revoke(revoked)
    db.close()
    with server.client(revoked) as c:
        response = c.post("/v1/predict", files=files)
        assert response.status_code == 401 and "was revoked" in response.json()["detail"]
    for role in ("contribute", "curate"):  # stronger roles include predict
        with server.client(keys[role]) as c:
            assert c.post("/v1/predict", files=files).status_code == 200


def test_contribute_401_without_key_403_with_predict_key_201_with_contribute_key(
        server: Server, keys: dict[str, str], bps_images) -> None:
    name, tif, particle = bps_images[3]
    with server.client() as c:
        response = contribute(c, name, tif, {"particle_type": particle})
        assert response.status_code == 401 and "role 'contribute'" in response.json()["detail"]
    with server.client(keys["predict"]) as c:
        response = contribute(c, name, tif, {"particle_type": particle})
        assert response.status_code == 403
        assert "has role 'predict'" in response.json()["detail"] and "contribute, curate" in response.json()["detail"]
    with server.client(keys["contribute"]) as c:
        response = contribute(c, name, tif, {"particle_type": particle}, {"plate": "P242", "note": "test"})
        assert response.status_code == 201, response.text
        record = response.json()
        assert record["status"] == "pending" and record["labels"] == {"particle_type": particle}
        assert record["sha256"] == hashlib.sha256(tif).hexdigest() and record["shape"][0] == 1
        assert record["metadata"] == {"plate": "P242", "note": "test"} and record["duplicate"] is False
        again = contribute(c, name, tif, {"particle_type": particle}, {"plate": "P242", "note": "test"})
        assert again.status_code == 200 and again.json()["id"] == record["id"] and again.json()["duplicate"] is True
    stored = list((server.state_dir / "files").rglob("*.tif"))
    assert hashlib.sha256(tif).hexdigest() + ".tif" in {p.name for p in stored}


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
def test_bad_uploads_are_refused_with_clear_errors(server: Server, keys: dict[str, str], name: str, data: bytes,
                                                   status: int, message: str) -> None:
    with server.client(keys["contribute"]) as c:
        for response in (c.post("/v1/predict", files={"image": (name, data)}),
                         contribute(c, name, data, {"particle_type": "Fe"})):
            assert response.status_code == status, response.text
            assert message in response.json()["detail"]


def test_request_limits(server: Server, keys: dict[str, str], bps_images) -> None:
    tif = bps_images[0][1]
    with server.client(keys["predict"]) as c:
        response = c.post("/v1/predict", files=[("image", (f"{i}.tif", tif)) for i in range(5)])
        assert response.status_code == 413 and "got 5 images in one request; the limit is 4" in response.json()["detail"]
        big = b"II*\x00" + b"\0" * (3 * 1024 * 1024)  # over one 1 MiB image + 1 MiB: refused before parsing
        response = c.post("/v1/predict", files={"image": ("huge.tif", big)})
        assert response.status_code == 413 and "over the limit of 2,097,152 bytes" in response.json()["detail"]
        # Several images share the bound: four of 0.6 MiB each are refused as one request.
        part = b"II*\x00" + b"\0" * (600 * 1024)
        response = c.post("/v1/predict", files=[("image", (f"{i}.tif", part)) for i in range(4)])
        assert response.status_code == 413 and "over the limit of 2,097,152 bytes" in response.json()["detail"]

        def chunks():  # no Content-Length: the body is counted as it arrives
            yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.tif"\r\n\r\n'
            for _ in range(7):
                yield b"\0" * (1024 * 1024)

        response = c.post("/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert response.status_code == 413 and "over the limit of 2,097,152 bytes" in response.json()["detail"]
        assert c.get("/healthz").status_code == 200


@pytest.mark.parametrize(("labels", "message"), [
    ({"particle": "Fe"}, "unknown task(s) ['particle']; valid tasks: particle_type"),
    ({"particle_type": "Xray"}, "task 'particle_type' got unknown label 'Xray'; valid: Fe, X-ray"),
    ({"particle_type": ["Fe"]}, "task 'particle_type' takes one class name"),
    ({}, "labels must be a non-empty JSON object"),
    ("{not json", "the form field 'labels' is not valid JSON"),
    ("", "form field 'labels': Field required, got nothing"),
])
def test_labels_are_checked_against_the_model(server: Server, keys: dict[str, str], bps_images, labels: object,
                                              message: str) -> None:
    name, tif, _ = bps_images[5]
    with server.client(keys["contribute"]) as c:
        response = contribute(c, name, tif, labels)
    assert response.status_code == 422 and message in response.json()["detail"]


def test_metadata_must_be_an_object(server: Server, keys: dict[str, str], bps_images) -> None:
    name, tif, _ = bps_images[5]
    with server.client(keys["contribute"]) as c:
        response = contribute(c, name, tif, {"particle_type": "Fe"}, "[1, 2]")
    assert response.status_code == 422 and "metadata must be a JSON object, got [1, 2]" in response.json()["detail"]


def test_nothing_is_written_when_a_contribution_fails(server: Server, keys: dict[str, str], bps_images) -> None:
    def snapshot() -> tuple[int, list[Path]]:
        with server.client(keys["curate"]) as c:
            total = c.get("/v1/contributions").json()["total"]
        return total, sorted(p for p in (server.state_dir / "files").rglob("*") if p.is_file())

    before = snapshot()
    name, tif, _ = bps_images[7]
    with server.client(keys["contribute"]) as c:
        assert contribute(c, name, tif, {"particle_type": "Xray"}).status_code == 422
        assert contribute(c, name, tif, {"particle_type": "Fe"}, "{broken").status_code == 422
        assert contribute(c, "rgb.tif", tiff_bytes(np.ones((3, 8, 8), np.uint16)), {"particle_type": "Fe"}).status_code == 422
    assert snapshot() == before
    assert not [p for p in (server.state_dir / "files").rglob("*.tmp")]


def test_listing_visibility_and_review(server: Server, keys: dict[str, str], bps_images) -> None:
    (name_a, tif_a, label_a), (name_b, tif_b, label_b) = bps_images[10], bps_images[11]
    with server.client(keys["contribute"]) as a, server.client(keys["contribute_b"]) as b, \
            server.client(keys["curate"]) as curator:
        id_a = contribute(a, name_a, tif_a, {"particle_type": label_a}).json()["id"]
        id_b = contribute(b, name_b, tif_b, {"particle_type": label_b}).json()["id"]
        mine = a.get("/v1/contributions", params={"limit": 1000}).json()
        assert id_a in {r["id"] for r in mine["items"]} and id_b not in {r["id"] for r in mine["items"]}
        assert {r["contributor"] for r in mine["items"]} == {keys["contribute"].split("_")[1]}
        other = keys["contribute_b"].split("_")[1]
        assert a.get("/v1/contributions", params={"contributor": other}).status_code == 403
        not_an_id = a.get("/v1/contributions", params={"contributor": "someone"})
        assert not_an_id.status_code == 422
        assert "query parameter 'contributor': String should match pattern '^[0-9a-f]{8}$', got 'someone'" \
            in not_an_id.json()["detail"]
        everything = {r["id"] for r in curator.get("/v1/contributions", params={"limit": 1000}).json()["items"]}
        assert {id_a, id_b} <= everything
        assert a.get(f"/v1/contributions/{id_b}").status_code == 404
        assert a.get(f"/v1/contributions/{id_a}/image").content == tif_a
        response = a.post(f"/v1/contributions/{id_a}/accept")
        assert response.status_code == 403 and "valid roles: curate" in response.json()["detail"]
        accepted = curator.post(f"/v1/contributions/{id_a}/accept", json={"note": "looks right"}).json()
        assert accepted["status"] == "accepted" and accepted["review_note"] == "looks right"
        assert accepted["reviewed_by"] == keys["curate"].split("_")[1]
        assert curator.post(f"/v1/contributions/{id_b}/reject").json()["status"] == "rejected"
        missing = curator.post("/v1/contributions/nope/accept")
        assert missing.status_code == 404 and "no contribution with id 'nope'" in missing.json()["detail"]
        rejected = curator.get("/v1/contributions", params={"status": "rejected", "limit": 1000}).json()["items"]
        assert id_b in {r["id"] for r in rejected}
        bad = curator.get("/v1/contributions", params={"status": "maybe"})
        assert bad.status_code == 422
        assert bad.json()["detail"] == ("query parameter 'status': Input should be 'pending', 'accepted' or "
                                        "'rejected', got 'maybe'")
        assert a.get("/v1/keys/me").json()["role"] == "contribute"


def test_saliency_overlay_png(server: Server, keys: dict[str, str], bps_images) -> None:
    name, tif, _ = bps_images[0]
    with server.client(keys["predict"]) as c:
        response = c.post("/v1/saliency", files={"image": (name, tif)})
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        assert response.headers["x-cellclass-task"] == "particle_type"
        assert response.headers["x-cellclass-class"] in ("Fe", "X-ray")
        assert response.headers["x-cellclass-layer"] == "features.4"
        png = imagecodecs.png_decode(response.content)
        assert png.ndim == 3 and png.shape[2] == 3 and png.shape[1] > 2 * png.shape[0] - 20
        chosen = c.post("/v1/saliency", files={"image": (name, tif)}, data={"class_name": "X-ray"})
        assert chosen.headers["x-cellclass-class"] == "X-ray"
        bad = c.post("/v1/saliency", files={"image": (name, tif)}, data={"task": "dose"})
        assert bad.status_code == 422 and "unknown task 'dose'; valid: particle_type" in bad.json()["detail"]
        bad = c.post("/v1/saliency", files={"image": (name, tif)}, data={"class_name": "Proton"})
        assert bad.status_code == 422 and "has no class 'Proton'; valid: Fe, X-ray" in bad.json()["detail"]
