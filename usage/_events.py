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
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

SCHEMA_VERSION = 1
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_EVENT_ID = re.compile(r"[A-Za-z0-9_-]{8,64}")
_TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")


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


def _text(document: dict[str, Any], name: str, *, pattern: re.Pattern[str] | None = None, required: bool = True) -> str:
    value = document.get(name, None if required else "")
    if not isinstance(value, str) or (required and not value):
        raise MalformedEvent(f"'{name}' must be a non-empty string")
    if pattern is not None and not pattern.fullmatch(value):
        raise MalformedEvent(f"'{name}' is not a plain name: {value[:80]!r}")
    return value


def _count(document: dict[str, Any], name: str) -> int:
    value = document.get(name, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MalformedEvent(f"'{name}' must be a whole number >= 0")
    return value


def decode_event(raw: bytes | str) -> UsageEvent:
    """Parse and validate one message body; ``MalformedEvent`` says what is wrong."""
    try:
        document = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedEvent(f"not JSON: {exc}") from None
    if not isinstance(document, dict):
        raise MalformedEvent("not a JSON object")
    if document.get("schema") != SCHEMA_VERSION:
        raise MalformedEvent(f"unsupported schema {document.get('schema')!r} (this reader knows {SCHEMA_VERSION})")
    try:
        when = datetime.fromisoformat(_text(document, "time"))
    except ValueError:
        raise MalformedEvent("'time' is not an ISO 8601 time") from None
    if when.tzinfo is None:
        raise MalformedEvent("'time' has no time zone")
    status = document.get("status", 0)
    if not isinstance(status, int) or isinstance(status, bool):
        raise MalformedEvent("'status' must be a whole number")
    counts = {name: _count(document, name) for name in _TOKEN_FIELDS}
    return UsageEvent(
        event_id=_text(document, "event_id", pattern=_EVENT_ID),
        time=when.astimezone(UTC),
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
