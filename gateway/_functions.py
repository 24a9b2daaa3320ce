"""The plain async functions ``function_app.py`` wires to its triggers."""

from __future__ import annotations

import logging
import re

from fastapi import Request
from fastapi.responses import StreamingResponse

from gateway._endpoints import endpoint
from gateway._exceptions import MethodNotAllowed, NotFound, RequestError, SettingsError
from gateway._health import liveness, readiness
from gateway._proxy import Proxy
from gateway._responses import error_response
from gateway._runtime import GatewayRuntime

log = logging.getLogger(__name__)

_MEDIA = r"images/generations|audio/(?:transcriptions|translations|speech)"
#: The gateway's paths and the methods they take: another method gets 405, not 404.
_GATEWAY_PATHS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), methods) for pattern, methods in (
        (rf"/openai/deployments/[^/]+/(?:chat/completions|completions|embeddings|{_MEDIA})/?", "POST"),
        (rf"/openai/v1/(?:chat/completions|embeddings|{_MEDIA})/?", "POST"),
        (r"/openai/(?:v1/)?responses/?", "POST"),
        (r"/openai/(?:v1/)?responses/[^/]+/?", "GET, DELETE"),
        (r"/openai/(?:v1/)?responses/[^/]+/cancel/?", "POST"),
        (r"/openai/(?:v1/)?responses/[^/]+/input_items/?", "GET"),
        (r"/openai/v1/models/?", "GET"),
        (r"/usage(?:/data|/statement\.csv)?/?", "GET"),
    ))


async def _proxy(runtime: GatewayRuntime) -> Proxy | StreamingResponse:
    try:
        return await runtime.proxy()
    except SettingsError as exc:
        log.error("the gateway cannot start: %s", exc)
        return error_response(RequestError(
            f"The gateway is misconfigured: {exc}", status=500, code="GatewayMisconfigured"))


async def proxy_request(runtime: GatewayRuntime, request: Request, *, operation: str, v1: bool) -> StreamingResponse:
    """Proxy one AOAI call through the process's gateway: ``operation`` names the kind of call (the usage
    event's ``operation``: ``chat/completions``, ``responses``, ``images``, ``audio.speech``, ...)."""
    proxy = await _proxy(runtime)
    if isinstance(proxy, StreamingResponse):
        return proxy
    return await proxy.handle(request, endpoint=endpoint(operation, v1=v1))


async def stored_response_request(runtime: GatewayRuntime, request: Request, *, action: str | None,
                                  v1: bool) -> StreamingResponse:
    """A call on a stored response: ``action`` is ``cancel`` or ``input_items``; ``None``: the method
    says (GET retrieves, also as a resumed stream; DELETE deletes)."""
    if action is None:
        action = "delete" if request.method == "DELETE" else "retrieve"
    return await proxy_request(runtime, request, operation=f"responses.{action}", v1=v1)


async def list_models(runtime: GatewayRuntime, request: Request) -> StreamingResponse:
    """``GET /openai/v1/models``: the deployment names the gateway serves."""
    proxy = await _proxy(runtime)
    if isinstance(proxy, StreamingResponse):
        return proxy
    return await proxy.models(request)


async def check_health(request: Request) -> StreamingResponse:
    """``/health``: 200 while the process answers; touches no key, storage or backend."""
    return await liveness()


async def check_ready(runtime: GatewayRuntime, request: Request) -> StreamingResponse:
    """``/health/ready``: 200 when settings, Table Storage and the usage publisher are usable, else 503."""
    return await readiness(runtime)


async def not_routed(request: Request) -> StreamingResponse:
    """404 for a path the gateway does not serve, 405 for a gateway path with the wrong method."""
    for pattern, methods in _GATEWAY_PATHS:
        if pattern.fullmatch(request.url.path) and request.method not in methods.split(", "):
            return error_response(MethodNotAllowed(
                f"{request.method} is not allowed here; use {methods.replace(', ', ' or ')}.",
                headers={"allow": methods}))
    return error_response(NotFound("Resource not found"))
