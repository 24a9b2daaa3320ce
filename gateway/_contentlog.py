"""Prompt and completion records for keys that opted in, written to Blob Storage off the request path.

On the request path the proxy only keeps the bytes it hands the client (a list append per chunk) and, when
the request ends, ``ContentLog.record`` appends one ``Pending`` to a bounded buffer (``BatchPublisher``:
drops oldest with a count, never blocks). In the background, batches are turned into records in a worker
thread (the choices assembled from the frames the client received, redaction, truncation) and uploaded as
one JSON Lines blob per key and arrival hour (layout: ``usage._content``). A storage outage only delays
the uploads: the batch is retried with back-off while requests go on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from itertools import count
from typing import Any

import aiohttp
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceNotFoundError
from azure.storage.blob import ContentSettings
from azure.storage.blob.aio import BlobServiceClient

from gateway._publish import BatchPublisher
from gateway._records import UsageRecord
from gateway._request import Call
from gateway._settings import BackendConfig, Settings
from usage import CONTENT_CONTAINER, hour_prefix

log = logging.getLogger(__name__)

REDACTED = "[redacted]"
#: what an upload can raise when storage fails: worth retrying
BLOB_ERRORS: tuple[type[Exception], ...] = (AzureError, aiohttp.ClientError, OSError, TimeoutError)
#: the choice's text fields and finish reason, as compact JSON (AOAI's) writes them: string values (null is none)
_FIELDS = re.compile(rb'"(content|refusal|text|finish_reason)":"((?:[^"\\]|\\.)*)"')
#: each request's blob upload: the SDK's connect/read time-outs are 300 s; a flush at shutdown has 5 s
_UPLOAD_OPTIONS: dict[str, Any] = {"connection_timeout": 10, "read_timeout": 30, "timeout": 30}


@dataclass(slots=True)
class Pending:
    """A request to record: what the proxy knew when it ended. Turned into a line in the background."""

    usage: UsageRecord
    call: Call
    backend: BackendConfig | None  # the backend that answered; None when nothing was sent upstream
    with_usage: bool  # the gateway asked that backend for stream_options.include_usage
    streamed: bool  # received holds SSE frames (else a whole body, or nothing)
    received: list[bytes]
    size: int = 0
    line: bytes | None = field(default=None, repr=False)  # the encoded record, once made


def _weight(item: Pending) -> int:
    return item.size


class ContentLog:
    """What the proxy calls when a request of a key with ``log_content`` ends."""

    def __init__(self, publisher: BatchPublisher[Pending]) -> None:
        self._publisher = publisher

    def record(self, usage: UsageRecord, call: Call, received: list[bytes], *, backend: BackendConfig | None,
               with_usage: bool) -> None:
        size = len(call.raw) + sum(map(len, received))
        self._publisher.emit(Pending(usage, call, backend, with_usage, call.stream and backend is not None,
                                     received, size))

    async def close(self, *, flush_seconds: float = 10.0) -> None:
        await self._publisher.close(flush_seconds=flush_seconds)


# -- the record ---------------------------------------------------------------------------------------


def sent_request(call: Call, backend: BackendConfig | None, *, with_usage: bool) -> dict[str, Any]:
    """The body ``backend`` was sent (``_request.body_for``, as an object); the client's when none was."""
    if backend is None:
        return dict(call.body)
    body = dict(call.body)
    if call.v1:
        body["model"] = backend.upstream_deployment(call.deployment)
    if with_usage:
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return body


def _add_text(choice: dict[str, Any], name: str, value: Any) -> None:
    if type(value) is str:
        parts = choice[name]
        if parts is None:
            choice[name] = [value]
        else:
            parts.append(value)


def _add_tools(tools: dict[int, dict[str, str]], calls: list[Any]) -> None:
    for position, call in enumerate(calls):
        if type(call) is not dict:
            continue
        index = call.get("index", position)
        tool = tools.setdefault(index if type(index) is int else position, {"id": "", "name": "", "arguments": ""})
        if type(call.get("id")) is str and not tool["id"]:
            tool["id"] = call["id"]
        function = call.get("function")
        if type(function) is dict:
            for name in ("name", "arguments"):
                if type(function.get(name)) is str:
                    tool[name] += function[name]


