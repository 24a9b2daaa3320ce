"""The Responses API: its streams, its usage, and the stored responses that live in one backend each.

Streams are SSE frames ``event: <type>`` / ``data: {...}`` ending with ``response.completed``,
``response.incomplete`` or ``response.failed`` (no ``[DONE]``). The relay passes them on byte for
byte and parses only the few frames that carry the whole response object: the first
(``response.created``, whose id is recorded before the client sees it) and the terminal one (the
usage). Output text for estimates is taken from the ``delta`` strings alone, since the ``…done``
events and the terminal event repeat it.

Usage: a response made in the foreground is counted by the call that made it (the terminal event or
the body; estimated when a stream ends without one). A ``background: true`` response answers
``queued`` without usage; the first call through the gateway that sees it finished (a poll, a
resumed stream, a cancel, or the creating stream itself if it lasted) emits one more usage event
whose id is derived from the response id, so however many calls and instances see it, the
aggregator's ledger counts it once. That event belongs to the key and deployment that made the
response, at the time it was created.
"""

from __future__ import annotations

import json
import logging
import re
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp

from gateway._affinity import Affinity, AffinityMap
from gateway._backends import BackendPool
from gateway._endpoints import endpoint
from gateway._exceptions import NoBackendAvailable, NotFound, RequestError, UpstreamFailed
from gateway._failover import Failover
from gateway._records import Usage, UsageRecord, UsageSink
from gateway._request import RESPONSE_ID, Call
from gateway._settings import BackendConfig, Settings, is_deployment_name
from gateway._sse import FrameRelay
from gateway._timing import Timer

log = logging.getLogger(__name__)

TERMINAL = frozenset({"completed", "incomplete", "failed", "cancelled"})
#: Namespace of the usage event ids derived from response ids (uuid5: the same id everywhere).
BACKGROUND_EVENTS = uuid.UUID("5d7c2a8e-1f0b-4c55-9a53-6f1e2b7d9c41")
#: Background responses whose usage this process has already emitted (the ledger makes a repeat harmless).
_COUNTED_KEPT = 10_000


def background_event_id(response_id: str) -> str:
    """The usage event id of a background response's usage: the same in every instance, at every poll."""
    return uuid.uuid5(BACKGROUND_EVENTS, response_id).hex


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """What a Responses API response object says about itself."""

    id: str
    status: str
    background: bool
    created_at: float | None
    model: str
    usage: Usage | None
    store: bool = True  # kept by the backend (``store: false`` responses cannot be named later)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


def stored_response(document: Any) -> StoredResponse | None:
    """The response object in ``document`` (a body, or an event's ``response``); ``None`` if it is none."""
    if not isinstance(document, dict) or document.get("object") != "response":
        return None
    response_id = document.get("id")
    if not isinstance(response_id, str) or RESPONSE_ID.fullmatch(response_id) is None:
        return None
    created = document.get("created_at")
    model = document.get("model")
    return StoredResponse(
        id=response_id,
        status=str(document.get("status") or ""),
        background=document.get("background") is True,
        created_at=float(created) if isinstance(created, int | float) and not isinstance(created, bool) else None,
        model=model if isinstance(model, str) else "",
        usage=Usage.from_body(document.get("usage")),
        store=document.get("store") is not False,
    )


# -- streams ------------------------------------------------------------------------------------

_WHOLE = re.compile(rb'"type"\s*:\s*"response\.(created|queued|in_progress|completed|incomplete|failed)"')
_FIRST = frozenset({b"created", b"queued", b"in_progress"})
_DELTA = re.compile(rb'"delta"\s*:\s*"((?:[^"\\]|\\.)*)"')
_AUDIO = b'"response.audio.delta"'
_SEQUENCE = re.compile(rb'"sequence_number"\s*:\s*(\d+)')
_FRAME_END = re.compile(rb"\r?\n\r?\n")


def _payload(frame: bytes) -> Any:
    data = b"".join(line[5:].lstrip(b" ") for line in frame.splitlines() if line.startswith(b"data:"))
    try:
        return json.loads(data)
    except ValueError:
        return None


