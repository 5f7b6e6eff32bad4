"""MLflow models of runs: the pyfunc read back with MLflow's own loader gives `cellclass predict`'s
probabilities, registration by name, `models:/` resolution, `mlflow models serve`, and refusals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
import torch

from cellclass.data.labels import TaskEncoder
from cellclass.data.normalize import Normalizer
from cellclass.errors import ModelPackageError, ModelRegistryError
from cellclass.models import create_model
from cellclass.inference.predictor import Predictor
from cellclass.tracking import make_tracker
from cellclass.tracking.mlflow_model import (
    default_registry_uri,
    is_model_uri,
    model_folder_name,
    model_signature,
    output_columns,
    predict_frame,
    register_run,
    resolve_model_uri,
)
from cellclass.tracking.sweep import SweepJob

CELLCLASS = Path(sys.executable).with_name("cellclass")
TRAIN = ["--preset", "bps", "--task", "particle_type", "--task", "dose", "--model", "lenet5", "--epochs", "1",
         "--image-size", "32"]


def _env() -> dict[str, str]:
    """This process's environment (MLFLOW_TRACKING_URI included), one thread, the venv's tools on PATH."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "250",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _cli(*args: object, timeout: int = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CELLCLASS), *map(str, args)], capture_output=True, text=True, env=_env(),
                          timeout=timeout, check=False)


def _predictor(channel_indices: list[int] | None = None) -> Predictor:
    torch.manual_seed(0)
    encoders = {"particle": TaskEncoder("particle", "single", ["Fe", "X-ray"]),
                "marks": TaskEncoder("marks", "multilabel", ["a", "b"])}
    model = create_model("lenet5", in_chans=1, heads={"particle": 2, "marks": 2}, image_size=32,
                         task_types={"particle": "single", "marks": "multilabel"}).eval()
    return Predictor(model=model, kind="network", encoders=encoders, normalizer=Normalizer(mode="none"),
                     image_size=32, channel_indices=channel_indices or [], thresholds={"marks": [0.0, 2.0]})


# -- fast ------------------------------------------------------------------------------
def test_the_frame_holds_labels_and_probabilities_per_task() -> None:
    predictor = _predictor()
    images = np.random.default_rng(0).integers(0, 4000, (3, 1, 40, 48)).astype(np.uint16)
    frame = predict_frame(predictor, images)
    assert list(frame.columns) == ["particle", "particle__p__Fe", "particle__p__X-ray", "marks", "marks__p__a",
                                   "marks__p__b"]
    expected = predictor.predict_images(list(images))
    for row, result in zip(frame.to_dict("records"), expected, strict=True):
        assert row["particle"] == result["particle"]["label"]
        assert row["marks"] == "a"  # thresholds 0 and 2: always a, never b, joined by ';'
        assert row["particle__p__Fe"] == pytest.approx(result["particle"]["probabilities"]["Fe"], abs=0)


@pytest.mark.parametrize(("images", "match"), [
    (np.zeros((1, 32, 32), np.float32), r"shape \(N, C, H, W\) as numbers; got shape \(1, 32, 32\)"),
    (np.array([["a"]]), "got shape"),
    (np.zeros((1, 3, 32, 32), np.float32), "image 0 has 3 channel"),
    (np.full((1, 1, 8, 8), np.nan, np.float32), "image 0 holds 64 NaN"),
])
def test_the_frame_refuses_what_is_not_an_image_batch(images: np.ndarray, match: str) -> None:
    with pytest.raises(ModelPackageError, match=match):
        predict_frame(_predictor(), images)


def test_signature_declares_float32_images_and_the_output_columns() -> None:
    signature = model_signature(_predictor()).to_dict()
    assert '"tensor-spec": {"dtype": "float32", "shape": [-1, 1, -1, -1]}' in signature["inputs"]
    assert [c["name"] for c in json.loads(signature["outputs"])] == output_columns(_predictor())
    # With a channel subset picked at training, any channel count comes in.
    assert "[-1, -1, -1, -1]" in model_signature(_predictor([0])).to_dict()["inputs"]


def test_model_uris_and_folders() -> None:
    assert is_model_uri("models:/cells/3") and is_model_uri("runs:/abc/model")
    assert not is_model_uri("runs/r18") and not is_model_uri(Path("models/cells"))
    assert model_folder_name("models:/cells/3") == "cells-3"
    assert model_folder_name("models:/cells@champion") == "cells-champion"