def _payloads(stream: bytes) -> list[Any]:
    """The JSON of each ``data:`` frame in ``stream`` (``[DONE]`` and unreadable frames left out)."""
    if b"\r" in stream:
        stream = stream.replace(b"\r\n", b"\n")
    datas = []
    for frame in stream.split(b"\n\n"):
        if frame.startswith(b"data: ") and b"\n" not in frame:  # the usual frame: one data line
            data = frame[6:]
        else:
            data = b"".join(line[5:].strip() for line in frame.split(b"\n") if line.startswith(b"data:"))
        if data and data != b"[DONE]":
            datas.append(data)
    try:  # one parse for the whole stream: far cheaper than one per frame
        parsed = json.loads(b"[" + b",".join(datas) + b"]")
        return parsed if isinstance(parsed, list) else []
    except ValueError:
        payloads = []
        for data in datas:
            try:
                payloads.append(json.loads(data))
            except ValueError:
                continue
        return payloads


def _choices(documents: Iterable[Any], *, streamed: bool) -> list[dict[str, Any]]:
    """Choices assembled per index: text (chat ``content`` or completions ``text``), tool calls, refusal.

    Runs once per chunk of every logged stream: plain dicts and ``type() is`` checks keep it cheap.
    """
    field_name = "delta" if streamed else "message"
    state: dict[int, dict[str, Any]] = {}
    for document in documents:
        raws = document.get("choices") if type(document) is dict else None
        if not raws or type(raws) is not list:
            continue
        for position, raw in enumerate(raws):
            if type(raw) is not dict:
                continue
            index = raw.get("index", position)
            if type(index) is not int:
                index = position
            choice = state.get(index)
            if choice is None:
                choice = state[index] = {"content": None, "refusal": None, "tools": {}, "finish_reason": None}
            message = raw.get(field_name)
            if type(message) is dict:
                _add_text(choice, "content", message.get("content"))
                _add_text(choice, "refusal", message.get("refusal"))
                calls = message.get("tool_calls")
                if calls and type(calls) is list:
                    _add_tools(choice["tools"], calls)
            if "text" in raw:
                _add_text(choice, "content", raw["text"])
            reason = raw.get("finish_reason")
            if type(reason) is str:
                choice["finish_reason"] = reason
    return [{"index": index,
             "content": None if (c := state[index])["content"] is None else "".join(c["content"]),
             "tool_calls": [dict(c["tools"][k]) for k in sorted(c["tools"])],
             "refusal": None if c["refusal"] is None else "".join(c["refusal"]),
             "finish_reason": c["finish_reason"]} for index in sorted(state)]


def _single_choice(data: bytes) -> list[dict[str, Any]] | None:
    """The one choice of a stream without tool calls, read from the raw frames; ``None`` if the stream is not
    that (several choices, tool calls, no choice, JSON with spaces): then every frame is parsed.

    Inside a JSON string a quote is escaped, so the raw bytes ``"content":`` can only be a key (as
    ``_sse`` relies on for ``"usage"``); AOAI's chunks have no other ``content``, ``refusal`` or ``text``
    keys than the choice's. Parsing every chunk's JSON would cost about 2 µs a chunk, mostly for the
    content-filter results; one scan of the stream costs a tenth of that.
    """
    indexes = data.count(b'"index"')
    if (not indexes or b'"tool_calls"' in data or b'": ' in data or b'" :' in data  # compact JSON only
            or data.count(b'"index":0,') + data.count(b'"index":0}') != indexes):
        return None
    parts: dict[bytes, list[bytes]] = {b"content": [], b"refusal": [], b"text": []}
    reason: bytes | None = None
    for name, value in _FIELDS.findall(data):
        if name == b"finish_reason":
            reason = value or reason
        else:
            parts[name].append(value)
    try:
        content, refusal, text = (json.loads(b'"' + b"".join(p) + b'"') if p else None for p in parts.values())
    except ValueError:
        return None
    if text is not None:
        content = text if content is None else content + text
    return [{"index": 0, "content": content, "tool_calls": [], "refusal": refusal,
             "finish_reason": None if reason is None else reason.decode()}]


_TERMINAL = frozenset({"response.completed", "response.incomplete", "response.failed"})


def _output_choice(output: Any, status: Any) -> list[dict[str, Any]]:
    """A Responses API ``output`` (its items) as one choice: text, refusal, function calls, status."""
    choice: dict[str, Any] = {"content": None, "refusal": None, "tools": {}}
    for position, item in enumerate(output if type(output) is list else []):
        if type(item) is not dict:
            continue
        if item.get("type") == "function_call":
            choice["tools"][position] = {"id": str(item.get("call_id") or item.get("id") or ""),
                                         "name": str(item.get("name") or ""),
                                         "arguments": str(item.get("arguments") or "")}
        for part in item.get("content") or [] if item.get("type") == "message" else []:
            if type(part) is dict:
                _add_text(choice, "content", part.get("text") if part.get("type") == "output_text" else None)
                _add_text(choice, "refusal", part.get("refusal") if part.get("type") == "refusal" else None)
    return [{"index": 0, "content": None if choice["content"] is None else "".join(choice["content"]),
             "tool_calls": [choice["tools"][k] for k in sorted(choice["tools"])],
             "refusal": None if choice["refusal"] is None else "".join(choice["refusal"]),
             "finish_reason": status if type(status) is str else None}]


