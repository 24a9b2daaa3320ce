"""The plain async functions ``function_app.py`` wires to its triggers."""

from __future__ import annotations

import logging
import re

from fastapi import Request
from fastapi.responses import StreamingResponse

from gateway._exceptions import MethodNotAllowed, NotFound, RequestError, SettingsError
from gateway._health import liveness, readiness
from gateway._responses import error_response
from gateway._runtime import GatewayRuntime

log = logging.getLogger(__name__)

_GATEWAY_PATHS = re.compile(
    r"/openai/(?:deployments/[^/]+/(?:chat/completions|completions|embeddings)|v1/(?:chat/completions|embeddings))/?",
    re.IGNORECASE,
)


async def proxy_request(runtime: GatewayRuntime, request: Request, *, operation: str, v1: bool) -> StreamingResponse:
    """Proxy one AOAI call through the process's gateway."""
    try:
        proxy = await runtime.proxy()
    except SettingsError as exc:
        log.error("the gateway cannot start: %s", exc)
        return error_response(RequestError(
            f"The gateway is misconfigured: {exc}", status=500, code="GatewayMisconfigured"))
    return await proxy.handle(request, operation=operation, v1=v1)


async def check_health(request: Request) -> StreamingResponse:
    """``/health``: 200 while the process answers; touches no key, storage or backend."""
    return await liveness()


async def check_ready(runtime: GatewayRuntime, request: Request) -> StreamingResponse:
    """``/health/ready``: 200 when settings, Table Storage and the usage publisher are usable, else 503."""
    return await readiness(runtime)


async def not_routed(request: Request) -> StreamingResponse:
    """404 for a path the gateway does not serve, 405 for a gateway path with the wrong method."""
    if _GATEWAY_PATHS.fullmatch(request.url.path):
        return error_response(MethodNotAllowed(
            f"{request.method} is not allowed here; use POST.", headers={"allow": "POST"}))
    return error_response(NotFound("Resource not found"))
