"""The request path: authenticate, validate, pick a backend, fail over, relay, record usage."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl, urlencode

import aiohttp
from fastapi import Request
from fastapi.responses import StreamingResponse

from gateway import _tokens
from gateway._auth import KeyCache, key_from_headers
from gateway._backends import BackendPool, cooldown_from_headers
from gateway._credentials import TokenProvider
from gateway._exceptions import (
    BadRequest,
    NoBackendAvailable,
    NotFound,
    PayloadTooLarge,
    RequestError,
    UpstreamFailed,
)
from gateway._quota import REMAINING_HEADER, QuotaGuard, Reservation
from gateway._records import Usage, UsageRecord, UsageSink, UsageSource
from gateway._responses import RelayResponse, buffered, error_response, relayed_headers
from gateway._settings import BackendConfig, Settings, is_deployment_name
from gateway._sse import StreamRelay

log = logging.getLogger(__name__)

OPERATIONS = ("chat/completions", "completions", "embeddings")
#: Client headers passed upstream (plus ``x-stainless-*``, the openai SDK's own); nothing else.
_FORWARDED = frozenset({
    "content-type", "accept", "user-agent", "x-ms-client-request-id", "x-ms-useragent", "openai-beta",
})
_VERSION = re.compile(r"(\d{4}-\d{2}-\d{2})(-preview)?")
_STREAM_CUT = (
    b'data: {"error":{"code":"BackendStreamInterrupted","message":'
    b'"The backend broke off the stream; the answer is incomplete."}}\n\n'
)
#: Above this many bytes an estimate is bytes / 4: tokenizing megabytes would stall the event loop.
_TOKENIZE_LIMIT = 256 * 1024
_KEY_PARAMS = frozenset({"api-key", "subscription-key", "subscription_key"})


def accepts_stream_options(api_version: str | None, *, v1: bool) -> bool:
    """Whether an api-version takes ``stream_options``: 2024-09-01-preview and later, and v1."""
    if v1:
        return True
    if not api_version:
        return False
    match = _VERSION.fullmatch(api_version.strip())
    if match is None:  # "preview", "latest" and other names newer than dated versions
        return api_version.strip().isalpha()
    return match.group(1) >= "2024-09-01"


@dataclass(slots=True)
class Call:
    """A validated client request."""

    operation: str
    v1: bool
    deployment: str
    body: dict[str, Any]
    raw: bytes
    stream: bool
    query: str
    api_version: str | None
    client_usage: bool  # the client asked for include_usage itself
    add_usage: bool  # the gateway asks for it on the client's behalf
    headers: dict[str, str] = field(default_factory=dict)
    reservation: Reservation | None = None  # the key's quota reservation, settled when usage is known
    response_headers: dict[str, str] = field(default_factory=dict)  # added to whatever is answered


@dataclass(slots=True)
class _Context:
    request_id: str
    started: float
    arrived: str
    key_name: str


@dataclass(slots=True)
class _Failure:
    """The last failed attempt: an upstream HTTP answer, or an exception."""

    backend: str
    status: int = 0
    body: bytes = b""
    timed_out: bool = False


class _IdleWatch:
    """Calls ``on_idle`` when ``last`` (set by the reader at each chunk) is ``idle`` seconds old.

    One timer per stream, moved only when it fires: far cheaper than a timeout around every read.
    """

    __slots__ = ("_handle", "_idle", "_on_idle", "fired", "last", "loop")

    def __init__(self, idle: float, on_idle: Callable[[], object]) -> None:
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self.fired = False
        self._idle = idle
        self._on_idle = on_idle
        self._handle = self.loop.call_at(self.last + idle, self._check)

    def _check(self) -> None:
        if self.loop.time() - self.last >= self._idle:
            self.fired = True
            self._on_idle()
        else:
            self._handle = self.loop.call_at(self.last + self._idle, self._check)

    def cancel(self) -> None:
        self._handle.cancel()


class Proxy:
    """Handles one AOAI call end to end; one instance per process."""

    def __init__(
        self,
        settings: Settings,
        *,
        session: aiohttp.ClientSession,
        keys: KeyCache,
        pool: BackendPool,
        tokens: TokenProvider | None,
        quota: QuotaGuard,
        sink: UsageSink,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self._settings = settings
        self._session = session
        self._keys = keys
        self._pool = pool
        self._tokens = tokens
        self._quota = quota
        self._sink = sink
        self._clock = clock
        self._wall_clock = wall_clock
        # sock_read would also bound the wait for headers: the idle limit is applied per read instead
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout, sock_read=None)
        self._no_stream_options: set[tuple[str, str | None]] = set()

    async def handle(self, request: Request, *, operation: str, v1: bool) -> StreamingResponse:
        """Answer ``request`` for ``operation`` on the classic (``v1=False``) or v1 path."""
        context = _Context(
            request_id=uuid.uuid4().hex,
            started=self._clock(),
            arrived=datetime.fromtimestamp(self._wall_clock(), UTC).isoformat(),
            key_name="",
        )
        call: Call | None = None
        try:
            key = await self._keys.authenticate(key_from_headers(request.headers))
            context.key_name = key.name
            call = await self._read_call(request, operation=operation, v1=v1)
            if key.limits.any:
                call.reservation = await self._quota.admit(key, estimate=self._reservation_estimate(call))
                call.response_headers[REMAINING_HEADER] = str(call.reservation.remaining)
            return await self._forward(call, context)
        except RequestError as exc:
            log.info("request %s refused: %s %s", context.request_id, exc.status, exc.code)
            error, outcome = exc, "refused"
        except Exception:  # a bug of ours: the client gets a plain 500, the log gets the traceback
            log.exception("request %s failed inside the gateway", context.request_id)
            error = RequestError("The gateway failed to handle the request; it has been logged.",
                                 status=500, code="InternalServerError")
            outcome = "gateway_error"
        if call is not None:  # settles any quota reservation too
            error.headers = {**call.response_headers, **error.headers}
            self._emit(call, context, "", model="", usage=None, source="none", status=error.status,
                       ended=self._clock(), first_byte=None, outcome=outcome)
        return error_response(error, request_id=context.request_id)

    # -- the client's request ------------------------------------------------------------

    async def _read_body(self, request: Request) -> bytes:
        limit = self._settings.max_request_bytes
        too_large = PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
        declared = request.headers.get("content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    raise too_large
            except ValueError:
                raise BadRequest("The Content-Length header is not a number.") from None
        parts: list[bytes] = []
        size = 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_large
            parts.append(part)
        return b"".join(parts)

    async def _read_call(self, request: Request, *, operation: str, v1: bool) -> Call:
        deployment = "" if v1 else request.path_params.get("deployment", "")
        if not v1 and not is_deployment_name(deployment):
            raise BadRequest(
                "The deployment name must be 1 to 64 letters, digits, '.', '_' or '-'.",
                code="InvalidDeploymentName",
            )
        raw = await self._read_body(request)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
            raise BadRequest("The request body is not valid JSON.", code="InvalidRequestBody") from None
        if not isinstance(body, dict):
            raise BadRequest("The request body must be a JSON object.", code="InvalidRequestBody")
        if v1:
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise BadRequest("The request body must name the deployment in 'model'.",
                                 code="MissingModel")
            if not is_deployment_name(model):
                raise BadRequest(
                    "The model (deployment) name must be 1 to 64 letters, digits, '.', '_' or '-'.",
                    code="InvalidDeploymentName",
                )
            deployment = model
        query = request.url.query
        if "key" in query.lower():
            query = urlencode([(k, v) for k, v in parse_qsl(query, keep_blank_values=True)
                               if k.lower() not in _KEY_PARAMS])
        api_version = request.query_params.get("api-version")
        stream = body.get("stream") is True and operation != "embeddings"
        options = body.get("stream_options")
        client_usage = isinstance(options, dict) and options.get("include_usage") is True
        headers = {
            name: value for name, value in request.headers.items()
            if name in _FORWARDED or name.startswith("x-stainless-")
        }
        return Call(
            operation=operation, v1=v1, deployment=deployment, body=body, raw=raw, stream=stream,
            query=query, api_version=api_version, client_usage=client_usage,
            add_usage=stream and not client_usage and accepts_stream_options(api_version, v1=v1),
            headers=headers,
        )

    def _reservation_estimate(self, call: Call) -> int:
        """What a request may use: its prompt estimate plus its completion cap, as AOAI's limiter counts."""
        prompt = self._prompt_estimate(call, call.deployment)
        cap = call.body.get("max_completion_tokens", call.body.get("max_tokens"))
        choices = call.body.get("n")
        if not isinstance(cap, int) or isinstance(cap, bool) or cap < 0:
            cap = 0
        if not isinstance(choices, int) or isinstance(choices, bool) or choices < 1:
            choices = 1
        return prompt + cap * choices

    # -- upstream --------------------------------------------------------------------------

    def _body_for(self, call: Call, backend: BackendConfig, *, with_usage: bool) -> bytes:
        name = backend.upstream_deployment(call.deployment)
        rename = call.v1 and name != call.body.get("model")
        if not rename and not with_usage:
            return call.raw
        if not rename and "stream_options" not in call.body:
            start = call.raw.index(b"{") + 1  # the body is a non-empty object: "stream" is in it
            return call.raw[:start] + b'"stream_options":{"include_usage":true},' + call.raw[start:]
        body = dict(call.body)
        if rename:
            body["model"] = name
        if with_usage:
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return json.dumps(body).encode()  # ASCII escapes: safe for lone surrogates the client sent

    def _url_for(self, call: Call, backend: BackendConfig) -> str:
        if call.v1:
            path = f"/openai/v1/{call.operation}"
        else:
            path = f"/openai/deployments/{backend.upstream_deployment(call.deployment)}/{call.operation}"
        return backend.endpoint + path + ("?" + call.query if call.query else "")

    async def _send(
        self, call: Call, backend: BackendConfig, *, with_usage: bool, deadline: float
    ) -> aiohttp.ClientResponse:
        headers = dict(call.headers)
        headers["accept-encoding"] = "identity"
        if backend.api_key is not None:
            headers["api-key"] = backend.api_key
        elif self._tokens is not None:
            headers["authorization"] = await self._tokens.authorization()
        wait = min(self._settings.response_timeout, deadline - self._clock())
        if wait <= 0:
            raise TimeoutError
        async with asyncio.timeout(wait):
            return await self._session.post(
                self._url_for(call, backend),
                data=self._body_for(call, backend, with_usage=with_usage),
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            )

    async def _forward(self, call: Call, context: _Context) -> StreamingResponse:
        if not self._pool.serving(call.deployment):
            raise NotFound(
                "The API deployment for this resource does not exist.", code="DeploymentNotFound"
            )
        deadline = context.started + self._settings.request_deadline
        tried: set[str] = set()
        failure: _Failure | None = None
        for _ in range(self._settings.max_attempts):
            backend = self._pool.choose(call.deployment, exclude=tried)
            if backend is None or self._clock() >= deadline:
                break
            tried.add(backend.name)
            with_usage = call.add_usage and (backend.name, call.api_version) not in self._no_stream_options
            try:
                upstream = await self._send(call, backend, with_usage=with_usage, deadline=deadline)
                if upstream.status == 400 and with_usage:
                    body = await upstream.read()
                    upstream.release()
                    if b"stream_options" not in body:
                        return self._passthrough(call, context, backend, upstream, body)
                    log.warning("backend %s refuses stream_options on api-version %s; usage will be estimated",
                                backend.name, call.api_version)
                    self._no_stream_options.add((backend.name, call.api_version))
                    with_usage = False
                    upstream = await self._send(call, backend, with_usage=False, deadline=deadline)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                timed_out = isinstance(exc, TimeoutError)
                log.warning("backend %s failed (%s); failing over", backend.name,
                            "time-out" if timed_out else type(exc).__name__)
                self._pool.cool(backend, call.deployment, self._settings.failure_cooldown, throttled=False)
                failure = _Failure(backend.name, timed_out=timed_out)
                continue
            if upstream.status == 429 or upstream.status >= 500:
                failure = await self._failed(call, backend, upstream)
                continue
            return await self._respond(call, context, backend, upstream, with_usage=with_usage)
        raise self._exhausted(call, failure)

    async def _failed(self, call: Call, backend: BackendConfig, upstream: aiohttp.ClientResponse) -> _Failure:
        throttled = upstream.status == 429
        if throttled:
            seconds = cooldown_from_headers(upstream.headers, now=self._wall_clock(),
                                            default=self._settings.default_cooldown)
        else:
            seconds = self._settings.failure_cooldown
        log.warning("backend %s answered %s; cooling %.3fs, failing over", backend.name, upstream.status, seconds)
        self._pool.cool(backend, call.deployment, seconds, throttled=throttled)
        try:
            body = await upstream.read()
        except (aiohttp.ClientError, TimeoutError):
            body = b""
        finally:
            upstream.release()
        return _Failure(backend.name, status=upstream.status, body=body)

    def _exhausted(self, call: Call, failure: _Failure | None) -> RequestError:
        wait, throttled = self._pool.recovery(call.deployment)
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
            return UpstreamFailed(f"Every backend serving '{call.deployment}' timed out.",
                                  status=504, code="GatewayTimeout")
        return UpstreamFailed(f"No backend serving '{call.deployment}' could be reached.")

    # -- the answer ------------------------------------------------------------------------

    def _passthrough(
        self, call: Call, context: _Context, backend: BackendConfig,
        upstream: aiohttp.ClientResponse, body: bytes,
    ) -> StreamingResponse:
        usage: Usage | None = None
        model = ""
        if upstream.status == 200:
            try:
                document = json.loads(body)
            except ValueError:
                document = None
            if isinstance(document, dict):
                usage = Usage.from_body(document.get("usage"))
                found = document.get("model")
                model = found if isinstance(found, str) else ""
        source: UsageSource = "reported"
        if usage is None:
            source = "none"
            if upstream.status == 200:
                usage, source = self._estimate(call, model, ""), "estimated"
        now = self._clock()
        self._emit(call, context, backend.name, model=model, usage=usage, source=source,
                   status=upstream.status, ended=now, first_byte=now, outcome="complete")
        headers = relayed_headers(upstream.headers.items(), backend=backend.name, request_id=context.request_id)
        headers.update(call.response_headers)
        return buffered(upstream.status, body, headers)

    async def _respond(
        self, call: Call, context: _Context, backend: BackendConfig,
        upstream: aiohttp.ClientResponse, *, with_usage: bool,
    ) -> StreamingResponse:
        if call.stream and upstream.status == 200 and upstream.content_type == "text/event-stream":
            relay = StreamRelay(strip_usage=with_usage and not call.client_usage)
            headers = relayed_headers(upstream.headers.items(), backend=backend.name,
                                      request_id=context.request_id)
            headers.update(call.response_headers)
            return RelayResponse(self._relay(call, context, backend, upstream, relay), headers=headers)
        try:
            async with asyncio.timeout(self._settings.stream_idle_timeout):
                body = await upstream.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamFailed(f"Backend '{backend.name}' broke off its answer.") from exc
        finally:
            upstream.release()
        return self._passthrough(call, context, backend, upstream, body)

    async def _relay(
        self, call: Call, context: _Context, backend: BackendConfig,
        upstream: aiohttp.ClientResponse, relay: StreamRelay,
    ) -> AsyncIterator[bytes]:
        first_byte: float | None = None
        outcome = "client_disconnected"
        watch = _IdleWatch(self._settings.stream_idle_timeout, upstream.close)
        try:
            read = upstream.content.readany
            while chunk := await read():
                watch.last = watch.loop.time()
                out = relay.feed(chunk)
                if out:
                    if first_byte is None:
                        first_byte = self._clock()
                    yield out
            if watch.fired:
                raise TimeoutError("stream idle")
            tail = relay.finish()
            if tail:
                yield tail
            outcome = "complete"
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = "upstream_cut"
            log.warning("stream from backend %s broke off: %s", backend.name, type(exc).__name__)
            # a partial frame is dropped; the client is told in the stream, as AOAI reports errors
            yield _STREAM_CUT
        finally:
            watch.cancel()
            upstream.close()
            usage = relay.usage
            source: UsageSource = "reported"
            if usage is None:
                usage, source = self._estimate(call, relay.model, relay.completion_text()), "estimated"
            self._emit(call, context, backend.name, model=relay.model, usage=usage, source=source,
                       status=200, ended=self._clock(), first_byte=first_byte, outcome=outcome)

    # -- usage ------------------------------------------------------------------------------

    @staticmethod
    def _prompt_estimate(call: Call, model: str) -> int:
        """tiktoken's count of the prompt; for bodies too big to tokenize on the loop, bytes / 4."""
        if len(call.raw) > _TOKENIZE_LIMIT:
            return len(call.raw) // 4
        try:
            return _tokens.prompt_tokens(call.body, call.operation, model)
        except (OSError, ValueError) as exc:
            log.warning("prompt estimate failed (%s); using bytes / 4", exc)
            return len(call.raw) // 4

    def _estimate(self, call: Call, model: str, completion: str) -> Usage:
        name = model or call.deployment
        prompt = self._prompt_estimate(call, name)
        if len(completion) > _TOKENIZE_LIMIT:
            generated = len(completion.encode()) // 4
        else:
            try:
                generated = _tokens.count(completion, name)
            except (OSError, ValueError) as exc:
                log.warning("completion estimate failed (%s); using bytes / 4", exc)
                generated = len(completion.encode()) // 4
        return Usage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated)

    def _emit(
        self, call: Call, context: _Context, backend: str, *, model: str, usage: Usage | None,
        source: UsageSource, status: int, ended: float, first_byte: float | None, outcome: str,
    ) -> None:
        usage = usage or Usage()
        if call.reservation is not None:
            call.reservation.settle(usage.total_tokens, until=ended + self._quota.settle_seconds)
        record = UsageRecord(
            request_id=context.request_id, time=context.arrived, key_name=context.key_name,
            deployment=call.deployment, model=model, backend=backend, operation=call.operation,
            streaming=call.stream, prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, total_tokens=usage.total_tokens,
            cached_tokens=usage.cached_tokens, reasoning_tokens=usage.reasoning_tokens,
            usage_source=source, status=status,
            latency_ms=round((ended - context.started) * 1000, 3),
            ttfb_ms=None if first_byte is None else round((first_byte - context.started) * 1000, 3),
            outcome=outcome,
        )
        self._sink.emit(record)


def _error_of(body: bytes) -> tuple[str, str] | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    error = document.get("error") if isinstance(document, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error.get("code") or "BackendError"), error["message"]
    return None
