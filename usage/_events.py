"""The usage event: what the gateway publishes per request and the aggregator counts.

Schema version 1, one JSON object per Service Bus message (``content_type: application/json``,
``message_id`` = ``event_id``)::

    {"schema": 1, "event_id": "9f0c…", "time": "2026-11-29T13:45:12.345+00:00",
     "key_name": "team-a", "deployment": "gpt-4o", "model": "gpt-4o-2024-08-06", "backend": "eastus",
     "operation": "chat/completions", "streaming": true,
     "prompt_tokens": 15, "completion_tokens": 20, "total_tokens": 35, "cached_tokens": 0,
     "reasoning_tokens": 0, "usage_source": "reported", "status": 200,
     "latency_ms": 480.2, "ttfb_ms": 21.0, "outcome": "complete"}

A reader must ignore fields it does not know; a new required field means a new ``schema``.

``decode_event`` returns only events the aggregator can count, and raises ``MalformedEvent`` (and
nothing else) for any other body: one over ``MAX_BODY_BYTES``, nested too deep to parse, with a
field given twice, token counts that are not whole numbers from 0 to ``MAX_TOKENS`` (so that a
key's month stays far below Int64), a ``time`` without a zone or outside ``EARLIEST`` to
``LATEST`` in UTC, or names that are not plain (they become table keys).
"""

from __future__ import annotations

import json
import re
import reprlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

SCHEMA_VERSION = 1
MAX_BODY_BYTES = 64 * 1024  # an event is about 600 bytes
MAX_TOKENS = 10**12  # per field and event; 9 million such events would still not fill an Int64
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2201, 1, 1, tzinfo=UTC)  # excluded
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_EVENT_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
_TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")
_SHOW = reprlib.Repr()  # shows a value in a reason, cut short however large or deep it is
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother, _SHOW.maxlong = 2, 80, 80, 40


class MalformedEvent(ValueError):
    """A message that is not a usage event this aggregator can count; the message says why."""


@dataclass(frozen=True, slots=True)
class UsageEvent:
    event_id: str
    time: datetime
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
    usage_source: str
    status: int

    @property
    def estimated(self) -> bool:
        return self.usage_source == "estimated"


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refused when it gives a field twice (which of the two would count is a guess)."""
    document: dict[str, Any] = {}
    for name, value in pairs:
        if name in document:
            raise MalformedEvent(f"field {_SHOW.repr(name)} is given twice")
        document[name] = value
    return document


def _parse(raw: bytes | str) -> dict[str, Any]:
    if len(raw) > MAX_BODY_BYTES:
        unit = "bytes" if isinstance(raw, bytes) else "characters"
        raise MalformedEvent(f"{len(raw):,} {unit} long, more than a usage event's {MAX_BODY_BYTES:,}")
    try:
        document = json.loads(raw, object_pairs_hook=_object)
    except RecursionError as exc:
        raise MalformedEvent("nested too deep to parse") from exc
    except MalformedEvent:
        raise
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedEvent(f"not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise MalformedEvent("not a JSON object")
    return document


def _text(document: dict[str, Any], name: str, *, pattern: re.Pattern[str] | None = None, required: bool = True) -> str:
    value = document.get(name, None if required else "")
    if not isinstance(value, str) or (required and not value):
        raise MalformedEvent(f"'{name}' must be a non-empty string")
    if pattern is not None and not pattern.fullmatch(value):
        raise MalformedEvent(f"'{name}' is not a plain name: {_SHOW.repr(value)}")
    return value


def _whole(document: dict[str, Any], name: str, most: int) -> int:
    value = document.get(name, 0)
    if type(value) is not int or not 0 <= value <= most:  # bool is an int too, and not a count
        raise MalformedEvent(f"'{name}' must be a whole number from 0 to {most:,}, not {_SHOW.repr(value)}")
    return value


def _time(document: dict[str, Any]) -> datetime:
    """``time`` in UTC; its year is checked (give or take one) first, so converting cannot overflow."""
    text = _text(document, "time")
    try:
        when = datetime.fromisoformat(text)
    except ValueError as exc:
        raise MalformedEvent("'time' is not an ISO 8601 time") from exc
    if when.utcoffset() is None:
        raise MalformedEvent("'time' has no time zone")
    if not EARLIEST.year - 1 <= when.year <= LATEST.year or not EARLIEST <= when.astimezone(UTC) < LATEST:
        raise MalformedEvent(f"'time' {when.isoformat()} is outside the years {EARLIEST.year}-{LATEST.year - 1} (UTC)")
    return when.astimezone(UTC)


def decode_event(raw: bytes | str) -> UsageEvent:
    """Parse and validate one message body; ``MalformedEvent`` says what is wrong."""
    document = _parse(raw)
    schema = document.get("schema")
    if type(schema) is not int or schema != SCHEMA_VERSION:
        raise MalformedEvent(f"unsupported schema {_SHOW.repr(schema)} (this reader knows {SCHEMA_VERSION})")
    when = _time(document)
    status = _whole(document, "status", 999)
    counts = {name: _whole(document, name, MAX_TOKENS) for name in _TOKEN_FIELDS}
    return UsageEvent(
        event_id=_text(document, "event_id", pattern=_EVENT_ID),
        time=when,
        key_name=_text(document, "key_name", pattern=_NAME),
        deployment=_text(document, "deployment", pattern=_NAME),
        model=_text(document, "model", required=False),
        backend=_text(document, "backend", required=False),
        operation=_text(document, "operation"),
        streaming=document.get("streaming") is True,
        usage_source=_text(document, "usage_source"),
        status=status,
        **counts,
    )
