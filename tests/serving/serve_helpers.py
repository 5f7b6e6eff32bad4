"""Helpers of the serving tests: run the CLI, start real servers, make images and keys."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

CELLCLASS = Path(sys.executable).with_name("cellclass")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250"}


def run_cellclass(*args: object, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    """Run the installed console script as a user would."""
    return subprocess.run([str(CELLCLASS), *map(str, args)], capture_output=True, text=True, env=ENV, check=False,
                          timeout=timeout)


def free_port() -> int:
    """A TCP port free on loopback right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiff_bytes(array: np.ndarray) -> bytes:
    """An in-memory TIFF of a (C, H, W) or (H, W) array."""
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array if array.ndim == 2 or array.shape[0] > 1 else array[0], photometric="minisblack")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """An in-memory NPY file."""
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def api_settings(run: Path, state_dir: Path, **overrides: object) -> Any:
    """Settings of an app in this process: 1 MiB uploads, 4 images per request, this process's torch threads.

    (The service sets torch's thread count as its settings say; this process keeps its own.)
    """
    import torch

    from cellclass.serving.settings import ServeSettings

    values = {"max_upload_bytes": 1024 * 1024, "max_images": 4, "threads": torch.get_num_threads(), **overrides}
    return ServeSettings(run=run, state_dir=state_dir, **values)


def auth(key: str | None) -> dict[str, str]:
    """The header carrying ``key`` as a bearer token (none without a key)."""
    return {"Authorization": f"Bearer {key}"} if key else {}


def contribute(client: Any, key: str | None, name: str, data: bytes, labels: object = None,
               metadata: object = None) -> Any:
    """POST one contribution through a TestClient; ``labels`` (default ``{"particle_type": "Fe"}``) and
    ``metadata`` are sent as given when text, else as JSON."""
    labels = {"particle_type": "Fe"} if labels is None else labels
    form = {"labels": labels if isinstance(labels, str) else json.dumps(labels)}
    if metadata is not None:
        form["metadata"] = metadata if isinstance(metadata, str) else json.dumps(metadata)
    return client.post("/v1/contributions", files={"image": (name, data)}, data=form, headers=auth(key))


class Server:
    """A real `cellclass serve` process on a free loopback port.

    Args:
        run: Run folder to serve.
        state_dir: State folder.
        log: File receiving the server's output.
        extra: More command-line options.
        env: Extra environment variables.
    """

    def __init__(self, run: Path, state_dir: Path, log: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        self.run, self.state_dir, self.log_path = run, state_dir, log
        self.extra, self.env = extra, {**ENV, **(env or {})}
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> Server:
        """Start and wait until /readyz answers 200."""
        self.port = free_port()
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(CELLCLASS), "serve", str(self.run), "--port", str(self.port), "--state-dir", str(self.state_dir),
                 *self.extra], stdout=log, stderr=subprocess.STDOUT, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"cellclass serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"cellclass serve was not ready after {timeout} s:\n{self.log()}")

    def stop(self) -> None:
        """Stop gracefully (SIGTERM), killing after 20 s."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def log(self) -> str:
        """The server's output so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, key: str | None = None, **kwargs: object) -> httpx.Client:
        """An HTTP client for this server, sending ``key`` as a bearer token."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def key(self, role: str, name: str = "") -> str:
        """Make an API key in this server's state folder (through the library)."""
        return make_key(self.state_dir, role, name)


def make_key(state_dir: Path, role: str, name: str = "") -> str:
    """Make an API key in the SQLite database of ``state_dir``."""
    from cellclass.serving.database import Database
    from cellclass.serving.keys import KeyStore

    db = Database(f"sqlite:///{(state_dir / 'cellclass.db').as_posix()}")
    try:
        return KeyStore(db).create(role, name)[0]
    finally:
        db.close()


# A multi-label + binary dataset definition for store tests (BPS has one single-label task).
MULTI_TASKS = [{"name": "loc", "type": "multilabel", "classes": ["Nucleoli", "Golgi apparatus", "Rods & rings"]},
               {"name": "bin", "type": "binary", "classes": ["0", "1"]}]
MULTI_DEFINITION = {"name": "toy", "image_column": "image", "channels": ["a", "b"], "groups": ["plate"],
                    "tasks": MULTI_TASKS}


