"""The checkpoint: a trained model and everything needed to use it, in one typed file.

A checkpoint holds the weights (or the fitted baseline), the architecture name and
arguments, the channel names, the class names per task, the normalization statistics,
the tuned thresholds, the image preparation and the resolved configuration. ``last.ckpt``
also holds the training state (optimizer, scheduler, random generators, best epoch) so
``--resume`` continues a run.

A checkpoint file is a torch archive read with ``weights_only=True``: loading it runs no
code, except that a baseline's fitted scikit-learn estimator is stored pickled and is
unpickled for checkpoints of kind ``baseline`` only (load checkpoints you trust).
:data:`FORMAT` is written; the untyped dictionaries of format ``cellclass-checkpoint/1``
are read as well, so older run folders keep loading (and resuming).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cellclass import __version__
from cellclass.atomic import atomic_path
from cellclass.data.labels import TaskEncoder
from cellclass.data.normalize import Normalizer
from cellclass.errors import CheckpointError

FORMAT = "cellclass-checkpoint/2"
"""The format written: every field of :class:`Checkpoint`, the training state carrying
the epoch it was saved after and the epochs the run was planned for."""
LEGACY_FORMAT = "cellclass-checkpoint/1"
"""The untyped dictionary written before :data:`FORMAT`; read, never written."""
READABLE = (LEGACY_FORMAT, FORMAT)
KINDS = ("network", "baseline")
_VALID = "valid: a .ckpt file or a run folder made by `cellclass train`"


@dataclass
class Checkpoint:
    """A trained model with everything needed to use it, as saved in a ``.ckpt`` file.

    Attributes:
        kind: ``network`` (weights in :attr:`state_dict`) or ``baseline`` (the fitted
            model in :attr:`estimator`).
        model_config: ``create_model(**model_config)`` rebuilds the architecture.
        encoders: Task name to encoder (class names per task).
        normalizer: The fitted normalization of the model's inputs.
        image_size: Side of the square model input.
        fit: How images were made square (``pad``, ``resize``, ``crop``).
        channels: Channel names, in input order.
        channel_indices: Channels kept from each image (all when empty).
        config: The run's resolved training configuration (a ``TrainConfig`` as a dict).
        spec: The training dataset's spec as a dict (how its files were read).
        steps: A network's batch size and learning-rate schedule; ``None`` for a baseline.
        run: Run folder that wrote it.
        epoch: Epoch the weights are from.
        metrics: That epoch's validation metrics (networks).
        thresholds: Per-class decision thresholds of multi-label tasks, tuned on validation.
        field_thresholds: A cell model's per-class thresholds of its multi-label tasks' field
            answers, by task then aggregation (``mean``, ``max``, ``topk_mean:3``), tuned on
            the validation fields (see :mod:`cellclass.evaluation.fields`).
        crops: How the training cells were cut from their fields (the settings of
            ``cellclass crops``, with the segmentation's under ``segmentation``), so a new
            field is cut the same way; ``None`` when the training images were not crops.
        state_dict: A network's weights.
        estimator: A baseline's fitted estimator.
        training_state: What resuming needs (``last.ckpt`` only): the loop's state dict.
        path: File it was loaded from (not saved).
    """

    kind: str
    model_config: dict[str, Any]
    encoders: dict[str, TaskEncoder]
    normalizer: Normalizer
    image_size: int
    fit: str = "pad"
    channels: list[str] = field(default_factory=list)
    channel_indices: list[int] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    spec: dict[str, Any] | None = None
    steps: dict[str, Any] | None = None
    run: str | None = None
    epoch: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, list[float]] = field(default_factory=dict)
    field_thresholds: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    crops: dict[str, Any] | None = None
    state_dict: dict[str, torch.Tensor] | None = None
    estimator: Any = None
    training_state: dict[str, Any] | None = None
    path: Path | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise CheckpointError(f"checkpoint kind {self.kind!r} is invalid; valid: {', '.join(KINDS)}")

    def replace(self, **changes: Any) -> Checkpoint:
        """A copy with ``changes`` applied (fields of this class)."""
        return dataclasses.replace(self, **changes)

    # -- writing ------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the checkpoint atomically (a crash mid-write leaves the previous one intact)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            torch.save(self.to_payload(), tmp)
        return path

    def to_payload(self) -> dict[str, Any]:
        """The dictionary saved in the file (plain values and tensors only)."""
        payload: dict[str, Any] = {
            "format": FORMAT,
            "cellclass_version": __version__,
            "kind": self.kind,
            "model_config": self.model_config,
            "encoders": {t: e.to_dict() for t, e in self.encoders.items()},
            "normalizer": self.normalizer.to_dict(),
            "image_size": int(self.image_size),
            "fit": self.fit,
            "channels": list(self.channels),
            "channel_indices": list(self.channel_indices),
            "config": self.config,
            "spec": self.spec,
            "steps": self.steps,
            "run": self.run,
            "epoch": int(self.epoch),
            "metrics": dict(self.metrics),
            "thresholds": {t: [float(v) for v in values] for t, values in self.thresholds.items()},
            "field_thresholds": {t: {k: [float(v) for v in values] for k, values in by.items()}
                                 for t, by in self.field_thresholds.items()},
            "crops": self.crops,
        }
        if self.kind == "baseline":
            payload["estimator"] = pickle.dumps(self.estimator, protocol=pickle.HIGHEST_PROTOCOL)
        else:
            payload["state_dict"] = self.state_dict
        if self.training_state is not None:
            payload["training_state"] = self.training_state
        return payload

    # -- reading ------------------------------------------------------------------------
    @classmethod
    def load(cls, source: str | Path, which: str = "best") -> Checkpoint:
        """Read a checkpoint file, or a run folder's ``checkpoints/<which>.ckpt``.

        Raises:
            CheckpointError: When nothing usable is there, the file is not a torch archive,
                cannot be read, is not a cellclass checkpoint or is of a format this version
                cannot read (written by a newer cellclass).
        """
        path = find_checkpoint(source, which)
        payload = _read_payload(path)
        if payload["format"] == LEGACY_FORMAT:
            payload = _upgrade_legacy(payload)
        missing = [k for k in ("kind", "model_config", "encoders", "normalizer", "image_size", "config")
                   if k not in payload]
        if missing:
            raise CheckpointError(f"checkpoint {str(path)!r} lacks {', '.join(missing)}; {_VALID}")
        return cls._from_payload(payload, path)

    @classmethod
    def _from_payload(cls, payload: dict[str, Any], path: Path) -> Checkpoint:
        kind = payload["kind"]
        estimator = None
        if kind == "baseline":
            estimator = pickle.loads(payload["estimator"])  # noqa: S301 (a baseline checkpoint of our own)
        return cls(
            kind=kind,
            model_config=dict(payload["model_config"]),
            encoders={t: TaskEncoder.from_dict(e) for t, e in payload["encoders"].items()},
            normalizer=Normalizer.from_dict(payload["normalizer"]),
            image_size=int(payload["image_size"]),
            fit=payload.get("fit") or "pad",
            channels=list(payload.get("channels") or []),
            channel_indices=list(payload.get("channel_indices") or []),
            config=dict(payload["config"]),
            spec=payload.get("spec"),
            steps=payload.get("steps"),
            run=payload.get("run"),
            epoch=int(payload.get("epoch") or 0),
            metrics=dict(payload.get("metrics") or {}),
            thresholds={t: list(v) for t, v in (payload.get("thresholds") or {}).items()},
            field_thresholds={t: {k: list(v) for k, v in by.items()}
                              for t, by in (payload.get("field_thresholds") or {}).items()},
            crops=payload.get("crops"),
            state_dict=payload.get("state_dict") if kind == "network" else None,
            estimator=estimator,
            training_state=payload.get("training_state"),
            path=path,
        )


def find_checkpoint(source: str | Path, which: str = "best") -> Path:
    """Resolve a run folder or a checkpoint file to a checkpoint path.

    Raises:
        CheckpointError: When nothing usable is there.
    """
    source = Path(source)
    if source.is_file():
        return source
    candidate = source / "checkpoints" / f"{which}.ckpt"
    if candidate.is_file():
        return candidate
    raise CheckpointError(
        f"no checkpoint at {str(source)!r}: expected a .ckpt file or a run folder holding "
        f"checkpoints/{which}.ckpt (made by `cellclass train`)"
    )


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in chunks: what identifies a checkpoint (and the exports made from it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_payload(path: Path) -> dict[str, Any]:
    """The saved dictionary, read without running code; its format checked."""
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is not one
        raise CheckpointError(f"{str(path)!r} is not a checkpoint ({path.stat().st_size} bytes, not a "
                              f"torch archive); {_VALID}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a corrupt or foreign file
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {reason}; {_VALID}") from None
    found = payload.get("format") if isinstance(payload, dict) else None
    if isinstance(found, str) and found.startswith("cellclass-checkpoint/") and found not in READABLE:
        raise CheckpointError(f"checkpoint {str(path)!r} is of format {found!r}, which cellclass {__version__} "
                              f"cannot read; valid: {', '.join(READABLE)} (a newer cellclass wrote it: upgrade "
                              "cellclass to use it)")
    if found not in READABLE:
        raise CheckpointError(f"{str(path)!r} is not a cellclass checkpoint (format {FORMAT}); {_VALID}")
    return payload


def _upgrade_legacy(payload: dict[str, Any]) -> dict[str, Any]:
    """A ``cellclass-checkpoint/1`` dictionary in the current layout.

    Its training state did not record the epoch it was saved after nor the epochs the run
    was planned for; both were the checkpoint's own ``epoch`` and ``config["epochs"]``.
    """
    upgraded = dict(payload)
    state = payload.get("training_state")
    if state is not None:
        upgraded["training_state"] = {**state, "epoch": int(payload["epoch"]),
                                      "epochs": int(payload["config"]["epochs"])}
    return upgraded
