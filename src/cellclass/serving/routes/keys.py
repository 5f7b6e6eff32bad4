"""The calling key: ``/v1/keys/me``."""

from typing import Annotated, Any

from fastapi import APIRouter

from cellclass.serving.dependencies import require
from cellclass.serving.keys import ApiKey
from cellclass.serving.schemas import KeyInfo, error_responses

router = APIRouter(tags=["keys"])


@router.get("/v1/keys/me", response_model=KeyInfo, responses=error_responses(401))
async def whoami(key: Annotated[ApiKey, require("predict")]) -> dict[str, Any]:
    """The calling key's id, role and name."""
    return {"key_id": key.key_id, "role": key.role, "name": key.name}
