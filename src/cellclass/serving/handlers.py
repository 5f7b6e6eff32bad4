"""Errors as HTTP answers: every refusal is ``{"detail": one line}`` with its status.

:class:`~cellclass.errors.ServiceError` subclasses carry their status; any other
:class:`~cellclass.errors.CellclassError` (an image or label the library refuses) is a
422; FastAPI's validation errors become one line naming the parameter, what was wrong and
the value received.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from cellclass.errors import AuthenticationError, CellclassError, ServiceError


def error_headers(exc: ServiceError) -> dict[str, str]:
    """Headers an error's answer carries: the scheme to authenticate with, for a 401."""
    return {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthenticationError) else {}


async def service_error(_request: Request, exc: ServiceError) -> JSONResponse:
    """A service error, with its own status."""
    return JSONResponse({"detail": str(exc)}, status_code=exc.status_code, headers=error_headers(exc) or None)


async def cellclass_error(_request: Request, exc: CellclassError) -> JSONResponse:
    """Another cellclass error: what the caller sent cannot be used (422)."""
    return JSONResponse({"detail": str(exc)}, status_code=422)


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A request FastAPI refused: 422 with one line instead of FastAPI's list of errors."""
    form = request.headers.get("content-type", "").startswith(("multipart/", "application/x-www-form-urlencoded"))
    return JSONResponse({"detail": validation_message(exc.errors(), form=form)}, status_code=422)


def add_exception_handlers(app: FastAPI) -> None:
    """Install the handlers above on ``app``."""
    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(CellclassError, cellclass_error)
    app.add_exception_handler(RequestValidationError, invalid_request)


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