def _responses_stream(events: list[Any]) -> list[dict[str, Any]]:
    """What a Responses stream gave the client: the terminal event's whole output, or (cut, abandoned)
    the items and deltas seen so far."""
    items: dict[int, dict[str, Any]] = {}
    status: Any = None
    for event in events:
        if type(event) is not dict:
            continue
        kind = event.get("type")
        if kind in _TERMINAL and type(event.get("response")) is dict:
            return _output_choice(event["response"].get("output"), event["response"].get("status"))
        index = event.get("output_index")
        if kind == "response.output_item.added" and type(index) is int and type(event.get("item")) is dict:
            item = dict(event["item"])
            if item.get("type") == "message":
                item["content"] = [{"type": "output_text", "text": ""}, {"type": "refusal", "refusal": ""}]
            items[index] = item
        elif type(index) is int and index in items and type(event.get("delta")) is str:
            item = items[index]
            if kind == "response.output_text.delta" and item.get("type") == "message":
                item["content"][0]["text"] += event["delta"]
            elif kind == "response.refusal.delta" and item.get("type") == "message":
                item["content"][1]["refusal"] += event["delta"]
            elif kind == "response.function_call_arguments.delta":
                item["arguments"] = str(item.get("arguments") or "") + event["delta"]
        elif kind in ("response.created", "response.in_progress") and type(event.get("response")) is dict:
            status = event["response"].get("status")
    for item in items.values():  # empty parts were never sent
        if item.get("type") == "message":
            item["content"] = [p for p in item["content"] if p.get("text") or p.get("refusal")]
    return _output_choice([items[k] for k in sorted(items)], status) if items else []


def assemble(item: Pending) -> list[dict[str, Any]]:
    """The choices the client received: from the SSE frames, or from the whole body (a Responses API call:
    its output items, as one choice)."""
    if not item.received:
        return []
    data = b"".join(item.received)
    if item.call.operation.startswith("responses"):
        if item.streamed:
            return _responses_stream(_payloads(data))
        try:
            document = json.loads(data)
        except ValueError:
            return []
        return _output_choice(document.get("output"), document.get("status")) if type(document) is dict else []
    if item.streamed:
        single = _single_choice(data)
        return single if single is not None else _choices(_payloads(data), streamed=True)
    try:
        document = json.loads(data)
    except ValueError:
        return []
    return _choices([document], streamed=False)


