"""Content records without servers: choices assembled from frames, the body as sent, redaction, truncation, buffer."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from gateway import SettingsError, load_settings
from gateway._contentlog import Pending, RecordMaker, Redactor, assemble, sent_request, truncate
from gateway._endpoints import endpoint
from gateway._publish import BatchPublisher
from gateway._records import UsageRecord
from gateway._request import Call, body_for
from gateway._settings import BackendConfig, Settings
from usage import BlobStorageConfig, StorageConfig


def usage_record(request_id: str = "req-1") -> UsageRecord:
    return UsageRecord(
        request_id=request_id, time="2026-11-29T13:45:00.5+00:00", key_name="team", deployment="gpt-4o", model="m",
        backend="eastus", operation="chat/completions", streaming=True, prompt_tokens=11, completion_tokens=7,
        total_tokens=18, cached_tokens=2, reasoning_tokens=0, usage_source="reported", status=200, latency_ms=1.0,
        ttfb_ms=1.0, outcome="complete")


def call(body: dict[str, Any], *, v1: bool = False) -> Call:
    raw = json.dumps(body).encode()
    options = body.get("stream_options")
    client_usage = isinstance(options, dict) and options.get("include_usage") is True
    stream = body.get("stream") is True
    return Call(endpoint=endpoint("chat/completions", v1=v1),
                deployment="gpt-4o", body=body, raw=raw, stream=stream, query="",
                api_version="2024-10-21", client_usage=client_usage, add_usage=stream and not client_usage)


def frame(document: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(document).encode() + b"\n\n"


def pending(received: list[bytes], body: dict[str, Any] | None = None, *, streamed: bool = True) -> Pending:
    request = call(body or {"messages": [{"role": "user", "content": "hi"}], "stream": streamed})
    return Pending(usage_record(), request, BackendConfig("eastus", "http://e"), streamed, streamed, received)


def test_stream_choices_are_assembled_per_index_across_split_frames() -> None:
    """Content, refusal, tool calls and finish reasons are put together per choice, whatever the read sizes."""
    stream = b"".join([
        frame({"choices": [], "prompt_filter_results": []}),
        frame({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}},
                           {"index": 1, "delta": {"role": "assistant", "content": None, "tool_calls": [
                               {"index": 0, "id": "call_a", "type": "function",
                                "function": {"name": "f", "arguments": ""}},
                               {"index": 1, "id": "call_b", "type": "function",
                                "function": {"name": "g", "arguments": "{}"}}]}}]}),
        frame({"choices": [{"index": 0, "delta": {"content": "Hel"}}]}),
        frame({"choices": [{"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"x"'}}]}}]}),
        frame({"choices": [{"index": 0, "delta": {"content": "lo"}}]}),
        frame({"choices": [{"index": 1, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}}]}),
        frame({"choices": [{"index": 2, "delta": {"refusal": "I can"}}]}),
        frame({"choices": [{"index": 2, "delta": {"refusal": "not."}, "finish_reason": "stop"}]}),
        frame({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}),
        frame({"choices": [{"index": 1, "delta": {}, "finish_reason": "tool_calls"}]}),
        b"data: [DONE]\n\n",
    ])
    pieces = [stream[i:i + 7] for i in range(0, len(stream), 7)]  # frames split anywhere
    assert assemble(pending(pieces)) == [
        {"index": 0, "content": "Hello", "tool_calls": [], "refusal": None, "finish_reason": "length"},
        {"index": 1, "content": None, "refusal": None, "finish_reason": "tool_calls", "tool_calls": [
            {"id": "call_a", "name": "f", "arguments": '{"x": 1}'}, {"id": "call_b", "name": "g", "arguments": "{}"}]},
        {"index": 2, "content": None, "tool_calls": [], "refusal": "I cannot.", "finish_reason": "stop"},
    ]


def test_a_malformed_frame_loses_only_itself() -> None:
    """A frame that is not JSON is skipped; the others still make the choice. Legacy completions use text."""
    stream = [frame({"choices": [{"index": 0, "text": "Once"}]}), b"data: {not json\n\n",
              frame({"choices": [{"index": 0, "text": " upon", "finish_reason": "stop"}]})]
    assert assemble(pending(stream))[0]["content"] == "Once upon"


def test_whole_body_choices() -> None:
    """A non-streamed answer's message is read from its body; an error body has no choices."""
    body = {"choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "refusal": None,
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}}]}
    assert assemble(pending([json.dumps(body).encode()], streamed=False)) == [
        {"index": 0, "content": None, "refusal": None, "finish_reason": "tool_calls",
         "tool_calls": [{"id": "c1", "name": "f", "arguments": "{}"}]}]
    assert assemble(pending([b'{"error": {"code": "content_filter"}}'], streamed=False)) == []
    assert assemble(pending([], streamed=False)) == []