def test_the_registry_is_found_or_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert default_registry_uri({"MLFLOW_TRACKING_URI": "http://host:5000"}) == "http://host:5000"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelRegistryError, match="no MLflow store to look the model up in.*--tracking-uri"):
        default_registry_uri({})
    (tmp_path / "mlflow.db").write_bytes(b"")
    assert default_registry_uri({}) == f"sqlite:///{(tmp_path / 'mlflow.db').resolve()}"


def test_a_run_without_mlflow_cannot_be_registered(tmp_path: Path) -> None:
    with pytest.raises(ModelRegistryError, match="has no MLflow run.*valid: a run folder trained with --tracker mlflow"):
        register_run(tmp_path, "cells")
    (tmp_path / "tracking.json").write_text('{"tracker": "wandb", "run_id": "x"}')
    with pytest.raises(ModelRegistryError, match="has no MLflow run"):
        register_run(tmp_path, "cells")


def test_sweep_trials_skip_the_model_unless_asked(tmp_path: Path) -> None:
    assert make_tracker("mlflow", root=tmp_path).log_model is True
    assert make_tracker("mlflow", root=tmp_path, log_model=False).log_model is False
    assert next(f for f in SweepJob.__dataclass_fields__.values() if f.name == "log_models").default is False


# -- slow: real runs, stores and servers ---------------------------------------------------
@pytest.fixture(scope="module")
def tracked_run(bps_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """LeNet-5 (particle type and dose) trained with the default tracker: MLflow in RUNS/mlflow.db."""
    run = tmp_path_factory.mktemp("runs") / "lenet"
    result = _cli("train", bps_dir, *TRAIN, "--out", run)
    assert result.returncode == 0, result.stdout + result.stderr
    return run


def _store(run: Path) -> str:
    return f"sqlite:///{(run.parent / 'mlflow.db').resolve().as_posix()}"


def _predict_csv(run: Path, images: list[Path], out: Path) -> pd.DataFrame:
    result = _cli("predict", run, *images, "--out", out)
    assert result.returncode == 0, result.stdout + result.stderr
    return pd.read_csv(out, dtype={"particle_type": str, "dose": str})


def _images(bps_dir: Path, n: int = 4) -> tuple[list[Path], np.ndarray]:
    import tifffile

    names = pd.read_csv(bps_dir / "meta.csv", dtype=str).filename.iloc[:n]
    paths = [bps_dir / name for name in names]
    return paths, np.stack([tifffile.imread(p)[None] for p in paths])  # uint16 (N, 1, H, W), as the files hold


def _assert_same(frame: pd.DataFrame, expected: pd.DataFrame) -> None:
    probabilities = [c for c in frame.columns if "__p__" in c]
    assert probabilities and set(probabilities) <= set(expected.columns)
    np.testing.assert_allclose(frame[probabilities].to_numpy(float), expected[probabilities].to_numpy(float),
                               rtol=0, atol=1e-5)
    for task in ("particle_type", "dose"):
        assert frame[task].tolist() == expected[task].tolist()


@pytest.fixture
def tracking_env(tracked_run: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """MLflow's own loader finds the run's store through MLFLOW_TRACKING_URI, as a user sets it."""
    import mlflow

    uri = _store(tracked_run)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.mark.slow
def test_the_logged_model_predicts_as_cellclass_predict(tracked_run: Path, bps_dir: Path, tmp_path: Path,
                                                        tracking_env: str) -> None:
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run_id = json.loads((tracked_run / "tracking.json").read_text())["run_id"]
    files = {a.path for a in MlflowClient(tracking_uri=tracking_env).list_artifacts(run_id, "model")}
    assert {"model/MLmodel", "model/artifacts"} <= files
    model = mlflow.pyfunc.load_model(f"runs:/{run_id}/model")
    paths, images = _images(bps_dir)
    frame = model.predict(images.astype(np.float32))  # exact: every uint16 is a float32
    _assert_same(frame, _predict_csv(tracked_run, paths, tmp_path / "predictions.csv"))
    with pytest.raises(MlflowException, match="dtype of input uint16 does not match expected dtype float32"):
        model.predict(images)  # MLflow enforces the signature's dtype


@pytest.mark.slow
def test_registered_versions_resolve_and_serve(tracked_run: Path, bps_dir: Path, tmp_path: Path,
                                               tracking_env: str) -> None:
    import mlflow

    first = _cli("register", tracked_run, "cells")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "as cells version 1: models:/cells/1" in " ".join(first.stdout.split())
    assert register_run(tracked_run, "cells").uri == "models:/cells/2"  # each registration is a new version
    paths, images = _images(bps_dir)
    expected = _predict_csv(tracked_run, paths, tmp_path / "predictions.csv")
    _assert_same(mlflow.pyfunc.load_model("models:/cells/1").predict(images.astype(np.float32)), expected)
    checkpoint = resolve_model_uri("models:/cells/2", tmp_path / "cells-2", tracking_uri=tracking_env)
    assert checkpoint.read_bytes() == (tracked_run / "checkpoints" / "best.ckpt").read_bytes()
    for uri, match in (("models:/cells/9", "cannot resolve 'models:/cells/9'"),
                       ("models:/nobody/1", "cannot resolve 'models:/nobody/1'"),
                       ("models:/cells/one", "is malformed; valid: models:/NAME/VERSION")):
        with pytest.raises(ModelRegistryError, match=match):
            resolve_model_uri(uri, tmp_path / "x", tracking_uri=tracking_env)
    with _Server("mlflow", "models", "serve", "-m", "models:/cells/1", "--env-manager", "local",
                 log=tmp_path / "mlflow-serve.log") as url:
        response = httpx.post(f"{url}/invocations", json={"inputs": images.astype(np.float32).tolist()}, timeout=60)
    assert response.status_code == 200, response.text
    _assert_same(pd.DataFrame(response.json()["predictions"]), expected)


@pytest.mark.slow
def test_cellclass_serves_a_registered_model(tracked_run: Path, bps_dir: Path, tmp_path: Path) -> None:
    done = register_run(tracked_run, "served")
    paths, _ = _images(bps_dir, n=2)
    expected = _predict_csv(tracked_run, paths, tmp_path / "predictions.csv")
    with _Server(str(CELLCLASS), "serve", done.uri, "--tracking-uri", done.store, "--state-dir", tmp_path / "state",
                 "--open-predict", log=tmp_path / "serve.log", ready="/readyz") as url:
        response = httpx.post(f"{url}/v1/predict", files=[("image", (p.name, p.read_bytes())) for p in paths],
                              timeout=60)
    assert response.status_code == 200, response.text
    for prediction, row in zip(response.json()["predictions"], expected.to_dict("records"), strict=True):
        for task, result in prediction["tasks"].items():
            assert result["label"] == row[task]
            for name, p in result["probabilities"].items():
                assert p == pytest.approx(row[f"{task}__p__{name}"], abs=1e-5)
    assert "models:/served/1 resolved to" in (tmp_path / "serve.log").read_text()


@pytest.mark.slow
def test_a_run_without_its_model_gets_it_when_registered(bps_dir: Path, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    run = tmp_path / "runs" / "bare"
    result = _cli("train", bps_dir, *TRAIN, "--no-log-model", "--out", run, "--register", "bare")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "registered as bare version 1: models:/bare/1" in " ".join(result.stdout.split())
    client = MlflowClient(tracking_uri=_store(run))
    version = client.get_model_version("bare", "1")
    assert {a.path for a in client.list_artifacts(version.run_id, "model")} >= {"model/MLmodel"}
    refused = _cli("train", bps_dir, *TRAIN, "--tracker", "none", "--register", "x", "--out", tmp_path / "none")
    assert refused.returncode == 2 and "needs the MLflow tracker" in refused.stderr
    assert not (tmp_path / "none").exists()


class _Server:
    """A server process on a free loopback port, stopped (SIGTERM) on exit."""

    def __init__(self, *command: object, log: Path, ready: str = "/ping") -> None:
        self.command, self.log, self.ready = [str(c) for c in command], log, ready

    def __enter__(self) -> str:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        args = [*self.command, "--port", str(port)]
        with open(self.log, "ab") as handle:
            self.process = subprocess.Popen(args, stdout=handle, stderr=subprocess.STDOUT, env=_env(),
                                            start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{args[0]} exited with {self.process.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(url + self.ready, timeout=2).status_code == 200:
                    return url
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.__exit__()
        raise RuntimeError(f"{args[0]} was not ready after 120 s:\n{self.log.read_text()}")

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: mlflow's uvicorn child goes too
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(5)

