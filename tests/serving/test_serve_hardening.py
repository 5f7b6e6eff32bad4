"""Requests a fuzzer sends: bounded parameters, images the model cannot read, deep or non-standard
JSON, the OpenAPI document describing every answer, the key checked before the body, leftovers of a
killed server, private state. Through real `cellclass serve` processes on loopback."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import sqlite3
import stat
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx
import numpy as np
import pytest
from serve_helpers import Server, make_key, npy_bytes

pytestmark = pytest.mark.slow  # every test trains its run through the CLI or starts `cellclass serve` (a real process)

FE = json.dumps({"particle_type": "Fe"})


def contribute(client: httpx.Client, name: str, data: bytes, labels: str = FE, metadata: str | None = None):
    form = {"labels": labels} if metadata is None else {"labels": labels, "metadata": metadata}
    return client.post("/v1/contributions", files={"image": (name, data)}, data=form)


# -- bounded parameters ---------------------------------------------------------------------
@pytest.mark.parametrize(("params", "message"), [
    ({"offset": 9223372036854775808}, ("query parameter 'offset': Input should be less than or equal to "
                                       "2147483647, got '9223372036854775808'")),
    ({"offset": 10**30, "limit": 5}, "query parameter 'offset': Input should be less than or equal to 2147483647"),
    ({"limit": 10**20}, "query parameter 'limit': Input should be less than or equal to 1000"),
    ({"offset": -1}, "query parameter 'offset': Input should be greater than or equal to 0, got '-1'"),
    ({"limit": "many"}, "query parameter 'limit': Input should be a valid integer"),
])
def test_integer_parameters_are_bounded(server: Server, keys: dict[str, str], params: dict, message: str) -> None:
    with server.client(keys["curate"]) as c:
        response = c.get("/v1/contributions", params=params)
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
def test_images_the_model_cannot_read_get_422_on_every_upload_route(server: Server, keys: dict[str, str], name: str,
                                                                    data: bytes, message: str) -> None:
    with server.client(keys["contribute"]) as c:
        for response in (c.post("/v1/predict", files={"image": (name, data)}),
                         c.post("/v1/saliency", files={"image": (name, data)}),
                         contribute(c, name, data)):
            assert response.status_code == 422, response.text
            assert message in response.json()["detail"]


def test_float64_within_float32_range_is_read(server: Server, keys: dict[str, str]) -> None:
    image = np.linspace(0, 3e38, 64).reshape(8, 8)  # float64, the largest just under float32's limit
    with server.client(keys["predict"]) as c:
        response = c.post("/v1/predict", files={"image": ("wide.npy", npy_bytes(image))})
    assert response.status_code == 200, response.text
    probabilities = response.json()["predictions"][0]["tasks"]["particle_type"]["probabilities"]
    assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)


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
])
def test_json_fields_are_standard_and_bounded(server: Server, keys: dict[str, str], labels: str,
                                              metadata: str | None, message: str) -> None:
    image = npy_bytes(np.full((8, 8), len(labels) + len(metadata or ""), np.uint16))
    with server.client(keys["contribute"]) as c:
        response = contribute(c, "cell.npy", image, labels, metadata)
    assert response.status_code == 422, response.text
    assert message in response.json()["detail"]


def test_metadata_within_the_bounds_is_stored_as_standard_json(server: Server, keys: dict[str, str]) -> None:
    nested: object = 1.5e300
    for _ in range(15):
        nested = {"level": nested}
    metadata = {"plate": "P7", "nested": nested, "big": 10**40, "text": "Zellkern \u00e9\u4e2d"}
    with server.client(keys["contribute"]) as c:
        response = contribute(c, "ok.npy", npy_bytes(np.full((8, 8), 7, np.uint8)), metadata=json.dumps(metadata))
    assert response.status_code == 201, response.text
    assert response.json()["metadata"] == metadata
    with sqlite3.connect(server.state_dir / "cellclass.db") as db:
        stored = db.execute("SELECT metadata FROM contributions WHERE id = ?", (response.json()["id"],)).fetchone()[0]

    def refuse(name: str) -> None:
        raise ValueError(name)

    assert json.loads(stored, parse_constant=refuse) == metadata  # no NaN or Infinity in what was written


# -- the OpenAPI document ---------------------------------------------------------------------
EXPECTED_STATUSES = {
    ("/v1/predict", "post"): {"200", "400", "401", "403", "413", "415", "422"},
    ("/v1/saliency", "post"): {"200", "400", "401", "403", "413", "415", "422"},
    ("/v1/contributions", "post"): {"200", "201", "400", "401", "403", "413", "415", "422"},
    ("/v1/contributions", "get"): {"200", "401", "403", "422"},
    ("/v1/contributions/{contribution_id}", "get"): {"200", "401", "403", "404", "422"},
    ("/v1/contributions/{contribution_id}/image", "get"): {"200", "401", "403", "404", "422"},
    ("/v1/contributions/{contribution_id}/accept", "post"): {"200", "400", "401", "403", "404", "413", "422"},
    ("/v1/contributions/{contribution_id}/reject", "post"): {"200", "400", "401", "403", "404", "413", "422"},
    ("/v1/keys/me", "get"): {"200", "401"},
    ("/v1/model", "get"): {"200"},
    ("/readyz", "get"): {"200", "503"},
    ("/healthz", "get"): {"200"},
}


def test_the_openapi_document_describes_what_the_service_answers(server: Server, keys: dict[str, str]) -> None:
    with server.client(keys["curate"]) as c:
        spec = c.get("/openapi.json").json()
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
        response = c.post("/v1/predict", files={"other": ("x.npy", b"")})
        assert response.status_code == 422 and response.json() == {"detail": "form field 'image': Field required, got nothing"}
        response = c.post("/v1/contributions/abc/accept", json={"note": 5})
        assert response.status_code == 422
        assert response.json()["detail"] == "JSON body field 'note': Input should be a valid string, got 5"
        response = c.post("/v1/contributions/abc/accept", json={"note": "x" * 70_000})
        assert response.status_code == 413 and "over the limit of 65,536 bytes (a JSON body)" in response.json()["detail"]
        response = c.request("OPTIONS", "/v1/contributions")
        assert response.status_code == 405 and response.headers["allow"] == "GET, POST"


# -- the key before the body ------------------------------------------------------------------
def _answer_to_headers_only(server: Server, path: str, key: str | None, declared: int) -> tuple[bytes, float]:
    """Send a request's headers declaring ``declared`` body bytes, and 100 of them; return the answer and its delay."""
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Content-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {declared}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=15) as s:
        s.sendall(head + b"--b\r\n" + b"\0" * 95)
        start = time.monotonic()
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer, time.monotonic() - start


