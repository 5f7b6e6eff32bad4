"""ONNX export of a trained network, and ONNX Runtime as a :class:`Predictor` backend.

The exported graph takes the *normalized* ``(N, C, S, S)`` float32 batch (``input``, any
``N``) and returns one output of logits per task, named after the task; preparation,
normalization, activation, test-time augmentation and thresholds stay in
:class:`~cellclass.inference.predictor.Predictor`, so both backends share every step but
the forward pass. The model's metadata records the checkpoint's SHA-256, so a server can
tell an export made from another checkpoint.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellclass.allocator import available_cores
from cellclass.atomic import atomic_path
from cellclass.errors import MissingDependencyError, ModelExportError
from cellclass.inference.checkpoint import file_sha256, find_checkpoint
from cellclass.inference.predictor import Predictor

log = logging.getLogger(__name__)

INPUT_NAME = "input"
METADATA_CHECKPOINT = "cellclass.checkpoint_sha256"
METADATA_TASKS = "cellclass.tasks"


def export_onnx(run: str | Path, out: str | Path | None = None, *, opset: int = 18,
                exporter: str = "auto") -> Path:
    """Export a run's best checkpoint to ONNX.

    Args:
        run: Run folder or ``.ckpt`` file.
        out: Destination (default ``RUN/model.onnx``).
        opset: ONNX opset version.
        exporter: ``dynamo`` (``torch.onnx.export(dynamo=True)``), ``legacy`` (the
            TorchScript exporter) or ``auto`` (dynamo, then legacy if it fails).

    Returns:
        The written file (written atomically).

    Raises:
        ModelExportError: For a baseline (not a network), or when every exporter fails.
    """
    if exporter not in ("auto", "dynamo", "legacy"):
        raise ModelExportError(f"unknown ONNX exporter {exporter!r}; valid: auto, dynamo, legacy")
    checkpoint = find_checkpoint(run)
    predictor = Predictor.from_checkpoint(checkpoint)
    if predictor.kind != "network":
        raise ModelExportError(f"{str(run)!r} holds a {predictor.identity.get('model')} baseline, not a network; "
                               "only networks (lenet5, timm backbones) export to ONNX")
    tasks = list(predictor.encoders)
    wrapper = _tuple_outputs(predictor.model, tasks).eval()
    sample = torch.zeros(2, predictor.in_chans, predictor.image_size, predictor.image_size)
    if out is None:
        out = (Path(run) if Path(run).is_dir() else checkpoint.parent) / "model.onnx"
    out = Path(out)
    errors: list[str] = []
    for method in (["dynamo", "legacy"] if exporter == "auto" else [exporter]):
        try:
            with atomic_path(out) as tmp:
                _export(wrapper, sample, tmp, tasks, opset, method)
                _set_metadata(tmp, {METADATA_CHECKPOINT: file_sha256(checkpoint), METADATA_TASKS: ",".join(tasks)})
        except Exception as exc:  # noqa: BLE001 (exporters raise many types; the next method may succeed)
            errors.append(f"{method}: {type(exc).__name__}: {str(exc)[:300]}")
            log.warning("ONNX export with the %s exporter failed: %s", method, exc)
            continue
        log.info("exported %s to %s (%s exporter, opset %d)", checkpoint, out, method, opset)
        return out
    raise ModelExportError(f"cannot export {str(checkpoint)!r} to ONNX: " + "; ".join(errors))


def _tuple_outputs(model: Any, tasks: list[str]) -> Any:
    """Wrap a multi-head network so it returns a tuple of logits in task order."""
    class TupleOutputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            outputs = self.model(x)
            return tuple(outputs[t] for t in tasks)

    return TupleOutputs()


def _export(wrapper: Any, sample: Any, path: Path, tasks: list[str], opset: int, method: str) -> None:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if method == "dynamo":
            batch = torch.export.Dim("batch", min=1, max=65536)
            torch.onnx.export(wrapper, (sample,), str(path), input_names=[INPUT_NAME], output_names=tasks,
                              dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                              external_data=False, verbose=False)
        else:
            axes = {INPUT_NAME: {0: "batch"}, **{t: {0: "batch"} for t in tasks}}
            torch.onnx.export(wrapper, (sample,), str(path), input_names=[INPUT_NAME], output_names=tasks,
                              dynamic_axes=axes, opset_version=opset, dynamo=False)


def _set_metadata(path: Path, values: dict[str, str]) -> None:
    onnx = _onnx()
    model = onnx.load(str(path))
    for key, value in values.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(model, str(path))


def onnx_metadata(path: str | Path) -> dict[str, str]:
    """The custom metadata of an ONNX file (without loading its weights into a session)."""
    model = _onnx().load(str(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise MissingDependencyError(
            "ONNX export needs onnx, which is not installed: pip install onnx (part of cellclass's default install)"
        ) from None
    return onnx


class OnnxBackend:
    """Runs an exported model with ONNX Runtime on the CPU.

    Args:
        path: ``.onnx`` file made by :func:`export_onnx`.
        tasks: Task names the predictor expects; every one must be an output.
        threads: Intra-op threads (default: the available cores). Inter-op parallelism
            is off (a sequential graph gains nothing from it) and idle threads do not spin.

    Raises:
        ModelExportError: When the file is missing or lacks an output for a task.
        MissingDependencyError: When onnxruntime is not installed.
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, tasks: list[str], *, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise MissingDependencyError(
                "the ONNX backend needs onnxruntime, which is not installed: pip install onnxruntime (part of "
                "cellclass's default install)"
            ) from None
        self.path = Path(path)
        if not self.path.is_file():
            raise ModelExportError(f"ONNX model {str(self.path)!r} does not exist; make it with "
                                   "`cellclass export RUN --format onnx`")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or available_cores()
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # Idle pool threads would otherwise spin after every run, taking the cores that
        # request handling (and torch, for Grad-CAM) needs on a small machine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        self.threads = options.intra_op_num_threads
        outputs = [o.name for o in self.session.get_outputs()]
        missing = [t for t in tasks if t not in outputs]
        if missing:
            raise ModelExportError(f"ONNX model {str(self.path)!r} has outputs {outputs} but the checkpoint's "
                                   f"tasks {missing} are missing; export it again from this run")
        self.tasks = list(tasks)

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Logits per task for a normalized ``(N, C, S, S)`` float32 batch."""
        values = self.session.run(self.tasks, {INPUT_NAME: np.ascontiguousarray(x, dtype=np.float32)})
        return dict(zip(self.tasks, values, strict=True))
