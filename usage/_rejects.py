"""Rows of the ``usagerejects`` table: one per message the aggregator could not count.

Every row fits Table Storage's limits (keys of at most 1 KiB without ``/ \\ # ?`` or control
characters, string properties of at most 64 KiB in UTF-16, entities of at most 1 MiB), and its keys
depend on the message alone, so a redelivered message overwrites its own row instead of adding one:

- RowKey: the message id when it is a plain id (``[A-Za-z0-9._:~=+@-]``, at most 128 characters,
  as Service Bus allows), else ``sha256-<hex>`` of the message id and body;
- PartitionKey: the first two hex digits of the RowKey's SHA-256 (256 partitions);
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

from usage._tables import int64

BODY_UNITS = 16_384  # UTF-16 code units: 32 KiB, half of a string property's limit
TEXT_UNITS = 1_024  # for Reason and MessageId
_PLAIN_ID = re.compile(r"[A-Za-z0-9._:~=+@-]{1,128}")
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
    if message_id is not None and _PLAIN_ID.fullmatch(message_id):
        return message_id
    identity = hashlib.sha256(body_bytes(message_id or "") + b"\n" + raw)
    return f"sha256-{identity.hexdigest()}"


def reject_entity(body: bytes | str, reason: str, message_id: str | None, now: datetime) -> dict[str, Any]:
    """The ``usagerejects`` row for one message."""
    raw = body_bytes(body)
    # 4 bytes per character at most, so the cut can only break characters past the part kept
    text = raw[:4 * BODY_UNITS].decode("utf-8", "backslashreplace") if isinstance(body, bytes) else body
    key = row_key(message_id, raw)
    return {
        "PartitionKey": hashlib.sha256(key.encode()).hexdigest()[:2], "RowKey": key,
        "Reason": readable(reason, TEXT_UNITS), "Body": readable(text, BODY_UNITS),
        "BodyBytes": int64(len(raw)), "BodySha256": hashlib.sha256(raw).hexdigest(),
        "MessageId": readable(message_id or "", TEXT_UNITS), "RejectedAt": now,
    }
