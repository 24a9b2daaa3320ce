"""The request path: authenticate, admit, forward (``_failover``), relay, record usage (read: ``_request``)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
from fastapi import Request
from fastapi.responses import StreamingResponse

from gateway import _tokens
from gateway._affinity import AffinityMap
from gateway._auth import KeyCache, check_scope, key_from_headers
from gateway._backends import BackendPool
from gateway._contentlog import ContentLog
from gateway._credentials import TokenProvider
from gateway._endpoints import Endpoint
from gateway._exceptions import NotFound, RequestError, UpstreamFailed, UpstreamTimedOut
from gateway._failover import Failover
from gateway._quota import QUOTA_HEADERS, QuotaGuard
from gateway._records import Usage, UsageRecord, UsageSink, UsageSource
from gateway._request import Call, completion_reservation, path_deployment, read_call
from gateway._responses import REQUEST_ID_HEADER, RelayResponse, buffered, error_response, relayed_headers
from gateway._responses_api import ResponsesRelay, StoredResponses, stored_response, stream_cut_event
from gateway._settings import BackendConfig, Settings, is_deployment_name
from gateway._sse import StreamRelay
from gateway._telemetry import Span, Telemetry
from gateway._timing import Timer
from usage import KeyRecord

log = logging.getLogger(__name__)

_STREAM_CUT = (
    b'data: {"error":{"code":"BackendStreamInterrupted","message":'
    b'"The backend broke off the stream; the answer is incomplete."}}\n\n'
)
#: Above this many bytes an estimate is bytes / 4: tokenizing megabytes would stall the event loop.
_TOKENIZE_LIMIT = 256 * 1024


@dataclass(slots=True)
class _Context:
    request_id: str
    started: float
    arrived: str
    key_name: str
    operation: str
    deployment: str  # as far as known: "-" until the request names a plain one
    received: list[bytes] | None = None  # what the client was sent, kept when its key logs content
    upstream: tuple[BackendConfig, bool] | None = None  # the backend that answered, asked for usage or not
    span: Span | None = None


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
        timer: Timer,
        wall_clock: Callable[[], float],
        affinity: AffinityMap,
        content: ContentLog | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self._settings = settings
        self._content = content
        self._telemetry = telemetry or Telemetry.off()
        self._keys = keys
        self._pool = pool
        self._quota = quota
        self._sink = sink
        self._timer = timer
        self._clock = timer.clock
        self._wall_clock = wall_clock
        self._failover = Failover(settings, session=session, pool=pool, tokens=tokens, timer=timer,
                                  wall_clock=wall_clock, telemetry=self._telemetry)
        self._stored = StoredResponses(settings, affinity=affinity, failover=self._failover, pool=pool, sink=sink,
                                       timer=timer, wall_clock=wall_clock)

    def _context(self, request: Request, operation: str) -> _Context:
        return _Context(
            request_id=uuid.uuid4().hex,
            started=self._clock(),
            arrived=datetime.fromtimestamp(self._wall_clock(), UTC).isoformat(),
            key_name="",
            operation=operation,
            deployment=path_deployment(request) or "-",
            span=self._telemetry.start_request(request.headers, operation),
        )

    async def handle(self, request: Request, *, endpoint: Endpoint) -> StreamingResponse:
        """Answer ``request``, a call of kind ``endpoint``."""
        context = self._context(request, endpoint.operation)
        call: Call | None = None
        key: KeyRecord | None = None
        try:
            key = await self._keys.authenticate(key_from_headers(request.headers))
            context.key_name = key.name
            if key.log_content and self._content is not None:
                context.received = []
            call = await read_call(request, self._settings, self._timer, endpoint=endpoint)
            context.deployment = call.deployment if is_deployment_name(call.deployment) else "-"
            deadline = context.started + self._settings.request_deadline
            if not endpoint.stored:  # the key's scope, before anything goes upstream
                check_scope(key, call.deployment)
            if endpoint.operation.startswith("responses"):
                await self._stored.pin(call, key_name=key.name, deadline=deadline)
                context.deployment = call.deployment if is_deployment_name(call.deployment) else "-"
                if endpoint.stored:  # by the deployment that made the response
                    check_scope(key, call.deployment, response_id=call.response_id)
            if key.limits.any and not endpoint.stored:
                estimate = self._reservation_estimate(call)
                cost = self._reservation_cost(call, estimate) if key.limits.budget_nano_per_month is not None else 0
                call.reservation = await self._quota.admit(
                    key, estimate=estimate, cost_nano=cost, arrived=datetime.fromisoformat(context.arrived).timestamp())
                call.response_headers.update(call.reservation.headers())
            elif key.limits.any:  # a call on a stored response uses no quota, but says what is left
                call.response_headers.update(self._quota.remaining_headers(key))
            with self._telemetry.current(context.span):
                return await self._forward(call, context, deadline=deadline)
        except RequestError as exc:
            log.info("request %s refused: %s %s", context.request_id, exc.status, exc.code)
            self._telemetry.refused(context.span, exc)
            error, outcome = exc, "refused"
        except Exception:  # a bug of ours: the client gets a plain 500, the log gets the traceback
            log.exception("request %s failed inside the gateway", context.request_id)
            error = RequestError("The gateway failed to handle the request; it has been logged.",
                                 status=500, code="InternalServerError")
            outcome = "gateway_error"
        if context.key_name:  # every authenticated request is counted, refused ones with 0 tokens
            if key is not None and key.limits.any and not (call and call.response_headers.keys() & QUOTA_HEADERS):
                # refused before (or by) admission: the key's remaining figures as this instance knows them
                error.headers = {**self._quota.remaining_headers(key), **error.headers}
            if call is not None:
                error.headers = {**call.response_headers, **error.headers}
            self._emit(context, call, "", model="", usage=None, source="none", status=error.status,
                       ended=self._clock(), first_byte=None, outcome=outcome)
        else:
            self._telemetry.end_request(context.span, error.status)
        return error_response(error, request_id=context.request_id)

    async def models(self, request: Request) -> StreamingResponse:
        """``GET /openai/v1/models``: the deployment names the backends list, in OpenAI's list shape."""
        context = self._context(request, "models")
        try:
            key = await self._keys.authenticate(key_from_headers(request.headers))
        except RequestError as exc:
            return error_response(exc, request_id=context.request_id)
        context.key_name = key.name
        names = sorted({name for b in self._settings.backends if b.deployments is not None
                        for name in b.deployments if key.allows(name)})
        body = json.dumps({"object": "list", "data": [
            {"id": name, "object": "model", "created": 0, "owned_by": "system"} for name in names]}).encode()
        now = self._clock()
        self._emit(context, None, "", model="", usage=None, source="none", status=200, ended=now, first_byte=now,
                   outcome="complete")
        headers = {"content-type": "application/json", REQUEST_ID_HEADER: context.request_id}
        if key.limits.any:
            headers.update(self._quota.remaining_headers(key))
        return buffered(200, body, headers)

    def _reservation_estimate(self, call: Call) -> int:
        """What a request may use: its prompt estimate plus its completion cap, as AOAI's limiter counts."""
        return self._prompt_estimate(call, call.deployment) + completion_reservation(call.body)

    def _reservation_cost(self, call: Call, estimate: int) -> int:
        """A reservation's price for a money budget: every token at the deployment's output rate (0 unpriced)."""
        price = self._settings.prices.lookup(call.deployment, None, datetime.fromtimestamp(self._wall_clock(), UTC))
        return 0 if price is None else estimate * price.output

    def _settled_cost(self, context: _Context, backend: str, usage: Usage) -> int:
        """What the request cost, as the aggregator prices it (0 when no price is in force)."""
        arrived = datetime.fromisoformat(context.arrived)
        price = self._settings.prices.lookup(context.deployment, backend or None, arrived)
        if price is None:
            return 0
        return price.cost_nano(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)

    # -- upstream --------------------------------------------------------------------------

    async def _forward(self, call: Call, context: _Context, *, deadline: float) -> StreamingResponse:
        if call.pinned is None and not self._pool.serving(call.deployment):
            raise NotFound(
                "The API deployment for this resource does not exist.", code="DeploymentNotFound"
            )
        answer = await self._failover.send(call, deadline=deadline)
        context.upstream = (answer.backend, answer.with_usage)
        if answer.body is not None:
            return await self._passthrough(call, context, answer.backend, answer.upstream, answer.body)
        return await self._respond(call, context, answer.backend, answer.upstream,
                                   with_usage=answer.with_usage, deadline=deadline)

    # -- the answer ------------------------------------------------------------------------

    async def _passthrough(
        self, call: Call, context: _Context, backend: BackendConfig,
        upstream: aiohttp.ClientResponse, body: bytes,
    ) -> StreamingResponse:
        usage: Usage | None = None
        model = ""
        if context.received is not None:
            context.received.append(body)
        ours = True  # this call's event carries its usage (estimated when the answer has none)
        document = _json_object(body) if upstream.status == 200 else None
        if document is not None:
            found = document.get("model")
            model = found if isinstance(found, str) else ""
            if call.operation.startswith("responses"):
                response = stored_response(document)
                await self._stored.record(call, backend, response, key_name=context.key_name)
                usage, ours = self._stored.answered(call, backend, response, key_name=context.key_name)
            else:
                usage = Usage.from_body(document.get("usage"))
        source: UsageSource = "reported"
        if usage is None:
            source = "none"
            if upstream.status == 200 and ours and call.endpoint.estimated:
                usage, source = self._estimate(call, model, ""), "estimated"
        now = self._clock()
        self._emit(context, call, backend.name, model=model, usage=usage, source=source,
                   status=upstream.status, ended=now, first_byte=now, outcome="complete")
        headers = relayed_headers(upstream.headers.items(), backend=backend.name, request_id=context.request_id)
        headers.update(call.response_headers)
        return buffered(upstream.status, body, headers)

    async def _respond(
        self, call: Call, context: _Context, backend: BackendConfig,
        upstream: aiohttp.ClientResponse, *, with_usage: bool, deadline: float,
    ) -> StreamingResponse:
        if upstream.status == 200 and upstream.content_type == "text/event-stream":
            headers = relayed_headers(upstream.headers.items(), backend=backend.name,
                                      request_id=context.request_id)
            headers.update(call.response_headers)
            relay: StreamRelay | ResponsesRelay
            if call.operation.startswith("responses"):
                relay = ResponsesRelay()
            else:
                relay = StreamRelay(strip_usage=with_usage and not call.client_usage)
            return RelayResponse(self._relay(call, context, backend, upstream, relay), headers=headers)
        body = await self._read_answer(backend, upstream, deadline=deadline)
        return await self._passthrough(call, context, backend, upstream, body)

    async def _read_answer(self, backend: BackendConfig, upstream: aiohttp.ClientResponse, *,
                           deadline: float) -> bytes:
        """A whole upstream body, within the idle limit and (since the client is still waiting for
        headers, which follow it) the request deadline."""
        watch = self._timer.watch(self._settings.stream_idle_timeout, upstream.close, deadline=deadline)
        parts: list[bytes] = []
        try:
            read = upstream.content.readany
            while chunk := await read():
                watch.touch()
                parts.append(chunk)
            if watch.fired:
                raise TimeoutError("answer idle")
        except (aiohttp.ClientError, TimeoutError) as exc:
            if watch.fired and self._clock() >= deadline:
                raise UpstreamTimedOut(
                    f"Backend '{backend.name}' did not finish its answer within the request deadline "
                    f"({self._settings.request_deadline:g} seconds).") from exc
            raise UpstreamFailed(f"Backend '{backend.name}' broke off its answer.") from exc
        finally:
            watch.cancel()
            upstream.release()
        return b"".join(parts)

    async def _relay(
        self, call: Call, context: _Context, backend: BackendConfig,
        upstream: aiohttp.ClientResponse, relay: StreamRelay | ResponsesRelay,
    ) -> AsyncIterator[bytes]:
        responses = relay if isinstance(relay, ResponsesRelay) else None
        first_byte: float | None = None
        outcome = "client_disconnected"
        watch = self._timer.watch(self._settings.stream_idle_timeout, upstream.close)
        try:
            read = upstream.content.readany
            while chunk := await read():
                watch.touch()
                out = relay.feed(chunk)
                if out:
                    if responses is not None and not responses.recorded and responses.first is not None:
                        # where the response lives is recorded before its id reaches the client
                        responses.recorded = True
                        await self._stored.record(call, backend, responses.first, key_name=context.key_name)
                    if first_byte is None:
                        first_byte = self._clock()
                    yield out
                    if context.received is not None:
                        context.received.append(out)
            if watch.fired:
                raise TimeoutError("stream idle")
            tail = relay.finish()
            if tail:
                yield tail
                if context.received is not None:
                    context.received.append(tail)
            outcome = "complete"
        except (aiohttp.ClientError, TimeoutError) as exc:
            outcome = "upstream_cut"
            log.warning("stream from backend %s broke off: %s", backend.name, type(exc).__name__)
            # a partial frame is dropped; the client is told in the stream, as AOAI reports errors
            yield _STREAM_CUT if responses is None else stream_cut_event(responses.sequence)
        finally:
            watch.cancel()
            upstream.close()
            if isinstance(relay, StreamRelay):
                usage, ours = relay.usage, call.endpoint.estimated
            else:
                usage, ours = self._stored.answered(call, backend, relay.response, key_name=context.key_name)
            source: UsageSource = "reported"
            if usage is None:
                source = "none"
                if ours:
                    usage, source = self._estimate(call, relay.model, relay.completion_text()), "estimated"
            self._emit(context, call, backend.name, model=relay.model, usage=usage, source=source,
                       status=200, ended=self._clock(), first_byte=first_byte, outcome=outcome)

    # -- usage ------------------------------------------------------------------------------

    @staticmethod
    def _prompt_estimate(call: Call, model: str) -> int:
        """tiktoken's count of the prompt; for bodies too big to tokenize on the loop, bytes / 4."""
        if call.form is not None or call.endpoint.stored:  # audio, or no prompt at all
            return 0
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
        self, context: _Context, call: Call | None, backend: str, *, model: str, usage: Usage | None,
        source: UsageSource, status: int, ended: float, first_byte: float | None, outcome: str,
    ) -> None:
        usage = usage or Usage()
        if call is not None and call.reservation is not None:
            cost = self._settled_cost(context, backend, usage) if call.reservation.priced else 0
            self._quota.settle(call.reservation, tokens=usage.total_tokens, cost_nano=cost)
        record = UsageRecord(
            request_id=context.request_id, time=context.arrived, key_name=context.key_name,
            deployment=context.deployment, model=model, backend=backend, operation=context.operation,
            streaming=call is not None and call.stream, prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens, total_tokens=usage.total_tokens,
            cached_tokens=usage.cached_tokens, reasoning_tokens=usage.reasoning_tokens,
            usage_source=source, status=status,
            latency_ms=round((ended - context.started) * 1000, 3),
            ttfb_ms=None if first_byte is None else round((first_byte - context.started) * 1000, 3),
            outcome=outcome,
        )
        self._sink.emit(record)
        if context.received is not None and self._content is not None and call is not None:
            backend_config, with_usage = context.upstream or (None, False)
            self._content.record(record, call, context.received, backend=backend_config, with_usage=with_usage)
        self._telemetry.record(context.span, record)


def _json_object(body: bytes) -> dict[str, Any] | None:
    try:
        document = json.loads(body)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None