def stream_cut_event(sequence: int | None) -> bytes:
    """The Responses API's ``error`` event telling the client the stream broke off. It also carries
    ``error`` (as chat's in-stream errors do), which makes the ``openai`` SDK raise ``APIError``."""
    message = "The backend broke off the stream; the answer is incomplete."
    event = {"type": "error", "sequence_number": 0 if sequence is None else sequence + 1,
             "code": "BackendStreamInterrupted", "message": message, "param": None,
             "error": {"code": "BackendStreamInterrupted", "message": message}}
    return b"event: error\ndata: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


class ResponsesRelay(FrameRelay):
    """Feeds upstream bytes in, gives the same bytes out by whole frames; remembers the response."""

    __slots__ = ("final", "first", "recorded", "sequence")

    def __init__(self) -> None:
        super().__init__()
        self.first: StoredResponse | None = None  # from response.created (or queued / in_progress)
        self.final: StoredResponse | None = None  # from the terminal event
        self.sequence: int | None = None  # the last sequence_number passed on
        self.recorded = False  # where the response lives has been recorded

    def _complete(self, frames: bytes) -> bytes:
        if _AUDIO in frames:  # base64 audio is no text to count
            for frame in _FRAME_END.split(frames):
                if _AUDIO not in frame:
                    self._texts.extend(_DELTA.findall(frame))
        else:
            self._texts.extend(_DELTA.findall(frames))
        if _WHOLE.search(frames):
            for frame in _FRAME_END.split(frames):
                kind = _WHOLE.search(frame)
                if kind is None:
                    continue
                payload = _payload(frame)
                response = stored_response(payload.get("response") if isinstance(payload, dict) else None)
                if response is None:
                    continue
                if kind.group(1) not in _FIRST:
                    self.final = response
                elif self.first is None:
                    self.first = response
        last = frames.rfind(b'"sequence_number"')
        if last >= 0 and (found := _SEQUENCE.match(frames, last)) is not None:
            self.sequence = int(found.group(1))
        return frames

    @property
    def response(self) -> StoredResponse | None:
        return self.final or self.first

    @property
    def model(self) -> str:
        response = self.response
        return response.model if response is not None else ""



# -- stored responses -----------------------------------------------------------------------------


