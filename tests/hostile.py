"""Hypothesis strategies for usage messages: events that must count, and hostile messages that must not.

A generated ``Message`` is a template: the test gives it its key name and event id when it renders
it, so each example writes to rows of its own. Whether a message counts is decided here, from the
README's rules, never by calling the decoder.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import strategies as st

MAX_TOKENS = 10**12  # the README's bounds, written again: generated messages sit on both sides of each
MAX_BODY_BYTES = 64 * 1024
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
LATEST = datetime(2201, 1, 1, tzinfo=UTC)
TOKEN_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens")
REQUIRED = ("time", "event_id", "key_name", "deployment", "schema", "operation", "usage_source")
_MISSING = object()

# any character, lone surrogates and the ones Table Storage refuses in keys included
_CHARACTERS = st.one_of(st.characters(), st.characters(categories=["Cs"]), st.sampled_from("/\\#?|,\x00\x7f😀"))
_TEXT = st.text(_CHARACTERS, max_size=40)
_PLAIN = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
_JSON = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers(-(2**80), 2**80) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3), max_leaves=8)
_NOT_TEXT = st.none() | st.booleans() | st.floats() | st.integers(-(2**80), 2**80) | st.lists(_JSON, max_size=2) \
    | st.dictionaries(_TEXT, _JSON, max_size=2)


def _nested(depth: int) -> Any:
    value: Any = []
    for _ in range(depth - 1):
        value = [value]
    return value


@dataclass(frozen=True)
class Message:
    """A valid event's fields, one field changed or removed (``_MISSING``), and how the body is shaped."""

    fields: dict[str, Any]
    counts: bool
    change: tuple[str, Any] | None = None
    shape: str = "json"  # json, repeated, padded, deep, listed, raw
    raw: bytes | str = b""
    message_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def document(self, key: str, event_id: str) -> dict[str, Any]:
        document = {**self.fields, "key_name": key, "event_id": event_id, **self.extra}
        if self.change is not None:
            name, value = self.change
            if value is _MISSING:
                del document[name]
            else:
                document[name] = value
        return document

    def render(self, key: str, event_id: str) -> bytes | str:
        if self.shape == "raw":
            return self.raw
        text = json.dumps(self.document(key, event_id))
        if self.shape == "repeated":  # a field given twice, the second time with the same value
            name = next(iter(self.fields))
            text = f'{{{json.dumps(name)}: {json.dumps(self.fields[name])}, {text[1:]}'
        elif self.shape == "padded":
            text = text[:-1] + ', "padding": "' + "x" * MAX_BODY_BYTES + '"}'
        elif self.shape == "deep":
            text = text[:-1] + ', "deep": ' + "[" * 30_000 + "]" * 30_000 + "}"
        elif self.shape == "listed":
            text = f"[{text}]"
        return text.encode()


def _iso(utc: datetime, offset_minutes: int) -> str:
    return utc.replace(tzinfo=UTC).astimezone(timezone(timedelta(minutes=offset_minutes))).isoformat()


_OFFSETS = st.integers(-14 * 60, 14 * 60)
_GOOD_UTC = st.one_of(  # anywhere in the window, and often within a day of its edges
    st.datetimes(datetime(2000, 1, 1), datetime(2200, 12, 31, 23, 59, 59, 999999)),
    st.datetimes(datetime(2000, 1, 1), datetime(2000, 1, 2)),
    st.datetimes(datetime(2200, 12, 31), datetime(2200, 12, 31, 23, 59, 59, 999999)))
GOOD_TIMES = st.builds(_iso, _GOOD_UTC, _OFFSETS)
_TOKENS = st.one_of(st.integers(0, 5_000), st.just(MAX_TOKENS), st.integers(0, MAX_TOKENS))


@st.composite
def good_fields(draw: st.DrawFn) -> dict[str, Any]:
    """A valid event without its key name and id, with junk in fields the aggregator ignores."""
    fields: dict[str, Any] = {
        "schema": 1, "time": draw(GOOD_TIMES), "deployment": draw(st.sampled_from(["gpt-4o", "gpt-4o-mini"]) | _PLAIN),
        "model": draw(_TEXT), "backend": draw(_TEXT), "operation": draw(_TEXT.filter(bool)),
        "streaming": draw(_JSON), "usage_source": draw(st.sampled_from(["reported", "estimated", "none"])
                                                       | _TEXT.filter(bool)),
        "status": draw(st.integers(0, 999)), "latency_ms": draw(_JSON), "outcome": draw(_JSON),
        "nested": _nested(draw(st.integers(1, 40))),
    }
    for name in TOKEN_FIELDS:
        if draw(st.integers(0, 9)):  # a missing count is 0
            fields[name] = draw(_TOKENS)
    return fields


def _aware_in_window(text: str) -> bool:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        return False
    if when.utcoffset() is None or not 1 < when.year < 9999:
        return False
    return EARLIEST <= when.astimezone(UTC) < LATEST


