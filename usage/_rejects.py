"""Rows of the ``usagerejects`` table: one per message the aggregator could not count.

Every row fits Table Storage's limits (keys of at most 1 KiB without ``/ \\ # ?`` or control
characters, string properties of at most 64 KiB in UTF-16, entities of at most 1 MiB), and its keys
depend on the message alone, so a redelivered message overwrites its own row instead of adding one,
while two messages that differ in id or body never share one:

- RowKey: the SHA-256 (hex) of the message id and body; PartitionKey: its first two digits;
- ``Reason`` (at most 1,024 characters), ``Body`` (its start as text: UTF-8, with undecodable bytes,
  lone surrogates and control characters escaped, at most 16,384 UTF-16 code units), ``BodyBytes``
  (the whole body's length in bytes) and ``BodySha256`` (of those bytes), ``MessageId`` (escaped, at
  most 1,024 characters) and ``RejectedAt`` (the last time it was rejected).
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime
from typing import Any

BODY_UNITS = 16_384  # UTF-16 code units: 32 KiB, half of a string property's limit
TEXT_UNITS = 1_024  # for Reason and MessageId
_UNPRINTABLE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _escape(match: re.Match[str]) -> str:
    return f"\\x{ord(match[0]):02x}"


def readable(text: str, units: int) -> str:
    """``text`` with lone surrogates and control characters escaped, cut to ``units`` UTF-16 code units."""
    text = text[:units].encode("utf-8", "backslashreplace").decode("utf-8")
    text = _UNPRINTABLE.sub(_escape, text)
    return text.encode("utf-16-le")[:2 * units].decode("utf-16-le", "ignore")  # never half a surrogate pair


def body_bytes(body: bytes | str) -> bytes:
    """The body as it came (a text body as UTF-8, lone surrogates kept)."""
    return body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")


def row_key(message_id: str | None, raw: bytes) -> str:
    """The SHA-256 of the message's id and body (the id length-prefixed, and none told from empty)."""
    identity = b"-" if message_id is None else b"=" + body_bytes(message_id)
    return hashlib.sha256(len(identity).to_bytes(8, "big") + identity + raw).hexdigest()


def reject_entity(body: bytes | str, reason: str, message_id: str | None, now: datetime) -> dict[str, Any]:
    """The ``usagerejects`` row for one message."""
    raw = body_bytes(body)
    # 4 bytes per character at most, so the cut can only break characters past the part kept
    text = raw[:4 * BODY_UNITS].decode("utf-8", "backslashreplace") if isinstance(body, bytes) else body
    key = row_key(message_id, raw)
    return {
        "PartitionKey": key[:2], "RowKey": key,
        "Reason": readable(reason, TEXT_UNITS), "Body": readable(text, BODY_UNITS),
        "BodyBytes": len(raw), "BodySha256": hashlib.sha256(raw).hexdigest(),  # Int32: Service Bus caps at 100 MB
        "MessageId": readable(message_id or "", TEXT_UNITS), "RejectedAt": now,
    }