@pytest.mark.parametrize(("body", "v1", "with_usage"), [
    ({"messages": [], "stream": True}, False, True),
    ({"messages": [], "stream": True}, False, False),
    ({"messages": [], "stream": True, "stream_options": {"include_usage": False, "x": 1}}, False, True),
    ({"model": "chat", "messages": [], "stream": True}, True, True),
    ({"model": "chat", "messages": [], "temperature": 0}, True, False),
])
def test_sent_request_is_the_body_the_backend_got(body: dict[str, Any], v1: bool, with_usage: bool) -> None:
    """The recorded request equals what body_for sends, renamed deployment and added stream_options included."""
    backend = BackendConfig("east", "http://e", deployments={"chat": "gpt-4o-east", "gpt-4o": "gpt-4o"})
    request = call(body, v1=v1)
    request.deployment = "chat" if v1 else "gpt-4o"
    assert sent_request(request, backend, with_usage=with_usage) == json.loads(
        body_for(request, backend, with_usage=with_usage))
    assert sent_request(request, None, with_usage=False) == body


def test_redactor_replaces_every_match_in_strings_not_keys() -> None:
    """Each pattern's matches become [redacted] in every string value; object keys and numbers stay."""
    redactor = Redactor([r"sk-\w{4}", r"(?i)password: \S+"])
    assert redactor.tree({"sk-abcd": ["sk-abcd and PASSWORD: hunter2", 5, None]}) == {
        "sk-abcd": ["[redacted] and [redacted]", 5, None]}
    split = [frame({"choices": [{"index": 0, "delta": {"content": part}}]}) for part in ("my s", "k-ab", "cd!")]
    choices = redactor.choices(assemble(pending(split)))
    assert choices[0]["content"] == "my [redacted]!"


def _settings(**overrides: Any) -> Settings:
    return Settings(backends=(BackendConfig("eastus", "http://e"),), storage=StorageConfig(connection_string="x=y"),
                    **overrides)


@pytest.mark.parametrize("prompt", ["x" * 50_000, "é" * 20_000 + "😀" * 5_000, "\n\"\\" * 9_000])
def test_truncated_records_fit_and_keep_ids_and_usage(prompt: str) -> None:
    """A long record is cut to the byte limit; its ids, usage and short strings survive whole."""
    maker = RecordMaker(_settings(content_log_max_bytes=4096))
    item = pending([frame({"choices": [{"index": 0, "delta": {"content": "short answer"}}]})],
                   {"messages": [{"role": "user", "content": prompt}], "stream": True})
    line = maker.line(item)
    assert len(line) <= 4096
    record = json.loads(line)
    assert record["truncated"] is True and record["request_id"] == "req-1" and record["key_name"] == "team"
    assert record["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18, "cached_tokens": 2,
                               "reasoning_tokens": 0}
    assert record["choices"][0]["content"] == "short answer"
    kept = record["request"]["messages"][0]["content"]
    assert prompt.startswith(kept) and len(json.dumps(kept)) > 2000  # cut, not emptied


def test_records_that_cannot_be_cut_enough_drop_their_content() -> None:
    """When no cut of the strings fits (thousands of numbers), the record keeps its ids without content."""
    record = {"request_id": "r", "usage": {"total_tokens": 3}, "request": {"input": list(range(5000))},
              "choices": [], "truncated": False}
    line = truncate(record, 4096)
    assert len(line) <= 4096
    assert json.loads(line) == {"request_id": "r", "usage": {"total_tokens": 3}, "request": None, "choices": [],
                                "truncated": True}


def test_short_records_are_left_whole() -> None:
    """A record within the limit is written as is, truncated false."""
    record = json.loads(RecordMaker(_settings()).line(pending([frame({"choices": [{"delta": {"content": "hi"}}]})])))
    assert record["truncated"] is False and record["choices"][0]["content"] == "hi"
    assert record["request"]["messages"] == [{"role": "user", "content": "hi"}]


class Collecting:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, batch: list[Pending]) -> None:
        self.sent.extend(item.usage.request_id for item in batch)

    async def close(self) -> None:
        return None


async def test_buffer_bounded_by_bytes_drops_oldest_with_a_count() -> None:
    """Past its byte budget the buffer drops its oldest records and counts them; emit never blocks."""
    sender = Collecting()
    publisher = BatchPublisher(sender, what="content record", retry_on=(OSError,), weigh=lambda p: p.size,
                               max_weight=2500, sleep=lambda _: asyncio.sleep(0))
    for n in range(5):
        item = pending([])
        item.usage = usage_record(f"req-{n}")
        item.size = 1000
        publisher.emit(item)  # not started: nothing drains the buffer
    assert publisher.dropped == 3 and publisher.pending == 2
    await publisher.close(flush_seconds=1)
    assert sender.sent == ["req-3", "req-4"]