_BAD_TIMES = st.one_of(
    st.sampled_from(["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00", "1999-12-31T23:59:59.999999+00:00",
                     "2201-01-01T00:00:00+00:00", "2000-01-01T00:00:00+00:01", "2200-12-31T23:59:59-00:01", ""]),
    st.builds(_iso, st.datetimes(datetime(1, 1, 2), datetime(1999, 12, 31, 23, 59)), _OFFSETS),
    st.builds(_iso, st.datetimes(datetime(2201, 1, 1), datetime(9999, 12, 30)), _OFFSETS),
    st.datetimes(datetime(2000, 1, 1), datetime(2200, 12, 31)).map(datetime.isoformat),  # no zone
    st.text("0123456789-:T+Z. WÅ", max_size=32).filter(lambda t: not _aware_in_window(t)),
    _NOT_TEXT,
)
_BAD_COUNTS = st.one_of(
    st.integers(max_value=-1), st.integers(MAX_TOKENS + 1, 2**200), st.sampled_from([2**63 - 1, 2**63, 2**64, 2**70]),
    st.floats(), st.booleans(), st.none(), _TEXT, st.lists(st.integers(0, 5), max_size=2))
_BAD_NAMES = st.one_of(
    st.just(""), st.text("ab", min_size=65, max_size=2_000), _NOT_TEXT,
    st.builds(lambda a, c, b: a + c + b, _PLAIN, _CHARACTERS.filter(lambda c: not re.fullmatch(r"[A-Za-z0-9._-]", c)),
              _PLAIN))
_BAD_IDS = st.one_of(
    st.from_regex(r"[A-Za-z0-9_-]{1,7}", fullmatch=True), st.from_regex(r"[A-Za-z0-9_-]{65,300}", fullmatch=True),
    _NOT_TEXT, st.builds(lambda a, c: a + c, st.from_regex(r"[A-Za-z0-9_-]{8,20}", fullmatch=True),
                         _CHARACTERS.filter(lambda c: not re.fullmatch(r"[A-Za-z0-9_-]", c))))
_CHANGES = [  # drawn by index (which favours the first a little), token counts and time first
    st.tuples(st.sampled_from(TOKEN_FIELDS), _BAD_COUNTS),
    st.tuples(st.just("time"), _BAD_TIMES),
    st.tuples(st.sampled_from(["key_name", "deployment"]), _BAD_NAMES),
    st.tuples(st.just("event_id"), _BAD_IDS),
    st.tuples(st.just("status"), st.one_of(st.integers(max_value=-1), st.integers(min_value=1000), st.floats(),
                                           st.booleans(), _TEXT)),
    st.tuples(st.sampled_from(REQUIRED), st.just(_MISSING)),
    st.tuples(st.just("schema"), st.one_of(st.integers().filter(lambda n: n != 1), st.sampled_from([True, 1.0, "1"]),
                                           _NOT_TEXT.filter(lambda v: not (type(v) is int and v == 1)))),
    st.tuples(st.sampled_from(["operation", "usage_source"]), _NOT_TEXT | st.just("")),
    st.tuples(st.sampled_from(["model", "backend"]), _NOT_TEXT),
]
_RAW = st.one_of(
    st.binary(max_size=300), st.text(_CHARACTERS, max_size=300),
    st.integers(1, 100_000).map(lambda n: b"[" * n + b"]" * n),
    st.integers(1, 40_000).map(lambda n: ("😀" * n).encode()), st.integers(1, 20_000).map(lambda n: "\ud83d" * n),
    st.sampled_from([b"", b" ", b"null", b"1", b'"event"', b"{}", b"NaN", b"\xef\xbb\xbf{}", b"\x00" * 10]),
)
MESSAGE_IDS = st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9-]{8,40}", fullmatch=True), _TEXT,
                        st.text(_CHARACTERS, min_size=1_000, max_size=3_000))


@st.composite
def good_messages(draw: st.DrawFn) -> Message:
    """An event that must be counted."""
    return Message(draw(good_fields()), counts=True, message_id=draw(MESSAGE_IDS))


@st.composite
def hostile_messages(draw: st.DrawFn) -> Message:
    """A message that must not be counted: an event with one field broken, a bad shape, or no event at all."""
    kind = draw(st.sampled_from(["change", "shape", "raw", "change", "change"]))
    message_id = draw(MESSAGE_IDS)
    if kind == "raw":
        return Message({}, counts=False, shape="raw", raw=draw(_RAW), message_id=message_id)
    fields = draw(good_fields())
    if kind == "shape":
        shape = draw(st.sampled_from(["repeated", "padded", "deep", "listed"]))
        return Message(fields, counts=False, shape=shape, message_id=message_id)
    return Message(fields, counts=False, change=draw(draw(st.sampled_from(_CHANGES))), message_id=message_id)


@st.composite
def batches(draw: st.DrawFn) -> list[tuple[Message, bool]]:
    """Good events (each flagged to be sent twice in the batch or not) and hostile messages, shuffled."""
    good = draw(st.lists(st.tuples(good_messages(), st.booleans()), max_size=6))
    bad = draw(st.lists(st.tuples(hostile_messages(), st.just(False)), min_size=1, max_size=10))
    return draw(st.permutations(good + bad))
