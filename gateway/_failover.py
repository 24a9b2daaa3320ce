"""The failover loop: send a call to one backend after another until one gives an answer to pass on.

Each attempt waits for response headers as long as the most specific setting says (the
deployment's ``response_timeout_seconds`` on that backend, else the backend's, else
``RESPONSE_TIMEOUT_SECONDS``), and never past the request's deadline. 429, 5xx, refused
connections and time-outs cool the backend and move on; anything else is the answer.

A call pinned to one backend (it needs a stored response that lives there) never moves on: when
that backend is cooling or throttles, the call gets 429 with its ``Retry-After``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from gateway._backends import BackendPool, cooldown_from_headers
from gateway._credentials import TokenProvider
from gateway._exceptions import NoBackendAvailable, RequestError, UpstreamFailed, UpstreamTimedOut
from gateway._request import Call, body_for, url_for
from gateway._settings import BackendConfig, Settings
from gateway._telemetry import Telemetry
from gateway._timing import Timer

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Failure:
    """The last failed attempt: an upstream HTTP answer, or an exception."""

    backend: str
    status: int = 0
    body: bytes = b""
    timed_out: bool = False


@dataclass(slots=True)
class Answer:
    """A backend's answer to pass on: its response, and its body when already read."""

    backend: BackendConfig
    upstream: aiohttp.ClientResponse
    with_usage: bool  # the gateway asked this backend for stream_options.include_usage
    body: bytes | None = None


