"""Liveness and readiness probes: ``/healthz``, ``/readyz``."""

from typing import Annotated, Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from cellclass.serving import schemas
from cellclass.serving.dependencies import loaded_service
from cellclass.serving.service import Service

router = APIRouter(tags=["probes"])


@router.get("/healthz", response_model=schemas.Health)
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", response_model=schemas.Ready,
            responses={503: {"model": schemas.Ready, "description": "Not ready."}})
async def readyz(service: Annotated[Service | None, Depends(loaded_service)]) -> Any:
    """Readiness: model loaded, database answering, micro-batcher running."""
    if service is None:
        return JSONResponse({"status": "loading", "database": False}, status_code=503)
    database = await run_in_threadpool(service.db.ping)
    ready = database and service.batcher.running
    body = {"status": "ready" if ready else "not ready", "model": service.identity, "database": database,
            "batching": service.batcher.stats.as_dict()}
    return body if ready else JSONResponse(body, status_code=503)
