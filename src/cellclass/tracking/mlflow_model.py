"""Trained runs as MLflow models: logged with each tracked run, registered by name, served.

The MLflow tracker logs every run it finishes as an MLflow model, ``model/`` among the run's
artifacts (``--no-log-model`` skips it; sweeps skip it unless ``--log-model``). The model is
a Python-function (*pyfunc*) model that holds the run's best checkpoint and predicts raw
images exactly as ``cellclass predict`` does: each image is fitted to the model size,
normalized with the statistics recorded at training, passed through the network (with the
run's test-time augmentation) and decided with the tuned thresholds.

Signature:

* **input**: one float32 tensor ``(N, C, H, W)`` of raw images in their own intensity units
  (any ``H`` and ``W``; ``C`` as the model's images have). MLflow checks the dtype exactly:
  cast uint16 or uint8 images with ``images.astype(np.float32)``, which keeps every value.
* **output**: one row per image with, per task, the column ``TASK`` (the label; the labels of
  a multi-label task joined by ``;``) and one column ``TASK__p__CLASS`` per class (the
  probability), as ``cellclass predict`` writes them.

A run is registered in the registry of its tracking store (:func:`register_run`), and a
``models:/NAME/VERSION`` URI resolves to the checkpoint inside the model
(:func:`resolve_model_uri`), which ``cellclass serve`` serves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import yaml

from cellclass import __version__
from cellclass.errors import ImageReadError, ModelPackageError, ModelRegistryError
from cellclass.inference.checkpoint import file_sha256
from cellclass.inference.predictor import Predictor

log = logging.getLogger(__name__)

MODEL_PATH = "model"
"""Artifact folder of the MLflow model in a run."""
CHECKPOINT_ARTIFACT = "checkpoint"
"""Name of the checkpoint among the pyfunc model's artifacts."""
URI_SCHEMES = ("models:/", "runs:/")
"""MLflow model URIs that :func:`resolve_model_uri` accepts."""

# The pyfunc is saved as "model from code": this file, copied into the model, builds it at
# load time from the installed cellclass (no pickled object in the model).
_MODEL_CODE = """\
import mlflow

from cellclass.tracking.mlflow_pyfunc import CellclassPyfunc

mlflow.models.set_model(CellclassPyfunc())
"""


def is_model_uri(text: str | os.PathLike[str]) -> bool:
    """Whether ``text`` is an MLflow model URI (``models:/NAME/VERSION``, ``runs:/RUN_ID/model``)."""
    return str(text).startswith(URI_SCHEMES)


# -- predicting ---------------------------------------------------------------------------
def predict_frame(predictor: Predictor, images: Any) -> pd.DataFrame:
    """Labels and probabilities per task of raw ``(N, C, H, W)`` images, one row per image.

    The same steps as ``cellclass predict``: :meth:`Predictor.prepare`, :meth:`~Predictor.normalize`,
    :meth:`~Predictor.predict_normalized` and :meth:`~Predictor.describe`.

    Raises:
        ModelPackageError: When ``images`` is not a 4-D numeric array, or an image is refused
            (another channel count, NaN pixels); the message names the image.
    """
    array = np.asarray(images)
    if array.ndim != 4 or array.dtype.kind not in "buif":
        raise ModelPackageError(f"the model takes images of shape (N, C, H, W) as numbers; got shape {array.shape} "
                                f"and dtype {array.dtype}; valid: e.g. a float32 array of shape (2, 1, 64, 64)")
    try:
        prepared = predictor.prepare(list(array), names=[f"image {i}" for i in range(len(array))])
    except ImageReadError as exc:
        raise ModelPackageError(str(exc)) from None
    results = predictor.describe(predictor.predict_normalized(predictor.normalize(prepared)))
    rows = []
    for result in results:
        row: dict[str, Any] = {}
        for task, r in result.items():
            row[task] = ";".join(r["label"]) if isinstance(r["label"], list) else str(r["label"])
            row.update({f"{task}__p__{c}": float(p) for c, p in r["probabilities"].items()})
        rows.append(row)
    return pd.DataFrame(rows, columns=output_columns(predictor))


def output_columns(predictor: Predictor) -> list[str]:
    """The output columns, in order: per task its label, then one probability per class."""
    columns = []
    for task, encoder in predictor.encoders.items():
        columns += [task, *(f"{task}__p__{c}" for c in encoder.classes)]
    return columns