class Failover:
    """Sends calls to backends in turn; one instance per process."""

    def __init__(
        self,
        settings: Settings,
        *,
        session: aiohttp.ClientSession,
        pool: BackendPool,
        tokens: TokenProvider | None,
        timer: Timer,
        wall_clock: Callable[[], float],
        telemetry: Telemetry | None = None,
    ) -> None:
        self._settings = settings
        self._telemetry = telemetry or Telemetry.off()
        self._session = session
        self._pool = pool
        self._tokens = tokens
        self._timer = timer
        self._wall_clock = wall_clock
        # sock_read would also bound the wait for headers: the idle limit is applied per read instead
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout, sock_read=None)
        #: (backend, deployment, api-version) that refused stream_options: one deployment's refusal says
        #: nothing about the backend's other deployments
        self._no_stream_options: set[tuple[str, str, str | None]] = set()

    async def _attempt(
        self, call: Call, backend: BackendConfig, *, with_usage: bool, deadline: float
    ) -> aiohttp.ClientResponse:
        headers = dict(call.headers)
        headers["accept-encoding"] = "identity"
        if backend.api_key is not None:
            headers["api-key"] = backend.api_key
        elif self._tokens is not None:
            headers["authorization"] = await self._tokens.authorization()
        wait = backend.response_timeout_for(call.deployment, default=self._settings.response_timeout)
        with self._telemetry.attempt(backend, headers) as attempt:  # a child span; traceparent into headers
            async with self._timer.deadline(min(self._timer.clock() + wait, deadline)):
                upstream = await self._session.request(
                    call.endpoint.method,
                    url_for(call, backend),
                    data=body_for(call, backend, with_usage=with_usage) if call.endpoint.method == "POST" else None,
                    headers=headers,
                    timeout=self._timeout,
                    allow_redirects=False,
                )
            attempt.answered(upstream.status)
            return upstream

    async def send(self, call: Call, *, deadline: float) -> Answer:
        """The first answer worth passing on, or the ``RequestError`` that says why there is none."""
        tried: set[str] = set()
        failure: _Failure | None = None
        for _ in range(1 if call.pinned is not None else self._settings.max_attempts):
            backend = self._pool.choose(call.deployment, exclude=tried, only=call.pinned)
            if backend is None or self._timer.clock() >= deadline:
                break
            tried.add(backend.name)
            refused = (backend.name, call.deployment, call.api_version)
            with_usage = call.add_usage and refused not in self._no_stream_options
            try:
                upstream = await self._attempt(call, backend, with_usage=with_usage, deadline=deadline)
                if upstream.status == 400 and with_usage:
                    body = await upstream.read()
                    upstream.release()
                    if b"stream_options" not in body:
                        return Answer(backend, upstream, with_usage, body)
                    log.warning("backend %s refuses stream_options for %s on api-version %s; usage will be estimated",
                                backend.name, call.deployment, call.api_version)
                    self._no_stream_options.add(refused)
                    with_usage = False
                    upstream = await self._attempt(call, backend, with_usage=False, deadline=deadline)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                timed_out = isinstance(exc, TimeoutError)
                failure = _Failure(backend.name, timed_out=timed_out)
                if timed_out and self._timer.clock() >= deadline:
                    # the deadline, not the backend's own time-out, ended the wait: no reason to cool it
                    log.warning("request deadline passed waiting for backend %s", backend.name)
                    break
                log.warning("backend %s failed (%s); failing over", backend.name,
                            "time-out" if timed_out else type(exc).__name__)
                self._pool.cool(backend, call.deployment, self._settings.failure_cooldown, throttled=False)
                continue
            if upstream.status == 429 or upstream.status >= 500:
                failure = await self._failed(call, backend, upstream)
                continue
            return Answer(backend, upstream, with_usage)
        raise self._exhausted(call, failure, deadline_passed=self._timer.clock() >= deadline)

    async def _failed(self, call: Call, backend: BackendConfig, upstream: aiohttp.ClientResponse) -> _Failure:
        throttled = upstream.status == 429
        if throttled:
            seconds = cooldown_from_headers(upstream.headers, now=self._wall_clock(),
                                            default=self._settings.default_cooldown)
        else:
            seconds = self._settings.failure_cooldown
        log.warning("backend %s answered %s; cooling %.3fs, failing over", backend.name, upstream.status, seconds)
        self._pool.cool(backend, call.deployment, seconds, throttled=throttled)
        try:  # the error body names the problem; a backend that stalls on it is not waited for
            async with self._timer.deadline(self._timer.clock() + self._settings.stream_idle_timeout):
                body = await upstream.read()
        except (aiohttp.ClientError, TimeoutError):
            body = b""
        finally:
            upstream.release()
        return _Failure(backend.name, status=upstream.status, body=body)

    def _exhausted(self, call: Call, failure: _Failure | None, *, deadline_passed: bool) -> RequestError:
        if deadline_passed and (failure is None or failure.timed_out):
            return UpstreamTimedOut(
                f"No backend serving '{call.deployment}' answered within the request deadline "
                f"({self._settings.request_deadline:g} seconds).")
        wait, throttled = self._pool.recovery(call.deployment, only=call.pinned)
        if call.pinned is not None and (failure is None or failure.status == 429):
            # cooling or throttling, the one backend holding the response cannot take it now: 429, never another
            held = call.response_id or call.body.get("previous_response_id")
            return NoBackendAvailable(
                f"Backend '{call.pinned}', which holds response '{held}', is busy and no other backend has it. "
                f"Please retry after {max(1, round(wait))} second(s).",
                retry_after=wait if wait > 0 else self._settings.default_cooldown, throttled=True)
        if failure is None or failure.status == 429:
            # nothing could be tried (all cooling), or the last backend tried throttled us too
            return NoBackendAvailable(
                f"Every backend serving '{call.deployment}' is busy. Please retry after "
                f"{max(1, round(wait))} second(s).",
                retry_after=wait if wait > 0 else self._settings.default_cooldown,
                throttled=throttled or failure is not None,
            )
        if failure.status >= 500:
            code, message = _error_of(failure.body) or (
                "BackendError", f"The backend answered {failure.status}.")
            return RequestError(
                message, status=failure.status, code=code,
                headers={"retry-after": str(max(1, round(wait or self._settings.failure_cooldown)))},
            )
        if failure.timed_out:
            return UpstreamTimedOut(f"Every backend serving '{call.deployment}' timed out.")
        return UpstreamFailed(f"No backend serving '{call.deployment}' could be reached.")


def _error_of(body: bytes) -> tuple[str, str] | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    error = document.get("error") if isinstance(document, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error.get("code") or "BackendError"), error["message"]
    return None