def upload_of(seed: int, name: str = "x.npy") -> Any:
    """A checked upload of a random 2 x 8 x 8 uint8 NPY image."""
    from cellclass.serving.uploads import decode_upload

    rng = np.random.default_rng(seed)
    return decode_upload(npy_bytes(rng.integers(0, 255, (2, 8, 8), dtype=np.uint8)), name, max_bytes=10**6,
                         max_pixels=10**6)


def exercise_store(store: Any, tmp_path: Path) -> None:
    """Add, deduplicate, review, list and export multi-label contributions; check the export reads back."""
    from cellclass.data.spec import DatasetSpec
    from cellclass.errors import NotFoundError, UploadError

    dataset = store.register_dataset(MULTI_DEFINITION)
    assert store.register_dataset(MULTI_DEFINITION) == dataset
    upload = upload_of(0)
    labels = {"loc": ["Nucleoli", "Rods & rings"], "bin": "1"}
    first, created = store.add(upload, labels, {"plate": "P1"}, contributor="k1", dataset=dataset, model={"name": "m"})
    again, created_again = store.add(upload, labels, {"plate": "P1"}, contributor="k1", dataset=dataset, model={})
    assert created and not created_again and again["id"] == first["id"]
    other, _ = store.add(upload, {"loc": [], "bin": "0"}, {"plate": "P2"}, contributor="k2", dataset=dataset, model={})
    assert other["id"] != first["id"] and other["sha256"] == first["sha256"]  # one file, two rows
    store.review(first["id"], "accepted", reviewer="cur")
    store.review(other["id"], "accepted", reviewer="cur", note="empty is fine")
    with pytest.raises(UploadError, match="review status 'maybe' is invalid; valid: accepted, rejected"):
        store.review(first["id"], "maybe", reviewer="cur")
    with pytest.raises(NotFoundError, match="no contribution with id 'nope'"):
        store.review("nope", "accepted", reviewer="cur")
    items, total = store.list(status="accepted")
    assert total == 2 and [i["id"] for i in items] == [first["id"], other["id"]]
    assert store.list(contributor="k2")[1] == 1
    assert store.image(first) == upload.data
    result = store.export(tmp_path / "export")
    assert (result.n_rows, result.n_images) == (2, 1)
    spec = DatasetSpec.from_yaml(result.spec)
    assert spec.groups == ["plate"] and spec.image.channels == ["a", "b"]
    frame = spec.load_manifest()
    # An empty multi-label set is an empty cell: read back as no label, encoded as no class.
    assert spec.labels(frame, "loc") == [["Nucleoli", "Rods & rings"], None]
    assert spec.labels(frame, "bin") == ["1", "0"]
    assert spec.read_image(frame.iloc[0].to_dict()).shape == (2, 8, 8)


def write_ranking(run: Path, pool: Path, names: list[str], out: Path, *, absolute: bool = False) -> Path:
    """A ranking CSV as `cellclass rank` writes it, from the served run's own predictions of ``names``.

    The least confident image comes first (score: 1 - the top probability); paths are
    relative to ``pool`` (absolute with ``absolute``).
    """
    import pandas as pd

    from cellclass.inference.predictor import Predictor

    predictor = Predictor.from_checkpoint(run)
    results = predictor.predict_images([predictor.read_image(pool / name) for name in names])
    rows = []
    for name, result in zip(names, results, strict=True):
        row: dict[str, Any] = {"image": str(pool / name) if absolute else name, "strategy": "least_confidence"}
        top = []
        for task, value in result.items():
            row[f"pred_{task}"] = ";".join(value["label"]) if isinstance(value["label"], list) else value["label"]
            row.update({f"p_{task}_{c}": p for c, p in value["probabilities"].items()})
            top.append(max(value["probabilities"].values()))
        row["score"] = 1 - min(top)
        rows.append(row)
    frame = pd.DataFrame(rows).sort_values("score", ascending=False, kind="stable")
    frame.insert(0, "rank", range(1, len(frame) + 1))
    columns = ["rank", "image", "score", "strategy", *[c for c in frame.columns if c.startswith(("pred_", "p_"))]]
    frame[columns].to_csv(out, index=False)
    return out
