"""What needs a real `cellclass serve` process on loopback: the key checked before the body is read
(on a raw socket), a chunked body cut off as it arrives, and the leftovers of a killed server. The
rest of the fuzzer's requests are tested in this process in ``test_api_hardening.py``."""

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


def test_a_chunked_body_is_cut_off_once_it_passes_the_limit(server: Server, keys: dict[str, str]) -> None:
    def chunks() -> Iterator[bytes]:  # no Content-Length: the body is counted as it arrives
        yield b'--b\r\nContent-Disposition: form-data; name="image"; filename="x.tif"\r\n\r\n'
        for _ in range(7):
            yield b"\0" * (1024 * 1024)

    with server.client(keys["predict"]) as c:
        response = c.post("/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
        assert response.status_code == 413 and "over the limit of 2,097,152 bytes" in response.json()["detail"]
        assert c.get("/healthz").status_code == 200
    assert "Exception in ASGI application" not in server.log()


# -- leftovers of a killed server -------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


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
