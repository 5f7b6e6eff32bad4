"""What a request must bring before its body is read: a valid key, a body within its limit.

:class:`RequestGate` is ASGI middleware in front of the routers. It reads each endpoint's
needs from its declaration (a :class:`~cellclass.serving.dependencies.KeyRequirement`
among its dependencies; file or JSON body parameters), so a router states them once. It
is given the routers' routes rather than reading the app's, whose layout differs between
FastAPI versions (copied routes, or included routers resolved lazily).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import params
from fastapi.routing import APIRoute
from fastapi.security.utils import get_authorization_scheme_param
from starlette.routing import BaseRoute, Match

from cellclass.errors import PayloadTooLargeError, ServiceError
from cellclass.serving.dependencies import KeyRequirement
from cellclass.serving.handlers import error_headers


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

    Args:
        app: The ASGI app behind the gate.
        routes: The routes it guards (those of the app's routers), in the app's order.
        upload_bytes: Body limit of endpoints taking files.
        json_bytes: Body limit of endpoints taking a JSON body.
    """

    def __init__(self, app: Any, routes: Sequence[BaseRoute], upload_bytes: int, json_bytes: int) -> None:
        self.app = app
        self.routes = [route for route in routes if isinstance(route, APIRoute)]
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
        await self.app(scope, *self._bounded(receive, send, limit))

    def _bounded(self, receive: Any, send: Any, limit: int) -> tuple[Any, Any]:
        """``receive`` that answers 413 once the body passes ``limit``, and ``send`` that then stays quiet."""
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

        return limited_receive, guarded_send

    def _too_large(self, size: int, limit: int) -> PayloadTooLargeError:
        what = ("one image at max_upload_bytes plus 1 MiB of form fields" if limit == self.upload_bytes
                else "a JSON body")
        return PayloadTooLargeError(f"request body of {size:,}+ bytes is over the limit of {limit:,} bytes ({what})")

    def _rules_for(self, scope: dict[str, Any]) -> _RouteRules:
        allowed: set[str] = set()
        for route in self.routes:
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
    extra = [(name.lower().encode(), value.encode()) for name, value in error_headers(exc).items()]
    await _send_json(send, exc.status_code, {"detail": str(exc)}, close=close, extra=extra)


async def _send_json(send: Any, status: int, content: dict[str, Any], *, close: bool,
                     extra: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(content).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    if close:  # the unread body cannot be skipped on this connection
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