async def test_a_sender_bug_drops_the_batch_instead_of_retrying_forever() -> None:
    """An error that is not a storage failure is logged and its batch dropped (counted); later ones still go."""

    class Buggy(Collecting):
        async def send(self, batch: list[Pending]) -> None:
            if batch[0].usage.request_id == "bad":
                raise TypeError("a bug")
            await super().send(batch)

    sender = Buggy()
    publisher = BatchPublisher(sender, what="content record", retry_on=(OSError,), batch_size=1)
    for request_id in ("bad", "good"):
        item = pending([])
        item.usage = usage_record(request_id)
        publisher.emit(item)
    await publisher.close(flush_seconds=1)
    assert sender.sent == ["good"] and publisher.dropped == 1


@pytest.mark.parametrize(("env", "named"), [
    ({"CONTENT_LOG_REDACT": "[\"(unclosed\"]"}, "CONTENT_LOG_REDACT"),
    ({"CONTENT_LOG_REDACT": "\"sk-.*\""}, "CONTENT_LOG_REDACT"),
    ({"CONTENT_LOG_MAX_BYTES": "100"}, "CONTENT_LOG_MAX_BYTES"),
    ({"CONTENT_LOG": "not a connection string"}, "CONTENT_LOG"),
    ({"CONTENT_LOG__blobServiceUri": "myaccount.blob.core.windows.net"}, "CONTENT_LOG__blobServiceUri"),
])
def test_bad_content_log_settings_are_named(env: dict[str, str], named: str) -> None:
    """A malformed content-log setting stops start-up with an error naming it."""
    base = {"AOAI_BACKENDS": '[{"name": "e", "endpoint": "http://e"}]', "UsageStorage": "UseDevelopmentStorage=true"}
    with pytest.raises(SettingsError) as caught:
        load_settings({**base, **env})
    assert caught.value.name == named


def test_content_log_settings_are_read() -> None:
    """CONTENT_LOG__blobServiceUri means managed identity; the defaults are 1 MiB and no redaction."""
    base = {"AOAI_BACKENDS": '[{"name": "e", "endpoint": "http://e", "api_key": "k"}]',
            "UsageStorage": "UseDevelopmentStorage=true"}
    assert load_settings(base).content_log is None
    settings = load_settings({**base, "CONTENT_LOG__blobServiceUri": "https://acct.blob.core.windows.net/",
                              "CONTENT_LOG_REDACT": '["sk-\\\\w+"]'})
    assert settings.content_log == BlobStorageConfig(blob_service_uri="https://acct.blob.core.windows.net")
    assert settings.needs_credential and settings.content_log_redact == ("sk-\\w+",)
    assert settings.content_log_max_bytes == 1024 * 1024


@pytest.mark.parametrize("separators", [(",", ":"), (", ", ": ")])
def test_compact_and_spaced_streams_give_the_same_choice(separators: tuple[str, str]) -> None:
    """AOAI's compact frames are read by a scan, others by parsing: both give the same text, escapes decoded."""
    words = ["Say \"hi\"", " \\ to", " café\n", " 😀", "", " done"]
    frames = [b"data: " + json.dumps({"choices": [], "prompt_filter_results": [{"prompt_index": 0}]},
                                     separators=separators).encode() + b"\n\n"]
    frames += [b"data: " + json.dumps({"id": "x", "choices": [{"content_filter_results": {"hate": {"severity": "safe"}},
                                                                "delta": {"content": w}, "finish_reason": None,
                                                                "index": 0}]}, separators=separators).encode()
               + b"\n\n" for w in words]
    frames.append(b"data: " + json.dumps({"choices": [{"delta": {}, "finish_reason": "stop", "index": 0}],
                                          "usage": None}, separators=separators).encode() + b"\n\n")
    frames.append(b"data: [DONE]\n\n")
    assert assemble(pending(frames)) == [{"index": 0, "content": "".join(words), "tool_calls": [], "refusal": None,
                                          "finish_reason": "stop"}]


def test_a_cut_responses_stream_records_what_was_sent() -> None:
    """Without a terminal event, the text and function-call arguments sent so far make the choice."""
    from gateway._contentlog import _responses_stream

    events = [
        {"type": "response.created", "response": {"status": "in_progress"}},
        {"type": "response.output_item.added", "output_index": 0, "item": {"type": "message", "content": []}},
        {"type": "response.output_text.delta", "output_index": 0, "delta": "Hel"},
        {"type": "response.output_text.delta", "output_index": 0, "delta": "lo"},
        {"type": "response.output_item.added", "output_index": 1,
         "item": {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": ""}},
        {"type": "response.function_call_arguments.delta", "output_index": 1, "delta": '{"city":'},
    ]
    assert _responses_stream(events) == [{"index": 0, "content": "Hello", "refusal": None,
                                          "tool_calls": [{"id": "call_1", "name": "get_weather",
                                                          "arguments": '{"city":'}],
                                          "finish_reason": "in_progress"}]
