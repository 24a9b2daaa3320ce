"""Responses the gateway sends: relayed streams, buffered bodies and its own errors.

Every response is a ``StreamingResponse`` from ``azurefunctions-extensions-http-fastapi`` (that is,
FastAPI's), the type the Functions worker streams without buffering.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway._exceptions import RequestError

#: Headers that describe one connection, not the message; never relayed either way.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
#: Upstream response headers the gateway sets itself or must not pass on.
_NOT_RELAYED = HOP_BY_HOP | {"content-length", "content-encoding", "date", "server", "set-cookie"}

BACKEND_HEADER = "x-gateway-backend"
REQUEST_ID_HEADER = "x-gateway-request-id"


class RelayResponse(StreamingResponse):
    """A stream whose body iterator is closed as soon as the response ends, disconnect included."""

    body_iterator: AsyncIterator[bytes]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


async def _once(body: bytes) -> AsyncIterator[bytes]:
    yield body


def relayed_headers(upstream: Iterable[tuple[str, str]], *, backend: str, request_id: str) -> dict[str, str]:
    """Upstream response headers a client uses, plus the backend that served and our request id."""
    headers: dict[str, str] = {}
    for name, value in upstream:
        lowered = name.lower()
        if lowered not in _NOT_RELAYED:
            headers[lowered] = value
    headers[BACKEND_HEADER] = backend
    headers[REQUEST_ID_HEADER] = request_id
    return headers


def buffered(status: int, body: bytes, headers: Mapping[str, str]) -> StreamingResponse:
    """A complete body, sent with its length."""
    all_headers = dict(headers)
    all_headers["content-length"] = str(len(body))
    return StreamingResponse(_once(body), status_code=status, headers=all_headers)


def error_response(error: RequestError, *, request_id: str | None = None) -> StreamingResponse:
    """The AOAI-shaped ``{"error": {"code", "message"}}`` for ``error``."""
    headers = {"content-type": "application/json", **error.headers}
    if request_id:
        headers[REQUEST_ID_HEADER] = request_id
    return buffered(error.status, error.body(), headers)