class StoredResponses:
    """Pins calls to the backend holding their response, records new responses, counts background usage."""

    def __init__(
        self, settings: Settings, *, affinity: AffinityMap, failover: Failover, pool: BackendPool,
        sink: UsageSink, timer: Timer, wall_clock: Callable[[], float],
    ) -> None:
        self._settings = settings
        self._affinity = affinity
        self._failover = failover
        self._pool = pool
        self._sink = sink
        self._timer = timer
        self._wall_clock = wall_clock
        self._counted: OrderedDict[str, None] = OrderedDict()

    async def pin(self, call: Call, *, key_name: str, deadline: float) -> None:
        """Pin ``call`` to the backend holding the response it names (by id, or ``previous_response_id``)."""
        if call.endpoint.stored:
            response_id = call.response_id
        else:
            previous = call.body.get("previous_response_id")
            response_id = previous if isinstance(previous, str) and RESPONSE_ID.fullmatch(previous) else None
        if response_id is None:
            return
        found = await self._affinity.find(response_id)
        if found is None or self._pool.named(found.backend) is None:
            found = await self._discover(call, response_id, key_name=key_name, deadline=deadline)
        if found is None:
            return  # a create: the backend it reaches will say it does not know that response
        backend = self._pool.named(found.backend)
        assert backend is not None
        call.pinned, call.owner = backend.name, found.key_name or None
        if call.endpoint.stored:
            call.deployment = found.deployment if is_deployment_name(found.deployment) else "-"
        elif not backend.serves(call.deployment):
            raise NotFound(f"Response '{response_id}' lives in backend '{backend.name}', which does not serve "
                           f"'{call.deployment}'.", code="DeploymentNotFound")

    async def _discover(self, call: Call, response_id: str, *, key_name: str, deadline: float) -> Affinity | None:
        """Ask each backend for a response the map does not know (made before the gateway, or whose record a
        storage outage lost); record where it is. For a call by id, none having it is a 404."""
        version = f"api-version={call.api_version}" if call.api_version else ""
        uncertain: RequestError | None = None
        for backend in self._pool.backends:
            probe = Call(endpoint=endpoint("responses.retrieve", v1=call.v1), deployment="", body={}, raw=b"",
                         stream=False, query=version, api_version=call.api_version, client_usage=False,
                         add_usage=False, response_id=response_id, pinned=backend.name)
            try:
                answer = await self._failover.send(probe, deadline=deadline)
            except RequestError as exc:
                uncertain = exc
                continue
            try:
                idle = self._timer.clock() + self._settings.stream_idle_timeout
                async with self._timer.deadline(min(deadline, idle)):
                    body = await answer.upstream.read()
            except (aiohttp.ClientError, TimeoutError) as exc:
                uncertain = UpstreamFailed(f"Backend '{backend.name}' broke off its answer ({type(exc).__name__}).")
                continue
            finally:
                answer.upstream.release()
            if answer.upstream.status != 200:
                continue
            try:
                response = stored_response(json.loads(body))
            except ValueError:
                response = None
            if response is None or response.id != response_id:
                continue
            deployment = _our_name(backend, response.model)
            await self._affinity.record(response_id, backend=backend.name, deployment=deployment, key_name=key_name,
                                        created=response.created_at)
            return Affinity(backend.name, deployment, key_name, expires=self._wall_clock() + 1.0)
        if not call.endpoint.stored:
            return None
        if uncertain is not None:
            raise NoBackendAvailable(f"Response '{response_id}' could not be located: a backend that may hold it "
                                     "did not answer. Please retry.", retry_after=self._settings.default_cooldown,
                                     throttled=False)
        raise NotFound(f"Response with id '{response_id}' not found.", code="ResponseNotFound")

    async def record(self, call: Call, backend: BackendConfig, response: StoredResponse | None, *,
                     key_name: str) -> None:
        """Record where a response just made lives, before the client can name it in another call."""
        if response is None or call.endpoint.stored or not response.store:
            return
        await self._affinity.record(response.id, backend=backend.name, deployment=call.deployment,
                                    key_name=key_name, created=response.created_at)

    def answered(self, call: Call, backend: BackendConfig, response: StoredResponse | None, *,
                 key_name: str) -> tuple[Usage | None, bool]:
        """The usage this call's own event carries, and whether it is this call's to estimate when missing.

        A foreground create carries its response's usage; calls by id carry none, and neither does a
        background create: a background response's usage becomes an event of its own (see the module).
        """
        if response is not None and response.background:
            self._count_background(call, backend, response, key_name=key_name)
            return None, False
        if call.endpoint.stored:
            return None, False
        return (response.usage if response is not None else None), True

    def _count_background(self, call: Call, backend: BackendConfig, response: StoredResponse, *,
                          key_name: str) -> None:
        if not response.terminal or response.usage is None or response.id in self._counted:
            return
        self._counted[response.id] = None
        while len(self._counted) > _COUNTED_KEPT:
            self._counted.popitem(last=False)
        created = response.created_at if response.created_at is not None else self._wall_clock()
        usage = response.usage
        event_id = background_event_id(response.id)
        self._sink.emit(UsageRecord(
            request_id=event_id, time=datetime.fromtimestamp(created, UTC).isoformat(),
            key_name=call.owner or key_name, deployment=call.deployment if is_deployment_name(call.deployment) else "-",
            model=response.model, backend=backend.name, operation="responses", streaming=False,
            prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens,
            total_tokens=usage.total_tokens, cached_tokens=usage.cached_tokens,
            reasoning_tokens=usage.reasoning_tokens, usage_source="reported", status=200, latency_ms=0.0,
            ttfb_ms=None, outcome="background",
        ))


def _our_name(backend: BackendConfig, model: str) -> str:
    """The gateway's deployment name for what a backend calls ``model``; ``-`` when there is none."""
    if backend.deployments is None:
        return model if is_deployment_name(model) else "-"
    return next((ours for ours, theirs in backend.deployments.items() if theirs == model), "-")
