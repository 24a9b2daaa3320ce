"""Health endpoints: ``/health`` (the process answers) and ``/health/ready`` (it can serve).

``liveness`` touches nothing: no key, no storage, no backend. ``readiness`` checks, each within
``CHECK_TIMEOUT_SECONDS``:

- ``settings``: the gateway's settings load (else ``down``, naming the setting, never its value);
- ``storage``: Table Storage answers a point read of the keys table (a "not found" is an answer);
  ``degraded`` when it took more than half the bound;
- ``usage_publisher``: the publisher can send. Service Bus: its sender link opens; ``degraded`` while
  a send is being retried or the buffer is more than half full. The in-process publisher of a local
  run counts as able.

Any ``down`` answers 503, otherwise 200; the body is ``{"status": …, "components": {name: {"status": …}}}``
and names no backend, key or endpoint. Neither endpoint is a usage event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from azure.core.exceptions import HttpResponseError, ResourceNotFoundError
from fastapi.responses import StreamingResponse

from gateway._exceptions import SettingsError
from gateway._responses import buffered
from gateway._runtime import GatewayRuntime
from usage import STORAGE_ERRORS, bounded
from usage._keys import PARTITION
from usage._tables import KEYS_TABLE

log = logging.getLogger(__name__)

State = Literal["ok", "degraded", "down"]
#: the longest any one readiness check may take; a check that takes longer is ``down``
CHECK_TIMEOUT_SECONDS = 2.0
_PROBE_ROW = "name-~readiness-probe"  # a key name can never have "~": the read always finds nothing
_HEADERS = {"content-type": "application/json", "cache-control": "no-store"}


def _answer(status: int, document: dict[str, Any]) -> StreamingResponse:
    return buffered(status, json.dumps(document).encode(), _HEADERS)


async def liveness() -> StreamingResponse:
    """200 ``{"status": "ok"}``: the worker runs and answers."""
    return _answer(200, {"status": "ok"})


def _worst(states: list[State]) -> State:
    return "down" if "down" in states else "degraded" if "degraded" in states else "ok"


async def _timed(check: Callable[[], Awaitable[dict[str, Any]]], bound: float) -> dict[str, Any]:
    try:
        async with asyncio.timeout(bound):
            return await check()
    except TimeoutError:
        return {"status": "down", "reason": f"no answer within {bound:g} s"}


async def _storage(runtime: GatewayRuntime, bound: float) -> dict[str, Any]:
    tables = runtime.tables
    if tables is None:
        return {"status": "down", "reason": "not started"}
    started = time.monotonic()
    try:
        await tables.get_table_client(KEYS_TABLE).get_entity(PARTITION, _PROBE_ROW, **bounded(bound))
    except ResourceNotFoundError:
        pass  # the service answered
    except HttpResponseError as exc:
        return {"status": "down", "reason": f"Table Storage answered {exc.status_code}"}
    except STORAGE_ERRORS as exc:
        return {"status": "down", "reason": type(exc).__name__}
    elapsed = time.monotonic() - started
    state: State = "degraded" if elapsed > bound / 2 else "ok"
    return {"status": state, "latency_ms": round(elapsed * 1000, 1)}


async def _publisher(runtime: GatewayRuntime) -> dict[str, Any]:
    publisher = runtime.publisher
    if publisher is None:
        return {"status": "down", "reason": "not started"}
    return await publisher.health()


async def readiness(runtime: GatewayRuntime, *, bound: float = CHECK_TIMEOUT_SECONDS) -> StreamingResponse:
    """200 when the gateway can serve (``ok`` or ``degraded``), 503 when a component is ``down``."""
    components: dict[str, dict[str, Any]] = {}
    try:
        await runtime.proxy()
    except SettingsError as exc:
        components["settings"] = {"status": "down", "reason": f"setting {exc.name} is missing or malformed"}
        components["storage"] = components["usage_publisher"] = {"status": "down", "reason": "not started"}
    else:
        components["settings"] = {"status": "ok"}
        storage, publisher = await asyncio.gather(_timed(lambda: _storage(runtime, bound), bound),
                                                  _timed(lambda: _publisher(runtime), bound))
        components["storage"], components["usage_publisher"] = storage, publisher
    state = _worst([c["status"] for c in components.values()])
    if state == "down":
        log.warning("readiness: %s", ", ".join(f"{name} {c['status']}" for name, c in components.items()))
    return _answer(503 if state == "down" else 200, {"status": state, "components": components})
