"""The host's HTTP front: match a route, start the invocation, and forward the request to the worker's own
HTTP server (the runtime's ``HttpUri``) with ``x-ms-invocation-id``, streaming both ways, unbuffered."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from starlette.types import Message, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from devkit._protos import protos
from devkit._routes import Route, RouteTable, decoded_path

log = logging.getLogger("devkit.host")

_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                         b"transfer-encoding", b"upgrade", b"host"})
_INVOCATION_HEADER = b"x-ms-invocation-id"


def error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}).encode()


async def send_error(send: Send, status: int, code: str, message: str) -> None:
    body = error_body(code, message)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class JsonErrorHttpProtocol(HttpToolsProtocol):
    """uvicorn's HTTP protocol, answering malformed HTTP with a JSON error body instead of plain text."""

    def send_400_response(self, msg: str) -> None:
        body = error_body("BadRequest", f"Malformed HTTP request: {msg}")
        self.transport.write(b"".join([
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n", body]))
        self.transport.close()


Invoke = Callable[[Route, str, str, str, dict[str, str]], "asyncio.Future[Any]"]


class HttpFront:
    """An ASGI app that serves the HTTP functions through the worker."""

    def __init__(self, routes: RouteTable, *, invoke: Invoke, worker_url: str, session: aiohttp.ClientSession) -> None:
        self._routes = routes
        self._invoke = invoke
        self._worker_url = worker_url.rstrip("/")
        self._session = session

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
        method = scope["method"].upper()
        found = self._routes.match(decoded_path(raw_path), method)
        if found is True:
            await send_error(send, 405, "MethodNotAllowed", f"{method} is not allowed here.")
            return
        if found is False:
            await send_error(send, 404, "404", "Resource not found")
            return
        route, params = found
        query = scope.get("query_string", b"").decode("latin-1")
        target = raw_path + ("?" + query if query else "")
        headers = [(k, v) for k, v in scope["headers"]
                   if k.lower() not in _HOP_BY_HOP and k.lower() != _INVOCATION_HEADER]
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k.lower() == b"host"), "localhost")
        invocation_id = str(uuid.uuid4())
        answer = self._invoke(route, invocation_id, method, f"http://{host}{target}", params)
        answer.add_done_callback(lambda f: _report(route, invocation_id, f))
        headers.append((_INVOCATION_HEADER, invocation_id.encode()))
        body_done, finished = asyncio.Event(), asyncio.Event()
        forward = asyncio.get_running_loop().create_task(
            self._forward(method, target, headers, _body(receive, body_done, scope), send, finished))
        watch = asyncio.get_running_loop().create_task(_cancel_on_disconnect(receive, body_done, finished, forward))
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await forward
        finally:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _forward(self, method: str, target: str, headers: list[tuple[bytes, bytes]],
                       body: AsyncIterator[bytes] | None, send: Send, finished: asyncio.Event) -> None:
        started = False
        try:
            async with self._session.request(
                method, self._worker_url + target, data=body, allow_redirects=False, compress=None,
                headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers],
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
            ) as response:
                await send({"type": "http.response.start", "status": response.status,
                            "headers": _response_headers(response.raw_headers)})
                started = True
                async for chunk in response.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                finished.set()
                await send({"type": "http.response.body", "body": b""})
        except (aiohttp.ClientError, OSError) as exc:
            if _client_gone(exc):
                log.debug("the client went away while sending its body")
                return
            log.error("the worker's HTTP server failed the request: %s", exc)
            if not started:
                await send_error(send, 500, "WorkerUnavailable", "The function host could not reach its worker.")


class ClientGone(ConnectionResetError):
    """The client disconnected before its body was complete."""


def _client_gone(exc: BaseException | None) -> bool:
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, ClientGone):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _response_headers(raw: tuple[tuple[bytes, bytes], ...]) -> list[tuple[bytes, bytes]]:
    """The worker's headers for the client: hop-by-hop ones dropped, but a ``connection: close`` is kept
    (the function wants the client's connection ended, e.g. after refusing a body it did not read)."""
    return [(k, v) for k, v in raw
            if k.lower() not in _HOP_BY_HOP or (k.lower() == b"connection" and v.strip().lower() == b"close")]


def _body(receive: Receive, done: asyncio.Event, scope: Scope) -> AsyncIterator[bytes] | None:
    has_body = any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in scope["headers"])
    if not has_body:
        done.set()
        return None

    async def chunks() -> AsyncIterator[bytes]:
        try:
            # an empty first chunk makes aiohttp send the request headers now, not with the first body
            # bytes: the function sees its request (and its body-read limit runs) even if no byte comes
            yield b""
            while True:
                message: Message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone("the client went away while sending its body")
                if message.get("body"):
                    yield message["body"]
                if not message.get("more_body", False):
                    return
        finally:
            done.set()

    return chunks()


async def _cancel_on_disconnect(receive: Receive, body_done: asyncio.Event, finished: asyncio.Event,
                                forward: asyncio.Task[None]) -> None:
    """Cancels the forwarding when the client goes away before its answer is complete (so the worker's
    connection closes and the function sees the disconnect). Looked for only once the body was read."""
    await body_done.wait()
    while (await receive())["type"] != "http.disconnect":
        pass
    if not finished.is_set():
        forward.cancel()


def _report(route: Route, invocation_id: str, answer: asyncio.Future[Any]) -> None:
    if answer.cancelled():
        return
    if answer.exception() is not None:
        log.error("invocation %s of %s: %s", invocation_id, route.function, answer.exception())
        return
    result = answer.result().result
    if result.status != protos.StatusResult.Success:
        log.error("function %s failed (invocation %s): %s", route.function, invocation_id, result.exception.message)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
