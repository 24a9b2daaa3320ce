"""multipart/form-data bodies (audio files): their small text fields read, one field's value replaced.

The body is never rebuilt: a replaced value is spliced into the bytes as received, so the file
parts, their headers and the boundary reach the backend exactly as the client sent them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from email.message import Message

from gateway._exceptions import BadRequest

_NAME = re.compile(rb'(?:^|;)\s*name\s*=\s*"([^"]*)"', re.IGNORECASE)
_FILENAME = re.compile(rb"(?:^|;)\s*filename\*?\s*=", re.IGNORECASE)
#: Text fields longer than this are not kept (a prompt, say); the ones the gateway reads are short.
_FIELD_LIMIT = 4096


def boundary_of(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/form-data`` content type; ``None`` for any other type."""
    message = Message()
    message["content-type"] = content_type
    if message.get_content_type() != "multipart/form-data":
        return None
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not 0 < len(boundary) <= 70:
        raise BadRequest("The multipart/form-data body has no usable boundary.", code="InvalidRequestBody")
    return boundary.encode("latin-1", "replace")


@dataclass(frozen=True, slots=True)
class Form:
    """A multipart body and where its short text fields' values lie in it."""

    raw: bytes
    spans: dict[str, tuple[int, int]]  # field name -> (start, end) of its value in ``raw``

    def value(self, name: str) -> str | None:
        span = self.spans.get(name)
        return None if span is None else self.raw[span[0]:span[1]].decode("utf-8", "replace")

    def replaced(self, name: str, value: str) -> bytes:
        """The body with field ``name``'s value replaced (the body as it is when it has no such field)."""
        span = self.spans.get(name)
        if span is None:
            return self.raw
        return self.raw[:span[0]] + value.encode() + self.raw[span[1]:]


def parse_form(raw: bytes, boundary: bytes) -> Form:
    """Find the text fields (parts without a file name) of a multipart body; 400 when it is not one."""
    delimiter = b"--" + boundary
    invalid = BadRequest("The multipart/form-data body is malformed.", code="InvalidRequestBody")
    if raw.startswith(delimiter):
        position = 0
    else:
        position = raw.find(b"\r\n" + delimiter)
        if position < 0:
            raise invalid
        position += 2
    spans: dict[str, tuple[int, int]] = {}
    while True:
        after = position + len(delimiter)
        if raw.startswith(b"--", after):  # the closing delimiter
            return Form(raw, spans)
        if not raw.startswith(b"\r\n", after):
            raise invalid
        head_end = raw.find(b"\r\n\r\n", after)
        following = raw.find(b"\r\n" + delimiter, after)
        if head_end < 0 or following < 0 or head_end > following:
            raise invalid
        disposition = b""
        for line in raw[after + 2:head_end].split(b"\r\n"):
            field, _, content = line.partition(b":")
            if field.strip().lower() == b"content-disposition":
                disposition = content
        name = _NAME.search(disposition)
        start = head_end + 4
        if name is not None and not _FILENAME.search(disposition) and following - start <= _FIELD_LIMIT:
            spans.setdefault(name.group(1).decode("utf-8", "replace"), (start, following))
        position = following + 2
