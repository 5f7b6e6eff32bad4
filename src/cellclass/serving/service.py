"""The loaded service: one model, its stores and its micro-batcher, shared by every endpoint.

:meth:`Service.load` runs once per app, in its lifespan (see :func:`cellclass.serving.app.create_app`);
the routers reach it through :func:`cellclass.serving.dependencies.get_service`.
"""

from __future__ import annotations

import copy
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import anyio
import numpy as np
import torch

from cellclass.allocator import available_cores
from cellclass.errors import CellclassError, ExportError, NotFoundError, UploadError
from cellclass.inference.checkpoint import Checkpoint, file_sha256, find_checkpoint
from cellclass.inference.onnx import METADATA_CHECKPOINT, OnnxBackend, onnx_metadata
from cellclass.inference.predictor import Predictor
from cellclass.serving.batching import MicroBatcher
from cellclass.serving.contributions import (
    ContributionStore,
    dataset_definition,
    parse_json_field,
    validate_labels,
)
from cellclass.serving.database import Database
from cellclass.serving.fields import FieldReader
from cellclass.serving.files import open_file_store, private_folder
from cellclass.serving.keys import KeyStore
from cellclass.serving.labelling import LabellingQueue, QueueItem
from cellclass.serving.saliency import grad_cam, overlay_png
from cellclass.serving.settings import ServeSettings
from cellclass.serving.uploads import Upload, decode_upload

log = logging.getLogger(__name__)


