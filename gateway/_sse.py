"""Relaying an AOAI server-sent-event stream: find the usage chunk, strip it if asked, keep text.

Frames end with a blank line. Bytes are passed on as soon as a frame is complete; only a
partial frame at the end of a read waits for the next read. JSON is parsed only for the frame
that carries ``"usage": {...}`` (inside a JSON string a quote is escaped, so the raw bytes
``"usage":{`` can only be a key). The completion text is kept as the raw escaped strings, so an
estimate can be made if the stream ends without usage.
"""

from __future__ import annotations

import json
import re
from typing import Any

from gateway._records import Usage

_USAGE = re.compile(rb'"usage"\s*:\s*\{')
_FRAME_END = re.compile(rb"\r?\n\r?\n")
_TEXT = re.compile(rb'"(?:content|text|arguments|refusal|reasoning_content)"\s*:\s*"((?:[^"\\]|\\.)*)"')
_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]+)"')


def split_frames(partial: bytes, chunk: bytes) -> tuple[bytes, bytes]:
    """``partial + chunk`` cut after its last complete frame (a blank line ends one): (frames, the rest)."""
    data = partial + chunk if partial else chunk
    lf = data.rfind(b"\n\n")
    crlf = data.rfind(b"\n\r\n")
    cut = max(lf + 2 if lf >= 0 else -1, crlf + 3 if crlf >= 0 else -1)
    if cut < 0:
        return b"", data
    if cut == len(data):
        return data, b""
    return data[:cut], data[cut:]


def _frame_payload(frame: bytes) -> Any:
    """The JSON of a frame's ``data:`` lines, or ``None``."""
    data = b"".join(
        line[5:].lstrip(b" ") for line in frame.splitlines() if line.startswith(b"data:")
    )
    if not data or data.strip() == b"[DONE]":
        return None
    try:
        return json.loads(data)
    except ValueError:
        return None


class FrameRelay:
    """Passes on whole SSE frames as they complete; what each kind of stream does with them is ``_complete``."""

    __slots__ = ("_partial", "_texts")

    def __init__(self) -> None:
        self._partial = b""
        self._texts: list[bytes] = []  # the generated text as its raw JSON-escaped strings, for estimates

    def feed(self, chunk: bytes) -> bytes:
        """Bytes for the client now: every complete frame so far, as ``_complete`` passes them on."""
        frames, self._partial = split_frames(self._partial, chunk)
        return self._complete(frames) if frames else b""

    def finish(self) -> bytes:
        """Whatever is left when the upstream ends (a last frame without its blank line)."""
        rest, self._partial = self._partial, b""
        return self._complete(rest) if rest else b""

    def _complete(self, frames: bytes) -> bytes:
        raise NotImplementedError

    def completion_text(self) -> str:
        """The generated text seen so far (content, tool arguments, refusals)."""
        parts = []
        for raw in self._texts:
            try:
                parts.append(json.loads(b'"' + raw + b'"'))
            except ValueError:
                parts.append(raw.decode(errors="replace"))
        return "".join(parts)


class StreamRelay(FrameRelay):
    """Feeds upstream bytes in, gives client bytes out; remembers usage, model and text."""

    __slots__ = ("model", "strip_usage", "usage")

    def __init__(self, *, strip_usage: bool) -> None:
        super().__init__()
        self.strip_usage = strip_usage
        self.usage: Usage | None = None
        self.model = ""

    def _complete(self, frames: bytes) -> bytes:
        self._texts.extend(_TEXT.findall(frames))
        if not self.model:
            found = _MODEL.search(frames)
            if found:
                self.model = found.group(1).decode(errors="replace")
        if self.usage is None and _USAGE.search(frames):
            frames = self._take_usage(frames)
        if self.strip_usage:
            frames = frames.replace(b',"usage":null', b"").replace(b'"usage":null,', b"")
        return frames

    def _take_usage(self, frames: bytes) -> bytes:
        kept: list[bytes] = []
        start = 0
        for end in _FRAME_END.finditer(frames):
            frame = frames[start:end.end()]
            start = end.end()
            if self.usage is None and _USAGE.search(frame):
                payload = _frame_payload(frame)
                if isinstance(payload, dict):
                    self.usage = Usage.from_body(payload.get("usage"))
                    if self.usage is not None and self.strip_usage and not payload.get("choices"):
                        continue
            kept.append(frame)
        kept.append(frames[start:])
        return b"".join(kept)