def model_signature(predictor: Predictor) -> Any:
    """The MLflow signature: a float32 ``(N, C, H, W)`` tensor in, labels and probabilities out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    channels = -1 if predictor.channel_indices else predictor.in_chans  # a subset is picked from any count
    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, channels, -1, -1))])
    outputs = Schema([ColSpec("string" if column in predictor.encoders else "double", column)
                      for column in output_columns(predictor)])
    return ModelSignature(inputs=inputs, outputs=outputs)


# -- saving and logging -------------------------------------------------------------------
def save_model(checkpoint: str | Path, path: str | Path) -> Path:
    """Write an MLflow pyfunc model of a checkpoint (or a run folder's best) to the new folder ``path``.

    Raises:
        CheckpointError: When ``checkpoint`` is not a cellclass checkpoint.
        MissingDependencyError: When MLflow is not installed.
    """
    import mlflow.pyfunc
    import torch

    predictor = Predictor.from_checkpoint(checkpoint)
    checkpoint = Path(predictor.identity["checkpoint"])  # the file, also when given a run folder
    with tempfile.TemporaryDirectory() as tmp, _quiet_mlflow():
        code = Path(tmp) / "cellclass_model.py"
        code.write_text(_MODEL_CODE)
        mlflow.pyfunc.save_model(
            str(path), python_model=str(code), artifacts={CHECKPOINT_ARTIFACT: str(checkpoint)},
            signature=model_signature(predictor),
            pip_requirements=[f"cellclass=={__version__}", f"torch=={torch.__version__.split('+')[0]}",
                              f"mlflow=={mlflow.__version__}"],
            metadata={"cellclass.checkpoint_sha256": file_sha256(checkpoint),
                      "cellclass.model": str(predictor.identity.get("model")),
                      "cellclass.tasks": {t: list(e.classes) for t, e in predictor.encoders.items()}})
    return Path(path)


def log_model(client: Any, run_id: str, checkpoint: str | Path) -> str:
    """Save the MLflow model of ``checkpoint`` into the run's artifacts (``model/``); return its URI."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model(checkpoint, Path(tmp) / MODEL_PATH)
        client.log_artifacts(run_id, str(folder), artifact_path=MODEL_PATH)
    client.set_tag(run_id, "cellclass.mlflow_model", MODEL_PATH)
    uri = f"runs:/{run_id}/{MODEL_PATH}"
    log.info("logged the MLflow model %s", uri)
    return uri


@contextlib.contextmanager
def _quiet_mlflow() -> Iterator[None]:
    """Hide MLflow's advice about input examples and type hints while saving."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logger.setLevel(level)


# -- the registry -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Registration:
    """A registered model version.

    Attributes:
        name: Registered model name.
        version: Its version number.
        store: The tracking store (and registry) it is in.
    """

    name: str
    version: int
    store: str

    @property
    def uri(self) -> str:
        """``models:/NAME/VERSION``."""
        return f"models:/{self.name}/{self.version}"


def register_run(run: str | Path, name: str, *, tracking_uri: str | None = None) -> Registration:
    """Register a run's MLflow model under ``name`` in its tracking store's registry.

    A run trained with ``--no-log-model`` gets its model logged first.

    Args:
        run: Run folder trained with the MLflow tracker (its ``tracking.json`` names the
            tracked run and the store).
        name: Registered model name.
        tracking_uri: The store (default: the one the run was tracked in).

    Returns:
        The new version.

    Raises:
        ModelRegistryError: When the run was not tracked with MLflow, the store cannot be
            reached, or the registry refuses the name.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    run = Path(run)
    record = _tracking_record(run)
    uri = tracking_uri or record["uri"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        run_id = client.get_run(record["run_id"]).info.run_id
        if not client.list_artifacts(run_id, MODEL_PATH):
            log_model(client, run_id, run)
        with contextlib.suppress(MlflowException):  # it exists already: add a version
            client.create_registered_model(name, description="cellclass model")
        version = client.create_model_version(name, source=f"runs:/{run_id}/{MODEL_PATH}", run_id=run_id,
                                              description=f"cellclass run {run}")
    except MlflowException as exc:
        raise ModelRegistryError(f"cannot register run {str(run)!r} as {name!r} in {uri!r}: {_first_line(exc)}; "
                                 "valid: a name of letters, digits, '_', '-' and '.', and a reachable store") from None
    return Registration(name=name, version=int(version.version), store=uri)


def _tracking_record(run: Path) -> dict[str, Any]:
    path = run / "tracking.json"
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        record = {}
    if record.get("tracker") != "mlflow" or not record.get("run_id") or not record.get("uri"):
        raise ModelRegistryError(f"{str(run)!r} has no MLflow run ({path.name} missing or of another tracker); "
                                 "valid: a run folder trained with --tracker mlflow (the default)")
    return record


def default_registry_uri(environ: dict[str, str] | None = None) -> str:
    """Where ``models:/`` URIs are looked up without ``--tracking-uri``.

    ``MLFLOW_TRACKING_URI`` when set, else the local store ``./mlflow.db``.

    Raises:
        ModelRegistryError: When neither is there.
    """
    env = os.environ if environ is None else environ
    if env.get("MLFLOW_TRACKING_URI"):
        return env["MLFLOW_TRACKING_URI"]
    local = Path("mlflow.db")
    if local.is_file():
        return f"sqlite:///{local.resolve().as_posix()}"
    raise ModelRegistryError("no MLflow store to look the model up in: no --tracking-uri, no MLFLOW_TRACKING_URI "
                             "and no ./mlflow.db; valid: --tracking-uri sqlite:///RUNS/mlflow.db (the store "
                             "beside the run folders) or a server URL")


def resolve_model_uri(uri: str, dest: str | Path, *, tracking_uri: str | None = None) -> Path:
    """Download an MLflow model made by cellclass and return the checkpoint inside it.

    Args:
        uri: ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or ``runs:/RUN_ID/model``.
        dest: Folder that receives the model (an earlier download there is replaced); the
            checkpoint's run is named after it where the model is served.
        tracking_uri: Tracking store and registry (default :func:`default_registry_uri`).

    Raises:
        ModelRegistryError: When the URI does not resolve, or names a model cellclass did not make.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    store = tracking_uri or default_registry_uri()
    client = MlflowClient(tracking_uri=store, registry_uri=store)  # no global MLflow state is changed
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as tmp:
        try:
            run_id, path = _run_artifact(client, uri)
            with _quiet_downloads():
                local = Path(client.download_artifacts(run_id, path, tmp))
        except (MlflowException, OSError) as exc:
            raise ModelRegistryError(f"cannot resolve {uri!r} in {store!r}: {_first_line(exc)}; valid: a registered "
                                     "model and version (cellclass register RUN NAME prints it) or "
                                     "runs:/RUN_ID/model") from None
        _checkpoint_in(local, uri)  # refuse a foreign model before replacing an earlier download
        if dest.exists():
            shutil.rmtree(dest)
        local.rename(dest)
    return _checkpoint_in(dest, uri)


def _run_artifact(client: Any, uri: str) -> tuple[str, str]:
    """The run and artifact path a model URI points to."""
    if uri.startswith("models:/"):
        rest = uri[len("models:/"):]
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = rest.rpartition("/")
            if not name or not number.isdigit():
                raise ModelRegistryError(f"model URI {uri!r} is malformed; valid: models:/NAME/VERSION (a number) or "
                                         "models:/NAME@ALIAS")
            version = client.get_model_version(name, number)
        uri = version.source
        if not uri.startswith("runs:/"):
            raise ModelRegistryError(f"{version.name} version {version.version} comes from {uri!r}, not from a run's "
                                     "artifacts; valid: a version registered by cellclass (cellclass register)")
    run_id, _, path = uri[len("runs:/"):].partition("/")
    if not run_id:
        raise ModelRegistryError(f"model URI {uri!r} names no run; valid: runs:/RUN_ID/model")
    return run_id, path.strip("/") or MODEL_PATH


def _checkpoint_in(folder: Path, uri: str) -> Path:
    try:
        flavor = yaml.safe_load((folder / "MLmodel").read_text())["flavors"]["python_function"]
        relative = flavor["artifacts"][CHECKPOINT_ARTIFACT]["path"]
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        raise ModelRegistryError(f"{uri!r} is not an MLflow model made by cellclass (no {CHECKPOINT_ARTIFACT!r} "
                                 "artifact in its MLmodel); valid: a model logged by cellclass train") from None
    checkpoint = folder / relative
    if not checkpoint.is_file():
        raise ModelRegistryError(f"{uri!r} lacks its checkpoint {relative!r}; log the run's model again")
    return checkpoint


@contextlib.contextmanager
def _quiet_downloads() -> Iterator[None]:
    """No progress bars from MLflow's downloads (they would interleave with the CLI's output)."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    saved = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def model_folder_name(uri: str) -> str:
    """A folder name for a downloaded model: ``models:/cells/3`` -> ``cells-3``."""
    return re.sub(r"[^\w.-]+", "-", uri.split(":/", 1)[-1]).strip("-") or "model"


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]

