"""A small local Functions host: serves a ``FunctionApp``'s HTTP functions over ASGI (uvicorn).

It does for ``python -m gateway serve`` and the tests what the Functions host and the Python
worker do in Azure: match the request to a registered route (literal segments before
parameters, parameters before catch-alls; ``routePrefix`` is ``""`` as in host.json), hand the
function a FastAPI ``Request`` with the route's ``path_params``, and run the response it returns.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import azure.functions as func
from azure.functions.decorators.http import HttpTrigger
from fastapi import Request
from starlette.types import Receive, Scope, Send

from gateway._triggers import TriggerRunner, queue_triggers

log = logging.getLogger(__name__)

_PARAM = re.compile(r"\{(\*?)([A-Za-z_][A-Za-z0-9_]*)(?::[^}?]*)?(\??)\}")


@dataclass(frozen=True, slots=True)
class _Route:
    name: str
    pattern: re.Pattern[str]
    methods: frozenset[str] | None
    function: Callable[..., Awaitable[Any]]
    arg_name: str
    rank: tuple[int, int, int]


def _compile(template: str) -> tuple[re.Pattern[str], tuple[int, int, int]]:
    parts: list[str] = []
    literals = catch_alls = 0
    for segment in template.strip("/").split("/"):
        match = _PARAM.fullmatch(segment)
        if match is None:
            literals += 1
            parts.append("/" + re.escape(segment.lower()))
        elif match.group(1):
            catch_alls += 1
            parts.append(f"(?:/(?P<{match.group(2)}>.*))?")
        elif match.group(3):
            parts.append(f"(?:/(?P<{match.group(2)}>[^/]+))?")
        else:
            parts.append(f"/(?P<{match.group(2)}>[^/]+)")
    return re.compile("".join(parts) + "/?"), (catch_alls, -literals, -len(parts))


#: ``FunctionApp.get_functions()`` indexes once and refuses a second call: keep its answer per app.
_INDEXED: weakref.WeakKeyDictionary[func.FunctionApp, list[Any]] = weakref.WeakKeyDictionary()


def indexed(app: func.FunctionApp) -> list[Any]:
    """The app's functions (indexed once per app)."""
    if app not in _INDEXED:
        _INDEXED[app] = app.get_functions()
    return _INDEXED[app]


def http_routes(functions: list[Any]) -> list[_Route]:
    """The HTTP functions, most specific route first."""
    routes = []
    for function in functions:
        trigger = function.get_trigger()
        if not isinstance(trigger, HttpTrigger):
            continue
        template = trigger.route or function.get_function_name()
        pattern, rank = _compile(template)
        methods = None if not trigger.methods else frozenset(
            str(getattr(m, "value", m)).upper() for m in trigger.methods)
        user_function = function.get_user_function()
        if not inspect.iscoroutinefunction(user_function):
            raise TypeError(f"{function.get_function_name()}: the local host runs async functions only")
        routes.append(_Route(function.get_function_name(), pattern, methods, user_function, trigger.name, rank))
    return sorted(routes, key=lambda r: r.rank)


async def _plain_error(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class LocalHost:
    """An ASGI app serving ``app``'s HTTP functions, and its Service Bus queue triggers whose
    connection is in ``env``; ``startup``/``shutdown`` run in its lifespan around them."""

    def __init__(
        self,
        app: func.FunctionApp,
        *,
        startup: Callable[[], Awaitable[object]] | None = None,
        shutdown: Callable[[], Awaitable[object]] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        functions = indexed(app)
        self._routes = http_routes(functions)
        self._triggers = TriggerRunner(queue_triggers(functions, env or {}), env or {})
        self._startup = startup
        self._shutdown = shutdown

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            hook = self._startup if message["type"] == "lifespan.startup" else self._shutdown
            stage = "startup" if message["type"] == "lifespan.startup" else "shutdown"
            try:
                if stage == "shutdown":
                    await self._triggers.stop()
                if hook is not None:
                    await hook()
                if stage == "startup":
                    self._triggers.start()
            except Exception as exc:  # reported to uvicorn, which stops with the message
                log.error("%s failed: %s", stage, exc)
                await send({"type": f"lifespan.{stage}.failed", "message": str(exc)})
                if stage == "startup":
                    return
            else:
                await send({"type": f"lifespan.{stage}.complete"})
            if stage == "shutdown":
                return

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path = scope.get("raw_path") or scope["path"].encode()
        # decode each segment but an encoded slash, which stays "%2F" inside its segment (as in ASP.NET)
        path = "/".join(unquote(s).replace("/", "%2F") for s in raw_path.decode("latin-1").split("?")[0].split("/"))
        lowered = path.lower()
        method = scope["method"].upper()
        path_matched = False
        for route in self._routes:
            match = route.pattern.fullmatch(lowered)
            if match is None:
                continue
            path_matched = True
            if route.methods is not None and method not in route.methods:
                continue
            # parameters keep the request's case: take them from the same span of the original path
            params = {k: path[match.start(k):match.end(k)] for k, v in match.groupdict().items() if v is not None}
            scope["path_params"] = params
            try:
                response = await route.function(**{route.arg_name: Request(scope, receive)})
            except Exception:
                log.exception("function %s failed", route.name)
                await _plain_error(send, 500, "InternalServerError", "The function failed; see the host log.")
                return
            await response(scope, receive, send)
            return
        if path_matched:
            await _plain_error(send, 405, "MethodNotAllowed", f"{method} is not allowed here.")
        else:
            await _plain_error(send, 404, "404", "Resource not found")
