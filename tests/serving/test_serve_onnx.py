"""ONNX export: parity with PyTorch, and the server running ONNX Runtime."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import Server, run_cellclass

pytestmark = pytest.mark.slow  # every test trains its run through the CLI or starts `cellclass serve` (a real process)


@pytest.fixture(scope="module")
def onnx_file(served_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("onnx") / "lenet.onnx"
    result = run_cellclass("export", served_run, "--format", "onnx", "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"exported {served_run} to {out}" in result.stdout.replace("\n", "")
    return out


def test_onnx_matches_pytorch(served_run: Path, onnx_file: Path) -> None:
    import torch

    from cellclass.inference.onnx import METADATA_CHECKPOINT, OnnxBackend, onnx_metadata
    from cellclass.inference.predictor import Predictor

    checkpoint = served_run / "checkpoints" / "best.ckpt"
    assert onnx_metadata(onnx_file)[METADATA_CHECKPOINT] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    predictor = Predictor.from_checkpoint(served_run)
    backend = OnnxBackend(onnx_file, ["particle_type"], threads=1)
    x = np.random.default_rng(0).normal(0.3, 0.4, (17, 1, 32, 32)).astype(np.float32)
    with torch.inference_mode():
        expected = predictor.model(torch.from_numpy(x))["particle_type"].numpy()
    for n in (1, 17):  # the batch axis is dynamic
        got = backend(x[:n])["particle_type"]
        assert got.shape == (n, 2)
        assert np.abs(got - expected[:n]).max() < 1e-4
    for tta in (False, True):
        torch_p = predictor.predict_normalized(x, tta=tta)["particle_type"]
        predictor.backend = backend
        ort_p = predictor.predict_normalized(x, tta=tta)["particle_type"]
        predictor.backend = None
        assert np.abs(torch_p - ort_p).max() < 1e-5


def test_server_uses_onnx_runtime(server: Server, keys: dict[str, str], served_run: Path, onnx_file: Path,
                                  bps_images, tmp_path: Path) -> None:
    files = [("image", (name, tif)) for name, tif, _ in bps_images[:4]]
    with server.client(keys["predict"]) as c:
        torch_body = c.post("/v1/predict", files=files).json()
    ort_server = Server(served_run, tmp_path / "state", tmp_path / "ort.log", "--onnx", str(onnx_file),
                        "--open-predict", "--threads", "1").start()
    try:
        with ort_server.client() as c:
            assert c.get("/v1/model").json()["model"]["backend"] == "onnxruntime"
            response = c.post("/v1/predict", files=files)  # open: no key
            assert response.status_code == 200, response.text
            ort_body = response.json()
            saliency = c.post("/v1/saliency", files=[files[0]])  # Grad-CAM still runs in torch
            assert saliency.status_code == 200
            contribution = c.post("/v1/contributions", files=[files[0]], data={"labels": '{"particle_type": "Fe"}'})
            assert contribution.status_code == 401  # open predict does not open writes
    finally:
        ort_server.stop()
    assert ort_body["model"]["backend"] == "onnxruntime"
    assert ort_body["model"]["checkpoint_sha256"] == torch_body["model"]["checkpoint_sha256"]
    for a, b in zip(torch_body["predictions"], ort_body["predictions"], strict=True):
        pa, pb = a["tasks"]["particle_type"], b["tasks"]["particle_type"]
        assert pa["label"] == pb["label"]
        for cls in pa["probabilities"]:
            assert pa["probabilities"][cls] == pytest.approx(pb["probabilities"][cls], abs=1e-5)


def test_stale_onnx_export_is_refused_or_skipped(served_run: Path, onnx_file: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    import onnx

    from cellclass.errors import ExportError
    from cellclass.inference.onnx import METADATA_CHECKPOINT
    from cellclass.inference.predictor import Predictor
    from cellclass.serving.service import onnx_backend
    from cellclass.serving.settings import ServeSettings

    model = onnx.load(str(onnx_file))
    for prop in model.metadata_props:
        if prop.key == METADATA_CHECKPOINT:
            prop.value = "0" * 64
    run = tmp_path / "run"
    shutil.copytree(served_run / "checkpoints", run / "checkpoints")
    onnx.save(model, str(run / "model.onnx"))
    predictor = Predictor.from_checkpoint(run)
    sha = hashlib.sha256((run / "checkpoints" / "best.ckpt").read_bytes()).hexdigest()
    with pytest.raises(ExportError, match="was exported from checkpoint 000000000000, not from the served one"):
        onnx_backend(ServeSettings(run=run, onnx=run / "model.onnx", state_dir=tmp_path), predictor, sha, 1)
    with caplog.at_level(logging.WARNING, logger="cellclass.serving.service"):
        assert onnx_backend(ServeSettings(run=run, state_dir=tmp_path), predictor, sha, 1) is None
    assert "serving with torch" in caplog.text
    shutil.copy(onnx_file, run / "model.onnx")  # a current export is picked up by itself
    assert onnx_backend(ServeSettings(run=run, state_dir=tmp_path), predictor, sha, 1) is not None
    assert onnx_backend(ServeSettings(run=run, state_dir=tmp_path, backend="torch"), predictor, sha, 1) is None
    with pytest.raises(ExportError, match="does not exist; make it with `cellclass export"):
        onnx_backend(ServeSettings(run=run, onnx=tmp_path / "none.onnx", state_dir=tmp_path), predictor, sha, 1)


def test_export_errors(served_run: Path, onnx_file: Path, tmp_path: Path) -> None:
    from cellclass.errors import ModelExportError
    from cellclass.inference.onnx import OnnxBackend, export_onnx

    result = run_cellclass("export", served_run, "--format", "tflite")
    assert result.returncode == 2 and "unknown export format 'tflite'; valid: onnx" in result.stderr
    result = run_cellclass("export", tmp_path / "nothing")
    assert result.returncode == 2 and "no checkpoint at" in result.stderr
    with pytest.raises(ModelExportError, match="unknown ONNX exporter 'jit'; valid: auto, dynamo, legacy"):
        export_onnx(served_run, tmp_path / "x.onnx", exporter="jit")
    with pytest.raises(ModelExportError, match="does not exist; make it with `cellclass export RUN --format onnx`"):
        OnnxBackend(tmp_path / "missing.onnx", ["particle_type"])
    with pytest.raises(ModelExportError, match=r"the checkpoint's tasks \['dose'\] are missing"):
        OnnxBackend(onnx_file, ["dose"])
