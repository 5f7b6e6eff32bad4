"""The HTTP API and web page: :func:`create_app` builds a FastAPI app from :class:`ServeSettings`.

The model is loaded in the app's lifespan (start-up), once; concurrent prediction
requests share forward passes through a :class:`~cellclass.serving.batching.MicroBatcher`.
Errors are :class:`~cellclass.serving.errors.ServiceError` subclasses answered as
``{"detail": message}`` with their status code. See ``docs/serving.md``.
"""

# No ``from __future__ import annotations`` here: FastAPI reads the endpoints' annotations,
# which name dependencies local to create_app.
import contextlib
import copy
import functools
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import (
    Depends,
    FastAPI,
    File,
    Form,
    Query,
    Request,
    Response,
    UploadFile,
    params,
)
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from fastapi.staticfiles import StaticFiles
from starlette.routing import Match

from cellclass.errors import CellclassError
from cellclass.serving import schemas
from cellclass.serving.batching import MicroBatcher
from cellclass.serving.contributions import (
    MAX_JSON_DEPTH,
    ContributionStore,
    dataset_definition,
    parse_json_field,
    validate_labels,
)
from cellclass.serving.database import Database
from cellclass.serving.errors import (
    AuthenticationError,
    ExportError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    ServiceError,
    UploadError,
)
from cellclass.serving.files import open_file_store, private_folder
from cellclass.serving.keys import KEY_ID_PATTERN, ApiKey, KeyStore
from cellclass.serving.settings import ServeSettings
from cellclass.serving.uploads import ACCEPTED_EXTENSIONS, Upload, decode_upload

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).parent / "web"
_bearer = HTTPBearer(auto_error=False, description="An API key made by `cellclass keys create --role ROLE`.")
_MAX_JSON_BODY = 64 * 1024
_MAX_OFFSET = 2**31 - 1
ContributionId = Annotated[str, PathParam(min_length=1, max_length=64, description="A contribution's id.")]
_MEDIA_TYPES = {".tif": "image/tiff", ".tiff": "image/tiff", ".png": "image/png", ".npy": "application/octet-stream"}