def test_the_key_is_checked_before_the_body_is_read(server: Server, keys: dict[str, str]) -> None:
    # 200 MB declared, 100 bytes sent: an answer now proves nothing waited for (or spooled) the body.
    answer, delay = _answer_to_headers_only(server, "/v1/contributions", None, 200 * 1024 * 1024)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b"needs an API key with role 'contribute'" in answer and b"www-authenticate: bearer" in answer.lower()
    assert b"connection: close" in answer.lower() and delay < 5
    answer, _ = _answer_to_headers_only(server, "/v1/predict", "cc_00000000_" + "x" * 43, 200 * 1024 * 1024)
    assert answer.startswith(b"HTTP/1.1 401") and b"unknown API key" in answer
    answer, _ = _answer_to_headers_only(server, "/v1/contributions", keys["predict"], 200 * 1024 * 1024)
    assert answer.startswith(b"HTTP/1.1 403") and b"has role 'predict'" in answer
    # A valid key: then the size, still before reading (one 1 MiB image + 1 MiB for the form fields).
    answer, _ = _answer_to_headers_only(server, "/v1/contributions", keys["contribute"], 200 * 1024 * 1024)
    assert answer.startswith(b"HTTP/1.1 413") and b"over the limit of 2,097,152 bytes" in answer
    with server.client() as c:
        assert c.get("/healthz").status_code == 200


