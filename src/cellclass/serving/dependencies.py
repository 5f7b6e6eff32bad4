"""What endpoints depend on, as FastAPI dependencies: the loaded service, its parts, the API key.

Routers declare ``service: ServiceDep`` or ``key: Annotated[ApiKey, require("curate")]``.
The service and its parts can be replaced through ``app.dependency_overrides``; the key
cannot be bypassed that way, since the request gate checks it before the body is read.
"""

# No ``from __future__ import annotations``: FastAPI reads these annotations at run time, and
# cannot resolve them as strings on a callable instance such as KeyRequirement.
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.params import Depends as DependsParam
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cellclass.errors import NotFoundError, PayloadTooLargeError
from cellclass.serving.contributions import ContributionStore
from cellclass.serving.keys import ApiKey
from cellclass.inference.predictor import Predictor
from cellclass.serving.labelling import LabellingQueue
from cellclass.serving.service import Service
from cellclass.serving.settings import ServeSettings

bearer = HTTPBearer(auto_error=False, description="An API key made by `cellclass keys create --role ROLE`.")
"""The bearer scheme the OpenAPI document declares for keyed endpoints."""


def get_service(request: Request) -> Service:
    """The app's loaded :class:`Service` (set by the lifespan before any request is served)."""
    return request.app.state.service


def loaded_service(request: Request) -> Service | None:
    """The app's :class:`Service`, or None while it is still loading (for the readiness probe)."""
    return getattr(request.app.state, "service", None)


ServiceDep = Annotated[Service, Depends(get_service)]


def get_settings(service: ServiceDep) -> ServeSettings:
    """The settings the service runs with."""
    return service.settings


def get_predictor(service: ServiceDep) -> Predictor:
    """The served model."""
    return service.predictor


def get_store(service: ServiceDep) -> ContributionStore:
    """The contribution store."""
    return service.contributions


def get_queue(service: ServiceDep) -> LabellingQueue:
    """The labelling queue.

    Raises:
        NotFoundError: When the server was started without one.
    """
    if service.queue is None:
        raise NotFoundError("this server has no labelling queue; start it with `cellclass serve RUN --queue "
                            "RANK.csv` (a ranking made by `cellclass rank RUN POOL`)")
    return service.queue


SettingsDep = Annotated[ServeSettings, Depends(get_settings)]
PredictorDep = Annotated[Predictor, Depends(get_predictor)]
StoreDep = Annotated[ContributionStore, Depends(get_store)]
QueueDep = Annotated[LabellingQueue, Depends(get_queue)]


@dataclass(frozen=True)
class KeyRequirement:
    """The API key role an endpoint needs: a FastAPI dependency, also read by the request gate.

    The gate (:class:`~cellclass.serving.gate.RequestGate`) verifies the key from the headers
    before the body is read and leaves the record in ``request.state.api_key``; the
    dependency returns it (and declares the bearer scheme in the OpenAPI document).

    Attributes:
        role: The weakest role allowed.
        open_setting: Whether ``--open-predict`` lifts the requirement.
    """

    role: str
    open_setting: bool = False

    async def __call__(self, request: Request,
                       credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> ApiKey | None:
        """The verified key (None where the requirement is lifted)."""
        if hasattr(request.state, "api_key"):
            return request.state.api_key
        return await self.verify(get_service(request), credentials.credentials if credentials is not None else None)

    async def verify(self, service: Service, token: str | None) -> ApiKey | None:
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


def require(role: str, *, open_setting: bool = False) -> DependsParam:
    """A dependency on a key of ``role`` or above (``open_setting``: unless ``--open-predict``)."""
    return Depends(KeyRequirement(role, open_setting))


async def read_upload(upload: UploadFile, settings: ServeSettings) -> bytes:
    """An uploaded file's bytes, refused before reading when its declared size is over the limit.

    Raises:
        PayloadTooLargeError: When the part is larger than ``settings.max_upload_bytes``.
    """
    if upload.size is not None and upload.size > settings.max_upload_bytes:
        raise PayloadTooLargeError(f"image {upload.filename!r} has {upload.size:,} bytes; the limit is "
                                   f"{settings.max_upload_bytes:,} bytes")
    return await upload.read()