# -- the loaded service ------------------------------------------------------------------
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
    _cpu_limiter: Any = None
    _saliency_model: Any = None
    _saliency_lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, settings: ServeSettings) -> "Service":
        """Load the model, open the stores and build the batcher (blocking).

        Raises:
            CellclassError: When the run, the ONNX model, the database or the file store
                cannot be used.
        """
        import torch

        from cellclass.allocator import available_cores
        from cellclass.inference.checkpoint import Checkpoint, file_sha256, find_checkpoint
        from cellclass.inference.predictor import Predictor

        threads = settings.threads or available_cores()
        torch.set_num_threads(threads)
        checkpoint = find_checkpoint(settings.run)
        loaded = Checkpoint.load(checkpoint)
        predictor = Predictor.from_checkpoint(loaded, tta=settings.tta)
        sha = file_sha256(checkpoint)
        backend = _onnx_backend(settings, predictor, sha, threads)
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
        batcher = MicroBatcher(predictor.predict_normalized, max_batch=settings.max_batch,
                               max_wait_ms=settings.max_wait_ms)
        log.info("serving %s (%s, %s backend, %d thread(s)); state in %s", identity["name"], run_name,
                 identity["backend"], threads, settings.state_dir)
        return cls(settings, predictor, identity, definition, ident, db, KeyStore(db), contributions, batcher, threads)

    async def run_cpu(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run CPU-bound work (decoding, preparation, Grad-CAM) in a thread, at most ``threads`` at once.

        Waiting requests queue (first come, first served) in the event loop instead of
        running as up to 40 threads of the default pool on a machine with a few cores.
        """
        import anyio

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

    def saliency_png(self, upload: Upload, task: str | None, class_name: str | None) -> tuple[bytes, dict[str, str]]:
        """Grad-CAM overlay of one upload as PNG bytes, and headers describing it."""
        from cellclass.serving.saliency import grad_cam, overlay_png

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

    def close(self) -> None:
        """Release the database connections and the file store's lock."""
        self.contributions.files.close()
        self.db.close()


def _onnx_backend(settings: ServeSettings, predictor: Any, sha: str, threads: int) -> Any:
    """The ONNX Runtime backend the settings ask for, or None for torch."""
    from cellclass.inference.onnx import METADATA_CHECKPOINT, OnnxBackend, onnx_metadata

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


# -- what a request must bring before its body is read ------------------------------------
@dataclass(frozen=True)
class KeyRequirement:
    """The API key role an endpoint needs: a FastAPI dependency, also read by :class:`RequestGate`.

    The gate verifies the key from the headers before the body is read and leaves the
    record in ``request.state.api_key``; the dependency returns it (and declares the
    bearer scheme in the OpenAPI document).

    Attributes:
        role: The weakest role allowed.
        open_setting: Whether ``--open-predict`` lifts the requirement.
    """

    role: str
    open_setting: bool = False

    async def __call__(self, request: Request,
                       credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> ApiKey | None:
        """The verified key (None where the requirement is lifted)."""
        if hasattr(request.state, "api_key"):
            return request.state.api_key
        return await self.verify(request.app.state.service,
                                 credentials.credentials if credentials is not None else None)

    async def verify(self, service: "Service", token: str | None) -> ApiKey | None:
        """Check ``token`` against this requirement.

        Raises:
            AuthenticationError: For a missing, malformed, unknown or revoked key.
            PermissionDeniedError: For a key whose role is too weak.
        """
        if self.open_setting and service.settings.open_predict:
            return None
        if service.db.dialect == "sqlite":  # a local lookup of microseconds: cheaper than a thread hop
            return service.keys.verify(token, self.role)
        return await run_in_threadpool(service.keys.verify, token, self.role)


@dataclass(frozen=True)
class _RouteRules:
    requirement: KeyRequirement | None
    max_body: int | None
    allowed: tuple[str, ...] = ()  # the path's methods, when it exists but not for this method


class RequestGate:
    """ASGI middleware: the API key, then the body size, checked before the body is read.

    For an endpoint that needs a key, the ``Authorization`` header is verified first: a
    request without a valid key gets its 401 (or 403) at once, its body never read nor
    spooled to disk. Then the body is bounded: ``upload_bytes`` for endpoints taking files,
    ``json_bytes`` for endpoints taking a JSON body, no body at all being read elsewhere.
    A declared ``Content-Length`` is checked before anything is read; a chunked body is
    counted as it arrives and cut off once it passes the limit (413).

    A path served for other methods than the request's gets its 405 here, with an
    ``Allow`` header naming every method of the path (FastAPI's names only those of the
    first route of the path).
    """

    def __init__(self, app: Any, upload_bytes: int, json_bytes: int) -> None:
        self.app = app
        self.upload_bytes = upload_bytes
        self.json_bytes = json_bytes
        self._rules: dict[int, _RouteRules] = {}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rules = self._rules_for(scope)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        has_body = (declared not in (None, b"0")) or b"transfer-encoding" in headers
        if rules.allowed:
            await _send_json(send, 405, {"detail": "Method Not Allowed"}, close=has_body,
                             extra=[(b"allow", ", ".join(rules.allowed).encode())])
            return
        if rules.requirement is not None:
            scheme, token = get_authorization_scheme_param(headers.get(b"authorization", b"").decode("latin-1"))
            try:
                key = await rules.requirement.verify(scope["app"].state.service,
                                                     token if scheme.lower() == "bearer" and token else None)
            except ServiceError as exc:
                await _send_error(send, exc, close=has_body)
                return
            scope.setdefault("state", {})["api_key"] = key
        limit = rules.max_body
        if limit is None:
            await self.app(scope, receive, send)
            return
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send, self._too_large(int(declared), limit), close=True)
            return
        state = {"received": 0, "rejected": False}

        async def limited_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > limit and not state["rejected"]:
                    state["rejected"] = True
                    await _send_error(send, self._too_large(state["received"], limit), close=True)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not state["rejected"]:
                await send(message)

        await self.app(scope, limited_receive, guarded_send)

    def _too_large(self, size: int, limit: int) -> PayloadTooLargeError:
        what = ("one image at max_upload_bytes plus 1 MiB of form fields" if limit == self.upload_bytes
                else "a JSON body")
        return PayloadTooLargeError(f"request body of {size:,}+ bytes is over the limit of {limit:,} bytes ({what})")

    def _rules_for(self, scope: dict[str, Any]) -> _RouteRules:
        allowed: set[str] = set()
        for route in scope["app"].router.routes:
            if not isinstance(route, APIRoute):
                continue
            match = route.matches(scope)[0]
            if match == Match.FULL:
                break
            if match == Match.PARTIAL:
                allowed |= route.methods
        else:
            return _RouteRules(None, None, tuple(sorted(allowed)))
        rules = self._rules.get(id(route))
        if rules is None:
            requirement = _requirement_of(route.dependant)
            if not route.dependant.body_params:
                max_body = None
            elif any(isinstance(p.field_info, params.File) for p in route.dependant.body_params):
                max_body = self.upload_bytes
            else:
                max_body = self.json_bytes
            rules = self._rules[id(route)] = _RouteRules(requirement, max_body)
        return rules


def _requirement_of(dependant: Any) -> KeyRequirement | None:
    """The :class:`KeyRequirement` among an endpoint's dependencies, if any."""
    for dependency in dependant.dependencies:
        if isinstance(dependency.call, KeyRequirement):
            return dependency.call
        found = _requirement_of(dependency)
        if found is not None:
            return found
    return None


async def _send_error(send: Any, exc: ServiceError, *, close: bool) -> None:
    """Answer ``{"detail": message}`` with the error's status, as the app's handlers do."""
    extra = [(b"www-authenticate", b"Bearer")] if isinstance(exc, AuthenticationError) else []
    await _send_json(send, exc.status_code, {"detail": str(exc)}, close=close, extra=extra)


async def _send_json(send: Any, status: int, content: dict[str, Any], *, close: bool,
                     extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    if close:  # the unread body cannot be skipped on this connection
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# -- the app ------------------------------------------------------------------------------
_ERROR_TEXTS = {
    400: "The body is not parseable as its content type (malformed multipart or JSON).",
    401: "No key, or an unknown, malformed or revoked key.",
    403: "The key's role may not do this.",
    404: "No such contribution among those the key may see.",
    413: "Request body, image file or pixel count over its limit.",
    415: "Not a TIFF, PNG or NPY image.",
    422: "Invalid image, labels or parameters.",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` of the given error statuses, each a ``{"detail": message}`` body."""
    return {code: {"model": schemas.ErrorResponse, "description": _ERROR_TEXTS[code]} for code in codes}


_UPLOAD_ERRORS = _errors(400, 401, 403, 413, 415, 422)


def create_app(settings: ServeSettings) -> FastAPI:
    """Build the API and web page for ``settings``; the model loads when the app starts.

    Args:
        settings: What to serve and how (see :class:`ServeSettings`).
    """

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await run_in_threadpool(Service.load, settings)
        await service.batcher.start()
        app.state.service = service
        try:
            yield
        finally:
            await service.batcher.stop()
            service.close()

    app = FastAPI(
        title="cellclass",
        summary="Predictions and dataset contributions for fluorescence microscopy cell images.",
        description=("Upload TIFF, PNG or NPY images for per-task predictions; contribute labelled images "
                     "for curators to accept into the next training run. Keys travel as "
                     "`Authorization: Bearer KEY` (roles: predict < contribute < curate)."),
        version=_version(),
        lifespan=lifespan,
    )
    app.add_middleware(RequestGate, upload_bytes=settings.max_request_bytes, json_bytes=_MAX_JSON_BODY)

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthenticationError) else None
        return JSONResponse({"detail": str(exc)}, status_code=exc.status_code, headers=headers)

    @app.exception_handler(CellclassError)
    async def _cellclass_error(_request: Request, exc: CellclassError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        form = request.headers.get("content-type", "").startswith(("multipart/", "application/x-www-form-urlencoded"))
        return JSONResponse({"detail": validation_message(exc.errors(), form=form)}, status_code=422)

    def service_of(request: Request) -> Service:
        return request.app.state.service

    def requires(role: str, *, open_setting: bool = False) -> Any:
        return Depends(KeyRequirement(role, open_setting))

    async def read_upload(service: Service, upload: UploadFile) -> bytes:
        if upload.size is not None and upload.size > service.settings.max_upload_bytes:
            raise PayloadTooLargeError(f"image {upload.filename!r} has {upload.size:,} bytes; the limit is "
                                       f"{service.settings.max_upload_bytes:,} bytes")
        return await upload.read()

    # -- pages and probes ---------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")

    @app.get("/healthz", response_model=schemas.Health, tags=["probes"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=schemas.Ready, tags=["probes"],
             responses={503: {"model": schemas.Ready, "description": "Not ready."}})
    async def readyz(request: Request) -> Any:
        """Readiness: model loaded, database answering, micro-batcher running."""
        service: Service | None = getattr(request.app.state, "service", None)
        if service is None:
            return JSONResponse({"status": "loading", "database": False}, status_code=503)
        database = await run_in_threadpool(service.db.ping)
        ready = database and service.batcher.running
        body = {"status": "ready" if ready else "not ready", "model": service.identity, "database": database,
                "batching": service.batcher.stats.as_dict()}
        return body if ready else JSONResponse(body, status_code=503)

    # -- model and predictions ----------------------------------------------------------
    @app.get("/v1/model", response_model=schemas.ModelInfo, tags=["predict"])
    async def model_info(request: Request) -> dict[str, Any]:
        """Tasks, classes, channels and input size of the served model."""
        service = service_of(request)
        p = service.predictor
        return {
            "model": service.identity,
            "tasks": [{"name": e.name, "type": e.type, "classes": e.classes, "thresholds": p.thresholds.get(e.name)}
                      for e in p.encoders.values()],
            "channels": p.channels, "in_chans": p.in_chans, "channel_indices": p.channel_indices,
            "image_size": p.image_size, "fit": p.fit, "dataset_id": service.dataset_id,
            "open_predict": service.settings.open_predict,
            "limits": {"max_upload_bytes": service.settings.max_upload_bytes,
                       "max_pixels": service.settings.max_pixels, "max_images": service.settings.max_images,
                       "accepted_extensions": list(ACCEPTED_EXTENSIONS)},
        }

    @app.post("/v1/predict", response_model=schemas.PredictResponse, tags=["predict"], responses=_UPLOAD_ERRORS)
    async def predict(
        request: Request,
        image: Annotated[list[UploadFile], File(min_length=1, description=(
            f"Image file(s): TIFF, PNG or NPY; repeat the field for several (at most {settings.max_images}, "
            f"{settings.max_request_bytes:,} bytes in all)."))],
        _key: Annotated[ApiKey | None, requires("predict", open_setting=True)],
    ) -> dict[str, Any]:
        """Per-task probabilities and labels (tuned thresholds) for one or more images."""
        service = service_of(request)
        if len(image) > service.settings.max_images:
            raise PayloadTooLargeError(f"got {len(image)} images in one request; the limit is "
                                       f"{service.settings.max_images}")
        blobs = [(await read_upload(service, u), u.filename) for u in image]

        def decode_and_prepare() -> tuple[list[Upload], np.ndarray]:
            uploads = [service.decode(data, name) for data, name in blobs]
            return uploads, service.prepare([u.image for u in uploads])

        uploads, x = await service.run_cpu(decode_and_prepare)
        probabilities = await service.batcher.submit(x)
        results = service.predictor.describe(probabilities)
        return {"model": service.identity,
                "predictions": [{"filename": u.filename, "tasks": r} for u, r in zip(uploads, results, strict=True)]}

    @app.post("/v1/saliency", tags=["predict"], response_class=Response, responses={
        200: {"content": {"image/png": {}}, "description": "The image beside its Grad-CAM overlay."}, **_UPLOAD_ERRORS})
    async def saliency(
        request: Request,
        image: Annotated[UploadFile, File(description="One image: TIFF, PNG or NPY.")],
        _key: Annotated[ApiKey | None, requires("predict", open_setting=True)],
        task: Annotated[str | None, Form(max_length=200, description="Task to explain (default: the first).")] = None,
        class_name: Annotated[str | None, Form(max_length=200,
                                               description="Class to explain (default: the predicted one).")] = None,
    ) -> Response:
        """Grad-CAM of the last convolutional layer: a PNG of the image and its overlay side by side."""
        service = service_of(request)
        data = await read_upload(service, image)

        def work() -> tuple[bytes, dict[str, str]]:
            return service.saliency_png(service.decode(data, image.filename), task, class_name)

        png, headers = await service.run_cpu(work)
        return Response(png, media_type="image/png", headers=headers)

    # -- contributions --------------------------------------------------------------------
    @app.post("/v1/contributions", status_code=201, response_model=schemas.Contribution, tags=["contributions"],
              responses={200: {"model": schemas.Contribution, "description": "The same contribution already existed."},
                         **_UPLOAD_ERRORS})
    async def contribute(
        request: Request,
        response: Response,
        image: Annotated[UploadFile, File(description="The image: TIFF, PNG or NPY.")],
        key: Annotated[ApiKey, requires("contribute")],
        labels: Annotated[str, Form(max_length=settings.max_metadata_bytes, description=(
            'JSON object of task to label(s), e.g. {"particle_type": "Fe"}; nested at most '
            f'{MAX_JSON_DEPTH} levels, at most {settings.max_metadata_bytes:,} bytes.'))],
        metadata: Annotated[str | None, Form(max_length=settings.max_metadata_bytes, description=(
            "Optional JSON object (plate, well, microscope, ...): standard JSON (no NaN or Infinity), "
            f"nested at most {MAX_JSON_DEPTH} levels, at most {settings.max_metadata_bytes:,} bytes."))] = None,
    ) -> dict[str, Any]:
        """Contribute a labelled image; it waits as ``pending`` until a curator accepts or rejects it."""
        service = service_of(request)
        data = await read_upload(service, image)
        upload, checked, extra = await service.run_cpu(service.check_contribution, data, image.filename, labels,
                                                       metadata)
        record, created = await run_in_threadpool(functools.partial(
            service.contributions.add, upload, checked, extra, contributor=key.key_id, dataset=service.dataset_id,
            model=service.identity))
        if not created:
            response.status_code = 200
        return {**record, "duplicate": not created}

    @app.get("/v1/contributions", response_model=schemas.ContributionList, tags=["contributions"],
             responses=_errors(401, 403, 422))
    async def list_contributions(
        request: Request,
        key: Annotated[ApiKey, requires("contribute")],
        status: Annotated[Literal["pending", "accepted", "rejected"] | None, Query(description="Review status.")] = None,
        contributor: Annotated[str | None, Query(pattern=KEY_ID_PATTERN, description="Key id (curators only).")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=_MAX_OFFSET)] = 0,
    ) -> dict[str, Any]:
        """Curators see every contribution; a contribute key sees its own."""
        service = service_of(request)
        if not key.allows("curate"):
            if contributor not in (None, key.key_id):
                raise PermissionDeniedError(f"key {key.key_id} (role {key.role!r}) may list only its own "
                                            f"contributions, asked for contributor {contributor!r}; valid: "
                                            f"{key.key_id}, or a curate key")
            contributor = key.key_id
        items, total = await run_in_threadpool(lambda: service.contributions.list(
            status=status, contributor=contributor, limit=limit, offset=offset))
        return {"total": total, "limit": limit, "offset": offset, "items": items}

    async def visible(service: Service, contribution_id: str, key: ApiKey) -> dict[str, Any]:
        record = await run_in_threadpool(service.contributions.get, contribution_id)
        if not key.allows("curate") and record["contributor"] != key.key_id:
            raise NotFoundError(f"no contribution with id {contribution_id!r} among key {key.key_id}'s own")
        return record

    @app.get("/v1/contributions/{contribution_id}", response_model=schemas.Contribution, tags=["contributions"],
             responses=_errors(401, 403, 404, 422))
    async def get_contribution(request: Request, contribution_id: ContributionId,
                               key: Annotated[ApiKey, requires("contribute")]) -> dict[str, Any]:
        """One contribution (curators: any; contributors: their own)."""
        return await visible(service_of(request), contribution_id, key)

    @app.get("/v1/contributions/{contribution_id}/image", tags=["contributions"], response_class=Response,
             responses={200: {"content": {"image/tiff": {}, "image/png": {}, "application/octet-stream": {}}},
                        **_errors(401, 403, 404, 422)})
    async def contribution_image(request: Request, contribution_id: ContributionId,
                                 key: Annotated[ApiKey, requires("contribute")]) -> Response:
        """The contributed file, as uploaded."""
        service = service_of(request)
        record = await visible(service, contribution_id, key)
        data = await run_in_threadpool(service.contributions.image, record)
        return Response(data, media_type=_MEDIA_TYPES.get(record["extension"], "application/octet-stream"),
                        headers={"Content-Disposition": f'attachment; filename="{record["sha256"]}{record["extension"]}"'})

    async def review(request: Request, contribution_id: str, status: str, key: ApiKey,
                     body: schemas.Review | None) -> dict[str, Any]:
        service = service_of(request)
        note = body.note if body is not None else None
        return await run_in_threadpool(lambda: service.contributions.review(
            contribution_id, status, reviewer=key.key_id, note=note))

    @app.post("/v1/contributions/{contribution_id}/accept", response_model=schemas.Contribution,
              tags=["contributions"], responses=_errors(400, 401, 403, 404, 413, 422))
    async def accept(request: Request, contribution_id: ContributionId, key: Annotated[ApiKey, requires("curate")],
                     body: schemas.Review | None = None) -> dict[str, Any]:
        """Accept a contribution into the next training export (curators)."""
        return await review(request, contribution_id, "accepted", key, body)

    @app.post("/v1/contributions/{contribution_id}/reject", response_model=schemas.Contribution,
              tags=["contributions"], responses=_errors(400, 401, 403, 404, 413, 422))
    async def reject(request: Request, contribution_id: ContributionId, key: Annotated[ApiKey, requires("curate")],
                     body: schemas.Review | None = None) -> dict[str, Any]:
        """Reject a contribution (curators)."""
        return await review(request, contribution_id, "rejected", key, body)

    @app.get("/v1/keys/me", response_model=schemas.KeyInfo, tags=["keys"], responses=_errors(401))
    async def whoami(key: Annotated[ApiKey, requires("predict")]) -> dict[str, Any]:
        """The calling key's id, role and name."""
        return {"key_id": key.key_id, "role": key.role, "name": key.name}

    return app


def validation_message(errors: Sequence[dict[str, Any]], *, form: bool = False) -> str:
    """One line from FastAPI's validation errors: which parameter, what was wrong, the value received.

    Example: ``query parameter 'offset': Input should be less than or equal to 2147483647,
    got '9223372036854775808'``.

    Args:
        errors: ``RequestValidationError.errors()``.
        form: Whether the body is a form (its fields are then named form fields).
    """
    places = {"query": "query parameter", "path": "path parameter", "header": "header", "cookie": "cookie",
              "body": "form field" if form else "JSON body field"}
    parts = []
    for error in errors[:5]:
        location = [str(part) for part in error.get("loc", ())]
        place = places.get(location[0], location[0]) if location else "request"
        name = ".".join(location[1:]) or "(the body)"
        received = "nothing" if error.get("type") == "missing" else _shorten(repr(error.get("input")))
        parts.append(f"{place} {name!r}: {error.get('msg', 'invalid')}, got {received}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


def _shorten(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _version() -> str:
    from cellclass import __version__

    return __version__
