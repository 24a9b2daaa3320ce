"""Pieces of the Responses API and media support on their own: the relay, forms, usage shapes, event ids."""

from __future__ import annotations

import json
import re

import pytest

from devkit._sim_responses import ResponsesApi
from gateway import BadRequest, Usage
from gateway._multipart import boundary_of, parse_form
from gateway._responses_api import ResponsesRelay, background_event_id, stream_cut_event


def simulated_stream(**body: object) -> tuple[ResponsesApi, bytes]:
    api = ResponsesApi(output_tokens=12)
    stored = api.create({"model": "gpt-4o", "input": "Hi", **body})
    return api, b"".join(api.events(stored))


@pytest.mark.parametrize("step", [1, 7, 64, 4096])
def test_relay_passes_bytes_unchanged_whatever_the_reads(step: int) -> None:
    """Frames go out whole and unchanged; the response is read from its first and terminal events."""
    api, stream = simulated_stream()
    relay = ResponsesRelay()
    out = b"".join(relay.feed(stream[i:i + step]) for i in range(0, len(stream), step)) + relay.finish()
    assert out == stream
    assert relay.first is not None and relay.first.status == "in_progress"
    assert relay.final is not None and relay.final.status == "completed" and relay.final.terminal
    reported = api.reported[relay.final.id]
    assert relay.final.usage == Usage(reported["input_tokens"], reported["output_tokens"], reported["total_tokens"])
    assert relay.completion_text() == "".join(api.words())  # deltas only: the done events repeat the text
    assert relay.sequence == stream.count(b"event: ") - 1


def test_relay_of_a_cut_stream_knows_where_it_stopped() -> None:
    """Before the terminal event there is no usage; the error event follows the last sequence number."""
    _, stream = simulated_stream(background=True)
    half = stream[:stream.index(b"event: response.output_text.done")]
    relay = ResponsesRelay()
    assert relay.feed(half + b"event: response.output_text.delta\ndata: {") == half
    assert relay.final is None and relay.first is not None and relay.first.background
    event = stream_cut_event(relay.sequence)
    payload = json.loads(event.split(b"data: ", 1)[1])
    assert event.startswith(b"event: error\n") and payload["sequence_number"] == relay.sequence + 1  # type: ignore[operator]
    assert payload["error"]["code"] == payload["code"] == "BackendStreamInterrupted"


def test_usage_in_either_naming() -> None:
    """Chat's prompt/completion names and the Responses/images/transcription input/output names both read;
    Whisper's duration is no token usage."""
    responses = {"input_tokens": 30, "input_tokens_details": {"cached_tokens": 8}, "output_tokens": 12,
                 "output_tokens_details": {"reasoning_tokens": 5}, "total_tokens": 42}
    assert Usage.from_body(responses) == Usage(30, 12, 42, cached_tokens=8, reasoning_tokens=5)
    assert Usage.from_body({"prompt_tokens": 3, "total_tokens": 3}) == Usage(3, 0, 3)
    assert Usage.from_body({"type": "duration", "seconds": 7}) is None
    assert Usage.from_body({"input_tokens": -1}) is None  # a negative count is no count (nor a poison event)


def test_background_event_id_is_stable_and_a_valid_event_id() -> None:
    """The same response gives the same id everywhere; it passes the event schema's id rule."""
    first = background_event_id("resp_abc123")
    assert first == background_event_id("resp_abc123") != background_event_id("resp_abc124")
    assert re.fullmatch(r"[A-Za-z0-9_-]{8,64}", first)


def test_form_model_is_replaced_in_place() -> None:
    """Only the model field's bytes change; file parts and the boundary stay byte for byte."""
    boundary = boundary_of('multipart/form-data; boundary="b0und"')
    assert boundary == b"b0und"
    raw = (b"--b0und\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.wav\"\r\n\r\n"
           b"\x00\x01name=\"model\"\r\n--b0und\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
           b"whisper\r\n--b0und--\r\n")
    form = parse_form(raw, boundary)
    assert form.value("model") == "whisper" and form.value("file") is None
    assert form.replaced("model", "whisper-east") == raw.replace(b"\r\n\r\nwhisper\r\n", b"\r\n\r\nwhisper-east\r\n")
    assert boundary_of("application/json") is None
    for broken in (b"no delimiter", b"--b0und\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nnever closed"):
        with pytest.raises(BadRequest):
            parse_form(broken, boundary)