@dataclass
class Service:
    """Everything the endpoints share: model, stores, batcher.

    Attributes:
        settings: The settings it was made from.
        predictor: The loaded :class:`~cellclass.inference.predictor.Predictor`.
        identity: The model identity reported with predictions.
        definition: Tasks, classes and channels contributions are checked against.
        dataset_id: Identifier of ``definition`` in the contribution store.
        db: The database.
        keys: API keys.
        contributions: The contribution store.
        batcher: The micro-batcher of prediction requests.
        threads: Inference threads; also how many requests decode and prepare images at
            once (CPU-bound work beyond the cores only thrashes).
        queue: The labelling queue (``--queue``), or None.
        fields: Segments and cuts the fields sent to ``/v1/fields`` as the training cells were.
    """

    settings: ServeSettings
    predictor: Any
    identity: dict[str, Any]
    definition: dict[str, Any]
    dataset_id: str
    db: Database
    keys: KeyStore
    contributions: ContributionStore
    batcher: MicroBatcher
    threads: int = 1
    queue: LabellingQueue | None = None
    fields: FieldReader | None = None
    _cpu_limiter: Any = None
    _saliency_model: Any = None
    _saliency_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, settings: ServeSettings) -> Service:
        """Load the model, open the stores and build the batcher (blocking).

        Raises:
            CellclassError: When the run, the ONNX model, the database or the file store
                cannot be used.
        """
        threads = settings.threads or available_cores()
        torch.set_num_threads(threads)
        checkpoint = find_checkpoint(settings.run)
        loaded = Checkpoint.load(checkpoint)  # read once: the predictor and the spec come from it
        predictor = Predictor.from_checkpoint(loaded, tta=settings.tta)
        sha = file_sha256(checkpoint)
        backend = onnx_backend(settings, predictor, sha, threads)
        predictor.backend = backend
        spec = loaded.spec
        run_name = settings.run.name if settings.run.is_dir() else checkpoint.parent.parent.name or checkpoint.name
        identity = {"name": predictor.identity.get("model"), "run": run_name, "epoch": predictor.identity.get("epoch"),
                    "checkpoint_sha256": sha, "backend": "onnxruntime" if backend is not None else "torch",
                    "tta": bool(predictor.tta)}
        private_folder(settings.state_dir, tighten=True)
        db = Database(settings.database_url)
        contributions = ContributionStore(db, open_file_store(settings.files_url))
        contributions.remove_leftovers()
        definition = dataset_definition(spec, predictor.encoders, predictor.channels)
        ident = contributions.register_dataset(definition)
        queue = None
        if settings.queue is not None:
            try:
                queue = LabellingQueue.load(settings.queue, settings.queue_pool, definition, db, ident)
            except BaseException:
                contributions.files.close()
                db.close()
                raise
        batcher = MicroBatcher(predictor.predict_normalized, max_batch=settings.max_batch,
                               max_wait_ms=settings.max_wait_ms)
        log.info("serving %s (%s, %s backend, %d thread(s)); state in %s", identity["name"], run_name,
                 identity["backend"], threads, settings.state_dir)
        fields = FieldReader(predictor.channels, predictor.channel_indices, predictor.in_chans, predictor.image_size,
                             loaded.crops, settings.max_field_objects)
        return cls(settings, predictor, identity, definition, ident, db, KeyStore(db), contributions, batcher, threads,
                   queue, fields)

    async def run_cpu(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU-bound work (decoding, preparation, Grad-CAM) in a thread, at most ``threads`` at once.

        Waiting requests queue (first come, first served) in the event loop instead of
        running as up to 40 threads of the default pool on a machine with a few cores.
        """
        if self._cpu_limiter is None:
            self._cpu_limiter = anyio.CapacityLimiter(max(1, self.threads))
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._cpu_limiter)

    # -- work done in threads -------------------------------------------------------------
    def decode(self, data: bytes, filename: str | None) -> Upload:
        """Check and decode one upload under the settings' limits."""
        return decode_upload(data, filename, max_bytes=self.settings.max_upload_bytes,
                             max_pixels=self.settings.max_pixels, axes=self.predictor.axes)

    def prepare(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """Fit and normalize decoded images for the model.

        Raises:
            UploadError: When an image has another channel count than the model expects, or
                values that overflow float32 once normalized.
        """
        try:
            with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused just below
                x = self.predictor.normalize(self.predictor.prepare(images))
        except CellclassError as exc:
            raise UploadError(str(exc)) from None
        finite = np.isfinite(x).reshape(len(x), -1).all(axis=1)
        if not finite.all():
            index = int(np.argmin(finite))
            raise UploadError(f"image {index} has values so far from the training data's that they overflow "
                              f"float32 after the model's normalization; valid: values in the range of the "
                              f"images the model was trained on")
        return x

    def decode_and_prepare(self, blobs: Sequence[tuple[bytes, str | None]]) -> tuple[list[Upload], np.ndarray]:
        """Decode ``(bytes, file name)`` uploads and prepare them as one batch for the model."""
        uploads = [self.decode(data, name) for data, name in blobs]
        return uploads, self.prepare([u.image for u in uploads])

    def saliency_png(self, upload: Upload, task: str | None, class_name: str | None) -> tuple[bytes, dict[str, str]]:
        """Grad-CAM overlay of one upload as PNG bytes, and headers describing it."""
        if self.predictor.kind != "network":
            raise UploadError(f"saliency needs a network; the served model is a "
                              f"{self.identity['name']} baseline")
        encoders = self.predictor.encoders
        task = task or next(iter(encoders))
        if task not in encoders:
            raise UploadError(f"unknown task {task!r}; valid: {', '.join(encoders)}")
        classes = encoders[task].classes
        if class_name is not None and class_name not in classes:
            raise UploadError(f"task {task!r} has no class {class_name!r}; valid: {', '.join(classes)}")
        x = self.prepare([upload.image])[0]
        with self._saliency_lock:  # hooks on a private copy, one caller at a time
            if self._saliency_model is None:
                self._saliency_model = copy.deepcopy(self.predictor.model).eval()
            result = grad_cam(self._saliency_model, x, task,
                              None if class_name is None else classes.index(class_name),
                              activation=encoders[task].type)
        headers = {"X-Cellclass-Task": task, "X-Cellclass-Class": classes[result.class_index],
                   "X-Cellclass-Probability": f"{result.probability:.6f}", "X-Cellclass-Layer": result.layer}
        return overlay_png(x, result.cam), headers

    def check_contribution(self, data: bytes, filename: str | None, labels_text: str | None,
                           metadata_text: str | None) -> tuple[Upload, dict[str, Any], dict[str, Any] | None]:
        """Validate one contribution: ``(upload, labels, metadata)`` ready for :meth:`ContributionStore.add`."""
        labels = validate_labels(parse_json_field(labels_text, "labels", max_bytes=self.settings.max_metadata_bytes,
                                                  required=True), self.definition["tasks"])
        metadata = parse_json_field(metadata_text, "metadata", max_bytes=self.settings.max_metadata_bytes,
                                    required=False)
        if metadata is not None and not isinstance(metadata, dict):
            raise UploadError(f"metadata must be a JSON object, got {metadata!r}; valid: e.g. "
                              '{"plate": "P7", "microscope": "widefield"}')
        upload = self.decode(data, filename)
        self.prepare([upload.image])  # the model must be able to read it
        return upload, labels, metadata

    def queue_upload(self, item: QueueItem) -> Upload:
        """A queue item's file, checked and decoded as an upload would be.

        Raises:
            NotFoundError: When the file is no longer in the pool, or cannot be read.
            UploadError: When it is not an image the model can read (see :meth:`decode`).
        """
        try:
            data = item.path.read_bytes()
        except OSError as exc:
            raise NotFoundError(f"the image of queue item {item.rank} ({item.image!r}) cannot be read from the "
                                f"pool folder: {exc.strerror or exc}") from None
        return self.decode(data, item.path.name)

    def check_queue_label(self, item: QueueItem, labels: Any) -> tuple[Upload, dict[str, Any]]:
        """Check a queue item's labels and read its image: ``(upload, labels)`` for :meth:`ContributionStore.add`."""
        checked = validate_labels(labels, self.definition["tasks"])
        upload = self.queue_upload(item)
        self.prepare([upload.image])  # the model must be able to read it
        return upload, checked

    def close(self) -> None:
        """Release the database connections and the file store's lock."""
        self.contributions.files.close()
        self.db.close()


def onnx_backend(settings: ServeSettings, predictor: Any, sha: str, threads: int) -> OnnxBackend | None:
    """The ONNX Runtime backend the settings ask for, or None for torch.

    Args:
        settings: The service's settings (``backend``, ``onnx``, ``run``).
        predictor: The loaded predictor (baselines always run as they are).
        sha: SHA-256 of the served checkpoint; an export made from another is refused
            (``--onnx`` or ``--backend onnx``) or skipped with a warning (``auto``).
        threads: ONNX Runtime's intra-op threads.

    Raises:
        ExportError: When the ONNX model asked for is missing or stale.
    """
    if settings.backend == "torch" or predictor.kind != "network":
        return None
    explicit = settings.onnx is not None or settings.backend == "onnx"
    run_dir = settings.run if settings.run.is_dir() else settings.run.parent.parent
    path = settings.onnx or run_dir / "model.onnx"
    if not path.is_file():
        if explicit:
            raise ExportError(f"ONNX model {str(path)!r} does not exist; make it with "
                              f"`cellclass export {settings.run} --format onnx`")
        return None
    made_from = onnx_metadata(path).get(METADATA_CHECKPOINT)
    if made_from != sha:
        message = (f"ONNX model {str(path)!r} was exported from checkpoint {str(made_from)[:12]}, not from the "
                   f"served one ({sha[:12]}); export it again with `cellclass export {settings.run} --format onnx`")
        if explicit:
            raise ExportError(message)
        log.warning("%s; serving with torch", message)
        return None
    return OnnxBackend(path, list(predictor.encoders), threads=threads)
