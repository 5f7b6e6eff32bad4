"""The Predictor: one path from raw images to decisions, shared by evaluation, the CLI
``predict`` command and the HTTP API.

Raw ``(C, H, W)`` images in their own dtype are fitted to the training size, normalized
with the statistics saved in the checkpoint, passed through the model (with D4
test-time augmentation when asked) and turned into per-task probabilities and labels
with the tuned thresholds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cellclass.data.augment import tta_d4
from cellclass.data.axes import AxesPolicy, policy_from_image_section
from cellclass.data.io import ImagePath, read_image, read_image_bytes
from cellclass.data.labels import TaskEncoder
from cellclass.data.resize import fit_image, select_channels
from cellclass.errors import ImageReadError
from cellclass.inference.checkpoint import Checkpoint
from cellclass.inference.probabilities import probabilities
from cellclass.models import create_model

log = logging.getLogger(__name__)


@dataclass
class Predictor:
    """A trained model with everything needed to use it.

    Attributes:
        model: A network (``torch.nn.Module``) or a fitted baseline.
        kind: ``network`` or ``baseline``.
        encoders: Task name to encoder (class names per task).
        normalizer: Fitted :class:`cellclass.data.normalize.Normalizer`.
        image_size: Side of the square model input.
        fit: How images are made square (``pad``, ``resize``, ``crop``).
        channel_indices: Channels kept from each image (all when empty).
        channels: Channel names.
        thresholds: Per-class thresholds of multi-label tasks.
        field_thresholds: Per-class thresholds of multi-label tasks' field answers, by task
            then aggregation (a cell model's; see :attr:`Checkpoint.field_thresholds`).
        tta: Average over the 8 D4 transforms.
        batch_size: Inference batch size.
        identity: Model identity reported with predictions (name, run, checkpoint).
        backend: Optional inference backend used instead of the torch model: a callable
            mapping normalized ``(N, C, S, S)`` float32 inputs to logits per task, e.g.
            :class:`cellclass.inference.onnx.OnnxBackend`. None runs ``model``.
        axes: How raw files are read (Z/T projection, series, channels by name): the
            training dataset's choice, so new stacks are read as the training images were.
    """

    model: Any
    kind: str
    encoders: dict[str, TaskEncoder]
    normalizer: Any
    image_size: int
    fit: str = "pad"
    channel_indices: list[int] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)
    thresholds: dict[str, list[float]] = field(default_factory=dict)
    field_thresholds: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    tta: bool = False
    batch_size: int = 64
    identity: dict[str, Any] = field(default_factory=dict)
    backend: Any = None
    axes: AxesPolicy = field(default_factory=AxesPolicy)

    @property
    def in_chans(self) -> int:
        """Channels the model expects (after channel selection)."""
        return int(self.model.config["in_chans"])

    @classmethod
    def from_checkpoint(cls, source: str | Path | Checkpoint, *, tta: bool | None = None,
                        which: str = "best") -> Predictor:
        """A predictor of a loaded :class:`Checkpoint`, a ``.ckpt`` file or a run folder's best checkpoint.

        Args:
            source: The checkpoint, or where to load it from.
            tta: Average over the D4 transforms (default: as the run was configured).
            which: Checkpoint of a run folder to load (``best`` or ``last``).
        """
        ckpt = source if isinstance(source, Checkpoint) else Checkpoint.load(source, which)
        if ckpt.kind == "baseline":
            model = ckpt.estimator
        else:
            model = create_model(**ckpt.model_config)
            model.load_state_dict(ckpt.state_dict)
            model.eval()
        config = ckpt.config
        return cls(
            model=model,
            kind=ckpt.kind,
            encoders=dict(ckpt.encoders),
            normalizer=ckpt.normalizer,
            image_size=ckpt.image_size,
            fit=ckpt.fit,
            channel_indices=list(ckpt.channel_indices),
            channels=list(ckpt.channels),
            thresholds={k: list(v) for k, v in ckpt.thresholds.items()},
            field_thresholds={t: {k: list(v) for k, v in by.items()} for t, by in ckpt.field_thresholds.items()},
            tta=bool(config.get("tta", False)) if tta is None else tta,
            identity={"model": config.get("model"), "checkpoint": None if ckpt.path is None else str(ckpt.path),
                      "epoch": ckpt.epoch, "run": ckpt.run},
            axes=policy_from_image_section((ckpt.spec or {}).get("image")),
        )

    # -- reading ----------------------------------------------------------------------
    def read_image(self, path: ImagePath) -> np.ndarray:
        """Read a raw file as the training images were read (same Z/T projection, series, channels).

        Raises:
            StackError: When the file holds a stack the training data did not (no projection
                was recorded); the message names the options.
            ImageReadError: When the file cannot be read.
        """
        return read_image(path, axes=self.axes)

    def read_image_bytes(self, data: bytes, name: str) -> np.ndarray:
        """:meth:`read_image` for a file held in memory (an upload)."""
        return read_image_bytes(data, name, axes=self.axes)

    # -- preprocessing ----------------------------------------------------------------
    def prepare(self, images: Sequence[np.ndarray], names: Sequence[str] | None = None) -> np.ndarray:
        """Fit raw images to the model size: ``(N, C, S, S)`` float32 in original units.

        Args:
            images: Raw images, ``(C, H, W)`` or ``(H, W)``, each in its own dtype.
            names: How error messages name each image (default ``image 0``, ``image 1`` ...).

        Raises:
            ImageReadError: When an image is refused by :func:`check_image` or its channel
                count does not match the model.
        """
        out = []
        for i, image in enumerate(images):
            name = names[i] if names is not None else f"image {i}"
            image = select_channels(check_image(image, name), self.channel_indices or None)
            if image.shape[0] != self.in_chans:
                raise ImageReadError(
                    f"{name} has {image.shape[0]} channel(s); the model expects {self.in_chans}"
                    + (f" ({', '.join(self.channels)})" if self.channels else "")
                )
            out.append(fit_image(image, self.image_size, self.fit))
        return np.stack(out).astype(np.float32, copy=False)

    def normalize(self, prepared: np.ndarray, groups: Sequence[str] | None = None) -> np.ndarray:
        """Apply the checkpoint's normalization to prepared images."""
        return self.normalizer.transform_batch(prepared, groups=groups).astype(np.float32, copy=False)

    # -- inference --------------------------------------------------------------------
    def predict_normalized(self, x: np.ndarray, *, tta: bool | None = None) -> dict[str, np.ndarray]:
        """Probabilities per task for normalized ``(N, C, S, S)`` inputs.

        Single-label and binary tasks give softmax rows; multi-label tasks per-class
        sigmoid probabilities. With test-time augmentation, the probabilities of the 8 D4
        transforms of each image are averaged.
        """
        tta = self.tta if tta is None else tta
        if self.kind == "baseline":
            return {k: np.asarray(v, dtype=np.float64) for k, v in self.model.predict_proba(x).items()}
        if self.backend is None:
            self.model.eval()
        outputs: dict[str, list[np.ndarray]] = {t: [] for t in self.encoders}
        with torch.inference_mode():
            for start in range(0, len(x), self.batch_size):
                batch = torch.from_numpy(np.ascontiguousarray(x[start : start + self.batch_size]))
                probs = tta_d4(self._probabilities, batch) if tta else self._probabilities(batch)
                for task in self.encoders:
                    outputs[task].append(probs[task].numpy())
        return {t: np.concatenate(v).astype(np.float64) for t, v in outputs.items()}

    def _probabilities(self, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        """Probabilities per task of one batch, from the model or the :attr:`backend`."""
        if self.backend is None:
            logits = self.model(batch)
        else:
            logits = {t: torch.from_numpy(np.asarray(v)) for t, v in self.backend(batch.numpy()).items()}
        return {task: probabilities(logits[task].float(), encoder.type) for task, encoder in self.encoders.items()}

    def decide(self, probabilities: Mapping[str, np.ndarray]) -> dict[str, list[Any]]:
        """Labels per task: argmax for single/binary, tuned thresholds for multi-label."""
        return decide(self.encoders, self.thresholds, probabilities)

    def predict_images(self, images: Sequence[np.ndarray], groups: Sequence[str] | None = None,
                       *, tta: bool | None = None) -> list[dict[str, Any]]:
        """Predict raw images: one dict per image with per-task probabilities and labels."""
        x = self.normalize(self.prepare(images), groups)
        return self.describe(self.predict_normalized(x, tta=tta))

    def describe(self, probabilities: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
        """Per-image results (label and named probabilities per task) of probability arrays."""
        return describe(self.encoders, self.thresholds, probabilities)


def decide(encoders: Mapping[str, TaskEncoder], thresholds: Mapping[str, Sequence[float]],
           probabilities: Mapping[str, np.ndarray]) -> dict[str, list[Any]]:
    """Labels per task of probability arrays: argmax for single/binary, ``thresholds`` (per
    class; 0.5 where a task has none) for multi-label."""
    out: dict[str, list[Any]] = {}
    for task, p in probabilities.items():
        encoder = encoders[task]
        if encoder.type == "multilabel":
            thr = np.asarray(thresholds.get(task, [0.5] * encoder.n_outputs))
            out[task] = encoder.decode((p >= thr).astype(np.uint8))
        else:
            out[task] = encoder.decode(p.argmax(axis=1))
    return out


def describe(encoders: Mapping[str, TaskEncoder], thresholds: Mapping[str, Sequence[float]],
             probabilities: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per-image results (label and named probabilities per task) of probability arrays."""
    labels = decide(encoders, thresholds, probabilities)
    n = len(next(iter(probabilities.values()))) if probabilities else 0
    results = []
    for i in range(n):
        results.append({
            task: {
                "label": labels[task][i],
                "probabilities": dict(zip(encoders[task].classes, map(float, probabilities[task][i]), strict=True)),
            }
            for task in encoders
        })
    return results


def check_image(image: np.ndarray, name: str) -> np.ndarray:
    """``image`` as ``(C, H, W)``, when a model can read it.

    Args:
        image: A raw image, ``(C, H, W)`` or ``(H, W)``.
        name: How the message names the image (``"image 'a.tif'"``).

    Raises:
        ImageReadError: When the image is not 2-D or 3-D numeric, has no pixel, or holds
            NaN or infinite values (a prediction of them would be meaningless).
    """
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[None]
    if image.ndim != 3 or image.dtype.kind not in "buif":
        raise ImageReadError(f"{name} is an array of shape {image.shape} and dtype {image.dtype}; "
                             "valid: a numeric image of shape (C, H, W) or (H, W)")
    if image.size == 0:
        raise ImageReadError(f"{name} is empty (shape {image.shape}); valid: an image with at least one pixel")
    if image.dtype.kind == "f":
        finite = np.isfinite(image)
        if not finite.all():
            n_nan = int(np.isnan(image).sum())
            n_inf = int(finite.size - finite.sum()) - n_nan
            raise ImageReadError(f"{name} holds {n_nan} NaN and {n_inf} infinite pixel value(s) of "
                                 f"{image.size}; valid: finite pixel values")
    return image

