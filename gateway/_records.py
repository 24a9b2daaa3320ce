"""The usage record the proxy produces for every request, and where it goes."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from usage import MAX_TOKENS

log = logging.getLogger(__name__)

UsageSource = Literal["reported", "estimated", "none"]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0

    @classmethod
    def from_body(cls, usage: Any) -> Usage | None:
        """Read an AOAI ``usage`` object; ``None`` if absent or not in tokens (Whisper's ``seconds``).

        Chat, completions and embeddings say ``prompt_tokens``/``completion_tokens``; the Responses
        API, ``gpt-image-1`` and ``gpt-4o-transcribe`` say ``input_tokens``/``output_tokens``, with
        ``input_tokens_details.cached_tokens`` and ``output_tokens_details.reasoning_tokens``.
        """
        if not isinstance(usage, dict):
            return None

        def number(container: Any, key: str) -> int | None:
            value = container.get(key) if isinstance(container, dict) else None
            # a count the aggregator would refuse (negative, absurd) would lose the whole request's event
            usable = isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS
            return value if usable else None

        if "input_tokens" in usage or "output_tokens" in usage:
            names = ("input_tokens", "output_tokens", "input_tokens_details", "output_tokens_details")
        else:
            names = ("prompt_tokens", "completion_tokens", "prompt_tokens_details", "completion_tokens_details")
        prompt, completion, total = number(usage, names[0]), number(usage, names[1]), number(usage, "total_tokens")
        if prompt is None and completion is None and total is None:
            return None
        prompt, completion = prompt or 0, completion or 0
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=total or prompt + completion,
            cached_tokens=number(usage.get(names[2]), "cached_tokens") or 0,
            reasoning_tokens=number(usage.get(names[3]), "reasoning_tokens") or 0,
        )


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """What one request through the gateway used."""

    request_id: str
    time: str  # ISO 8601, UTC, when the request arrived
    key_name: str
    deployment: str
    model: str
    backend: str
    operation: str
    streaming: bool
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    usage_source: UsageSource
    status: int
    latency_ms: float
    ttfb_ms: float | None
    outcome: str  # complete, client_disconnected, upstream_cut, refused, gateway_error, background

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SCHEMA_VERSION = 1


def encode_event(record: UsageRecord) -> bytes:
    """The usage event (schema 1, see ``usage/_events.py``) for ``record``: its id is the request id."""
    return json.dumps({"schema": SCHEMA_VERSION, "event_id": record.request_id, **record.to_dict()},
                      separators=(",", ":")).encode()


class UsageSink(Protocol):
    """Receives usage records; ``emit`` is called on the request path and must not block."""

    def emit(self, record: UsageRecord) -> None: ...


class TeeSink:
    """Gives every record to several sinks."""

    def __init__(self, *sinks: UsageSink) -> None:
        self._sinks = sinks

    def emit(self, record: UsageRecord) -> None:
        for sink in self._sinks:
            sink.emit(record)


class LoggingSink:
    """Writes each record as one JSON log line at DEBUG (``--log-level debug`` shows them): under the Functions
    worker every log record is forwarded to the host, which a per-request line would cost each request."""

    def emit(self, record: UsageRecord) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("usage %s", encode_event(record).decode())
