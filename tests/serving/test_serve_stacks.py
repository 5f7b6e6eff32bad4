"""The service reads uploaded Z stacks with the projection its run was trained with."""

from __future__ import annotations

import io
from collections.abc import Iterator

import numpy as np
import pandas as pd
import pytest
import tifffile
from serve_helpers import Server, run_cellclass

pytestmark = pytest.mark.slow  # every test trains its run through the CLI or starts `cellclass serve` (a real process)


def _hyperstack(rng: np.random.Generator, bright: bool) -> np.ndarray:
    stack = rng.integers(100, 200, (5, 2, 16, 16)).astype(np.uint16)
    if bright:
        stack[rng.integers(5), 1, 4:12, 4:12] += 3000
    return stack


def _imagej_bytes(stack: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, stack, imagej=True, metadata={"axes": "ZCYX"})
    return buffer.getvalue()


@pytest.fixture(scope="module")
def stack_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("stacks")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(24):
        label = "ab"[i % 2]
        tifffile.imwrite(folder / f"c{i}.tif", _hyperstack(rng, label == "b"), imagej=True,
                         metadata={"axes": "ZCYX"})
        rows.append({"image": f"c{i}.tif", "label": label})
    pd.DataFrame(rows).to_csv(folder / "labels.csv", index=False)
    run = folder / "run"
    trained = run_cellclass("train", folder / "labels.csv", "--image-col", "image", "--task", "label",
                            "--model", "lenet5", "--epochs", "1", "--image-size", "16", "--z", "max",
                            "--out", run)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    state = folder / "state"
    server = Server(run, state, folder / "server.log", "--open-predict").start()
    yield server
    server.stop()


def test_uploaded_stack_is_projected_as_in_training(stack_server: Server) -> None:
    rng = np.random.default_rng(5)
    stack = _hyperstack(rng, bright=True)
    projected = io.BytesIO()
    np.save(projected, stack.max(axis=0))
    with stack_server.client() as c:
        as_stack = c.post("/v1/predict", files=[("image", ("cell.tif", _imagej_bytes(stack)))])
        as_projection = c.post("/v1/predict", files=[("image", ("cell.npy", projected.getvalue()))])
    assert as_stack.status_code == 200, as_stack.text
    assert as_projection.status_code == 200, as_projection.text
    ours = as_stack.json()["predictions"][0]["tasks"]["label"]
    theirs = as_projection.json()["predictions"][0]["tasks"]["label"]
    assert ours["label"] == theirs["label"]
    assert ours["probabilities"] == pytest.approx(theirs["probabilities"], abs=1e-6)


def test_uploaded_time_series_is_refused_by_name(stack_server: Server) -> None:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((3, 2, 16, 16), np.uint16), imagej=True, metadata={"axes": "TCYX"})
    with stack_server.client() as c:
        response = c.post("/v1/predict", files=[("image", ("series.tif", buffer.getvalue()))])
    assert 400 <= response.status_code < 500
    assert "holds a time series (T=3)" in response.json()["detail"] and "--t" in response.json()["detail"]