# -- private state ----------------------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_state_folder_database_and_files_are_private(server: Server, keys: dict[str, str]) -> None:
    with server.client(keys["contribute"]) as c:
        response = contribute(c, "private.npy", npy_bytes(np.full((8, 8), 3, np.uint8)))
    assert response.status_code in (200, 201), response.text
    state = server.state_dir
    assert _mode(state) == 0o700 and _mode(state / "files") == 0o700
    for name in ("cellclass.db", "cellclass.db-wal", "cellclass.db-shm"):
        assert _mode(state / name) == 0o600, name
    sha = response.json()["sha256"]
    stored = state / "files" / sha[:2] / sha[2:4] / f"{sha}.npy"
    assert _mode(stored) == 0o600 and _mode(stored.parent) == 0o700 and _mode(stored.parent.parent) == 0o700


# -- leftovers of a killed server -------------------------------------------------------------
@contextlib.contextmanager
def _stopped(server: Server) -> Iterator[None]:
    try:
        yield
    finally:
        server.stop()


def test_after_kill_9_in_a_burst_a_restart_keeps_every_accepted_one_and_removes_leftovers(
        served_run: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    os.chmod(state, 0o755)  # as an older cellclass left it: world-readable
    contributor = make_key(state, "contribute")
    rng = np.random.default_rng(1)
    images = [npy_bytes(rng.integers(0, 65535, (24, 24), dtype=np.uint16)) for _ in range(400)]
    server = Server(served_run, state, tmp_path / "server.log").start()
    accepted: list[str] = []
    with _stopped(server), server.client(contributor, limits=httpx.Limits(max_connections=32)) as c:
        assert _mode(state) == 0o700 and f"made {state} private to its owner" in server.log()

        def post(i: int) -> httpx.Response | None:
            try:
                return contribute(c, f"cell_{i:03d}.npy", images[i], json.dumps({"particle_type": "Fe"}))
            except httpx.TransportError:
                return None

        with ThreadPoolExecutor(max_workers=24) as pool:
            futures = [pool.submit(post, i) for i in range(len(images))]
            for n, future in enumerate(as_completed(futures)):
                if n == 60:
                    server.process.kill()  # SIGKILL mid-burst
                response = future.result()
                if response is not None and response.status_code == 201:
                    accepted.append(response.json()["id"])
    assert 60 <= len(accepted) < len(images)

    # What a kill between a file and its row (or inside a write) leaves, made here for certain.
    files = state / "files"
    orphan_sha = hashlib.sha256(b"orphan").hexdigest()
    orphan = files / orphan_sha[:2] / orphan_sha[2:4] / f"{orphan_sha}.npy"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"\x93NUMPY orphan")
    temporary = orphan.with_name(f".{orphan_sha}.tif.k2j4l1.tmp")
    temporary.write_bytes(b"half a file")
    unrelated = files / "README.txt"
    unrelated.write_text("not the service's; left alone")

    restarted = Server(served_run, state, tmp_path / "server2.log").start()
    try:
        with restarted.client(contributor) as c:
            assert all(c.get(f"/v1/contributions/{i}").status_code == 200 for i in accepted)
    finally:
        restarted.stop()
    assert not orphan.exists() and not temporary.exists() and unrelated.exists()
    assert f"removed {orphan}" in restarted.log() and "leftover file(s) of interrupted writes" in restarted.log()
    with sqlite3.connect(state / "cellclass.db") as db:
        rows = {f"{sha}{ext}" for sha, ext in db.execute("SELECT sha256, extension FROM contributions")}
    on_disk = {p.name for p in files.glob("??/??/*")}
    assert on_disk == rows  # every file has its row, no .tmp file is left


def test_values_that_overflow_once_normalized_are_refused(served_run: Path) -> None:
    from cellclass.data.normalize import Normalizer
    from cellclass.serving.app import Service
    from cellclass.serving.errors import UploadError
    from cellclass.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(served_run)
    predictor.normalizer = Normalizer(mode="image", clip=False)  # per-image range, unclipped: no bound on the output
    service = Service(None, predictor, {}, {}, "", None, None, None, None)
    image = np.tile(np.array([3e38, -3e38], np.float32), (32, 16))  # finite, but its range overflows float32
    with pytest.raises(UploadError, match="image 0 has values so far from the training data's that they overflow"):
        service.prepare([np.ones((32, 32), np.float32), image][::-1])
    assert np.isfinite(service.prepare([np.arange(1024, dtype=np.float32).reshape(32, 32)])).all()