class Redactor:
    """Replaces every match of the patterns with ``[redacted]``, in each string of a record's content."""

    def __init__(self, patterns: Iterable[str]) -> None:
        self._patterns = [re.compile(p) for p in patterns]

    def text(self, value: str) -> str:
        for pattern in self._patterns:
            value = pattern.sub(REDACTED, value)
        return value

    def tree(self, value: Any) -> Any:
        """``value`` (parsed JSON) with every string value redacted; object keys are left alone."""
        if not self._patterns:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {k: self.tree(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.tree(v) for v in value]
        return value

    def choices(self, choices: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not self._patterns:
            return choices
        for choice in choices:
            for name in ("content", "refusal"):
                if choice[name] is not None:
                    choice[name] = self.text(choice[name])
            for tool in choice["tool_calls"]:
                tool["arguments"] = self.text(tool["arguments"])
        return choices


def _dumps(record: dict[str, Any]) -> bytes:
    # ASCII escapes: a lone surrogate a client sent cannot make the line unwritable
    return json.dumps(record, separators=(",", ":")).encode()


def _strings(value: Any) -> Iterator[tuple[dict[str, Any] | list[Any], Any, str]]:
    """Every string value in ``value`` as (container, key or index, string)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str):
                yield value, key, item
            else:
                yield from _strings(item)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            if isinstance(item, str):
                yield value, index, item
            else:
                yield from _strings(item)


def _cut(text: str, budget: int) -> str:
    """The longest start of ``text`` whose JSON encoding (without quotes) is at most ``budget`` bytes."""
    if budget <= 0:
        return ""
    encoded = len(json.dumps(text)) - 2
    keep = min(len(text), budget * len(text) // max(encoded, 1))
    while keep > 0 and len(json.dumps(text[:keep])) - 2 > budget:
        keep = keep * 9 // 10
    return text[:keep]


def truncate(record: dict[str, Any], max_bytes: int) -> bytes:
    """``record`` as a line of at most ``max_bytes``: the longest strings of its request and choices cut to
    one common length (what a reader most likely wants stays whole); failing that, without them."""
    record["truncated"] = True
    for _ in range(4):
        line = _dumps(record)
        excess = len(line) - max_bytes
        if excess <= 0:
            return line
        leaves = [(c, k, s, len(json.dumps(s)) - 2) for c, k, s in _strings([record["request"], record["choices"]])]
        if not leaves:
            break
        low, high = 0, max(size for *_, size in leaves)
        while low < high:  # the largest common cap that saves enough
            cap = (low + high + 1) // 2
            if sum(size - cap for *_, size in leaves if size > cap) >= excess:
                low = cap
            else:
                high = cap - 1
        for container, key, text, size in leaves:
            if size > low:
                container[key] = _cut(text, low)
    record["request"], record["choices"] = None, []
    return _dumps(record)


class RecordMaker:
    """Turns a ``Pending`` into its JSON line: assembled, redacted, cut to ``max_bytes``."""

    def __init__(self, settings: Settings) -> None:
        self._redactor = Redactor(settings.content_log_redact)
        self._max_bytes = settings.content_log_max_bytes

    def line(self, item: Pending) -> bytes:
        usage = item.usage
        record = {
            "request_id": usage.request_id, "time": usage.time, "key_name": usage.key_name,
            "deployment": usage.deployment, "backend": usage.backend, "operation": usage.operation,
            "request": self._redactor.tree(sent_request(item.call, item.backend, with_usage=item.with_usage)),
            "choices": self._redactor.choices(assemble(item)),
            "usage": {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                      "total_tokens": usage.total_tokens, "cached_tokens": usage.cached_tokens,
                      "reasoning_tokens": usage.reasoning_tokens},
            "usage_source": usage.usage_source, "status": usage.status, "outcome": usage.outcome,
            "truncated": False,
        }
        line = _dumps(record)
        if len(line) > self._max_bytes:
            line = truncate(record, self._max_bytes)
        return line


# -- Blob Storage -------------------------------------------------------------------------------------


def instance_name() -> str:
    """This process's part of blob names: the Azure instance (or host) and a random tag, so a restarted
    worker never writes over the blobs of the one before."""
    base = os.environ.get("WEBSITE_INSTANCE_ID", "")[:12] or socket.gethostname()
    return re.sub(r"[^A-Za-z0-9-]", "-", base)[:32] + "." + secrets.token_hex(4)


class BlobSender:
    """Uploads a batch as one JSON Lines blob per key and arrival hour, creating the container once."""

    def __init__(self, service: BlobServiceClient, maker: RecordMaker, *, instance: str | None = None) -> None:
        self._service = service
        self._container = service.get_container_client(CONTENT_CONTAINER)
        self._maker = maker
        self._instance = instance or instance_name()
        self._sequence = count(1)
        self._ready = False

    def _groups(self, batch: list[Pending]) -> dict[str, list[Pending]]:
        """The batch by blob prefix, each item's line made (once: a retried batch reuses it)."""
        groups: dict[str, list[Pending]] = {}
        for item in batch:
            if item.line is None:
                item.line = self._maker.line(item)
            groups.setdefault(hour_prefix(item.usage.time, item.usage.key_name), []).append(item)
        return groups

    async def send(self, batch: list[Pending]) -> None:
        groups = await asyncio.to_thread(self._groups, batch)  # parsing and JSON stay off the event loop
        if not self._ready:
            with contextlib.suppress(ResourceExistsError):
                await self._container.create_container(**_UPLOAD_OPTIONS)
            self._ready = True
        delivered: set[int] = set()
        try:
            for prefix, items in groups.items():
                name = f"{prefix}{self._instance}-{next(self._sequence):06d}.jsonl"
                data = b"".join(item.line + b"\n" for item in items if item.line is not None)
                await self._container.upload_blob(
                    name, data, overwrite=False, **_UPLOAD_OPTIONS,
                    content_settings=ContentSettings(content_type="application/x-ndjson"))
                delivered.update(id(item) for item in items)
        except ResourceNotFoundError:  # the container was deleted: make it again before the retry
            self._ready = False
            raise
        finally:
            if delivered:
                batch[:] = [item for item in batch if id(item) not in delivered]

    async def close(self) -> None:
        await self._service.close()


def content_publisher(settings: Settings, service: BlobServiceClient, *, linger: float) -> BatchPublisher[Pending]:
    """The content log's buffer and background sender."""
    return BatchPublisher(BlobSender(service, RecordMaker(settings)), what="content record", retry_on=BLOB_ERRORS,
                          capacity=10_000, batch_size=200, linger=linger, weigh=_weight,
                          max_weight=settings.content_log_buffer_bytes)
