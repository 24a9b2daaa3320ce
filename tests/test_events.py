"""The usage event decoder: what it counts, what it refuses, and that it refuses by MalformedEvent only."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile import Message, good_messages, hostile_messages
from usage import MalformedEvent, decode_event
from usage import _events as events

GOOD = {"schema": 1, "event_id": "0123456789abcdef", "time": "2026-11-29T13:45:12.345+00:00", "key_name": "team-a",
        "deployment": "gpt-4o", "model": "gpt-4o-2024-08-06", "backend": "eastus", "operation": "chat/completions",
        "streaming": True, "prompt_tokens": 15, "completion_tokens": 20, "total_tokens": 35, "cached_tokens": 0,
        "reasoning_tokens": 0, "usage_source": "reported", "status": 200, "latency_ms": 480.2, "outcome": "complete"}


def body(**changes: Any) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


@pytest.mark.parametrize(("time", "utc"), [
    ("2000-01-01T00:00:00+00:00", datetime(2000, 1, 1, tzinfo=UTC)),
    ("1999-12-31T10:00:00-14:00", datetime(2000, 1, 1, tzinfo=UTC)),
    ("2201-01-01T13:59:59+14:00", datetime(2200, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ("2026-11-29T13:45:12Z", datetime(2026, 11, 29, 13, 45, 12, tzinfo=UTC)),
])
def test_times_at_the_edges_of_the_window_are_counted_in_utc(time: str, utc: datetime) -> None:
    """A time inside 2000-2200 UTC is accepted whatever its offset, and normalised to UTC."""
    assert decode_event(body(time=time)).time == utc


@pytest.mark.parametrize("time", ["1999-12-31T23:59:59.999999+00:00", "2000-01-01T13:59:59+14:00",
                                  "2201-01-01T00:00:00+00:00", "2200-12-31T23:59:59-00:01",
                                  "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "2026-11-29T13:45:12"])
def test_times_outside_the_window_or_without_zone_are_refused(time: str) -> None:
    """A time outside 2000-2200 UTC, or without a zone, is a MalformedEvent naming 'time'."""
    with pytest.raises(MalformedEvent, match="'time'"):
        decode_event(body(time=time))


def test_largest_token_count_is_counted() -> None:
    """10**12 tokens in every field is still an event."""
    fields = {name: 10**12 for name in ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")}
    assert decode_event(body(**fields)).total_tokens == 10**12


@pytest.mark.parametrize(("changes", "reason"), [
    ({"total_tokens": 10**12 + 1}, "'total_tokens' must be a whole number from 0"),
    ({"prompt_tokens": True}, "'prompt_tokens' must be a whole number"),
    ({"cached_tokens": 3.0}, "'cached_tokens' must be a whole number"),
    ({"completion_tokens": float("nan")}, "'completion_tokens' must be a whole number"),
    ({"reasoning_tokens": -1}, "'reasoning_tokens' must be a whole number"),
    ({"status": True}, "'status' must be a whole number from 0 to 999"),
    ({"status": 1000}, "'status' must be a whole number from 0 to 999"),
    ({"schema": True}, "unsupported schema True"),
    ({"schema": 1.0}, "unsupported schema 1.0"),
    ({"key_name": "team/a"}, "'key_name' is not a plain name"),
    ({"deployment": "x" * 65}, "'deployment' is not a plain name"),
    ({"event_id": "id,with,commas"}, "'event_id' is not a plain name"),
])
def test_fields_out_of_bounds_are_refused_with_a_reason(changes: dict[str, Any], reason: str) -> None:
    """Token counts, status, schema and names outside their bounds are refused, saying which field and why."""
    with pytest.raises(MalformedEvent, match=reason.replace("(", r"\(")):
        decode_event(body(**changes))


@pytest.mark.parametrize(("raw", "reason"), [
    (b"[" * 100_000 + b"]" * 100_000, "more than a usage event's 65,536"),
    (body()[:-1] + b', "deep": ' + b"[" * 30_000 + b"]" * 30_000 + b"}", "nested too deep to parse"),
    (b'{"total_tokens": 1, ' + body()[1:], "field 'total_tokens' is given twice"),
    (body()[:-1] + b', "big": ' + b"9" * 5_000 + b"}", "not JSON"),
    (b"\xff\xfe\xfd", "not JSON"),
    (b"[" + body() + b"]", "not a JSON object"),
])
def test_bodies_that_cannot_be_read_are_refused_with_a_reason(raw: bytes, reason: str) -> None:
    """Oversized, over-deep, ambiguous, undecodable and non-object bodies are MalformedEvents."""
    with pytest.raises(MalformedEvent, match=reason):
        decode_event(raw)


def test_junk_in_fields_it_does_not_read_does_not_refuse_an_event() -> None:
    """NaN, Infinity, nesting and unknown fields outside the counted ones are ignored."""
    raw = body(latency_ms=float("nan"))[:-1] + b', "ttfb_ms": -Infinity, "x": [[[{"y": null}]]]}'
    assert decode_event(raw).total_tokens == 35


_FUZZ = settings(max_examples=1_000, deadline=None, suppress_health_check=list(HealthCheck))


@_FUZZ
@given(raw=st.binary(max_size=2_000) | st.text(max_size=2_000)
       | st.builds(lambda a, b: a + b, st.sampled_from([b'{"schema": 1, ', b"[[[", b'{"a":']), st.binary(max_size=200)))
def test_decoder_raises_only_malformed_event_on_arbitrary_input(raw: bytes | str) -> None:
    """Any bytes or text either decode to an event or raise MalformedEvent, nothing else."""
    try:
        decode_event(raw)
    except MalformedEvent as exc:
        assert str(exc)


@_FUZZ
@given(message=hostile_messages())
def test_hostile_messages_are_refused(message: Message) -> None:
    """Every generated hostile message is a MalformedEvent with a short reason."""
    with pytest.raises(MalformedEvent) as refused:
        decode_event(message.render("team-a", "0123456789abcdef"))
    assert 0 < len(str(refused.value)) < 400


@_FUZZ
@given(message=good_messages())
def test_good_messages_decode_to_their_counts_in_utc(message: Message) -> None:
    """Every generated good event decodes, with its counts as sent and its time in UTC inside the window."""
    document = message.document("team-a", "0123456789abcdef")
    event = decode_event(message.render("team-a", "0123456789abcdef"))
    assert event.time == datetime.fromisoformat(document["time"]) and event.time.tzinfo is UTC
    assert events.EARLIEST <= event.time < events.LATEST
    assert event.total_tokens == document.get("total_tokens", 0) and event.deployment == document["deployment"]
