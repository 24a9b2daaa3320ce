"""Poison messages never fail a batch: they land in usagerejects, the rest is counted (real Azurite)."""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hostile import MESSAGE_IDS, Message, batches
from tests.test_aggregate import counters, event, expected
from usage import StorageConfig, open_table_service
from usage._aggregate import Aggregator
from usage._rejects import reject_entity
from usage._schema import COUNTERS, REJECTS_TABLE, USAGE_TABLE
from usage._tables import as_int, int64

_KEY_REFUSED = re.compile(r"[/\\#?\x00-\x1f\x7f-\x9f]")


@pytest.fixture
async def service(storage: str) -> AsyncIterator[Any]:
    async with open_table_service(StorageConfig(connection_string=storage)) as client:
        yield client


def _units(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def fits_table_storage(entity: dict[str, Any]) -> bool:
    """Keys of at most 1 KiB without refused characters, strings of 64 KiB, the entity under 1 MiB."""
    keys = all(_units(entity[k]) <= 512 and not _KEY_REFUSED.search(entity[k]) for k in ("PartitionKey", "RowKey"))
    strings = [v for v in entity.values() if isinstance(v, str)]
    size = sum(2 * _units(v) for v in strings) + sum(2 * len(name) + 16 for name in entity)
    return keys and all(_units(v) <= 32_768 for v in strings) and size < 1024 * 1024


def sha256(body: bytes | str) -> str:
    return hashlib.sha256(body if isinstance(body, bytes) else body.encode("utf-8", "surrogatepass")).hexdigest()


async def rejects_of(service: Any, body: bytes | str) -> list[dict[str, Any]]:
    table = service.get_table_client(REJECTS_TABLE)
    return [e async for e in table.query_entities("BodySha256 eq @h", parameters={"h": sha256(body)})]


async def counted_with(service: Any, bad: list[bytes], ids: list[str] | None = None) -> list[dict[str, Any]]:
    """Aggregates ``bad`` amid good events; asserts the good ones counted exactly; the rejects of ``bad``."""
    key = f"k{uuid.uuid4().hex[:8]}"
    good = [event(key, n) for n in range(6)]
    bodies = [*good[:3], *bad, *good[3:]]
    message_ids = None if ids is None else [*(f"g-{key}-{n}" for n in range(3)), *ids,
                                            *(f"g-{key}-{n}" for n in range(3, 6))]
    result = await Aggregator(service).aggregate(bodies, message_ids=message_ids)
    assert (result.counted, result.rejected) == (6, len(bad))
    assert await counters(service, key, "month|2026-11|gpt-4o") == expected(good)
    rejects = [entity for body in bad for entity in await rejects_of(service, body)]
    assert len(rejects) == len(bad) and all(fits_table_storage(r) for r in rejects)
    return rejects


def with_field(name: str, value: Any) -> bytes:
    document = json.loads(event(f"k{uuid.uuid4().hex[:8]}", 1))
    return json.dumps({**document, name: value}).encode()


async def test_body_nested_a_hundred_thousand_deep_is_rejected(service: Any) -> None:
    """100,000 '[' then 100,000 ']' is kept as a reject; its batch is counted."""
    [reject] = await counted_with(service, [b"[" * 100_000 + b"]" * 100_000])
    assert reject["BodyBytes"] == 200_000 and reject["Body"].startswith("[[[[")


async def test_body_nested_too_deep_to_parse_within_the_size_bound_is_rejected(service: Any) -> None:
    """An event carrying a field nested 30,000 deep cannot be parsed, so it is rejected, not raised."""
    body = with_field("deep", "x")[:-1] + b', "deeper": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"
    [reject] = await counted_with(service, [body])
    assert "nested too deep" in reject["Reason"]


@pytest.mark.parametrize("time", ["0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-14:00"])
async def test_time_whose_utc_is_out_of_range_is_rejected(service: Any, time: str) -> None:
    """A time that cannot be converted to UTC is rejected, naming the field and the years allowed."""
    [reject] = await counted_with(service, [with_field("time", time)])
    assert "'time'" in reject["Reason"] and "2000-2200" in reject["Reason"]


async def test_token_count_of_two_to_the_seventy_is_rejected(service: Any) -> None:
    """total_tokens of 2**70 is refused before it reaches a transaction."""
    [reject] = await counted_with(service, [with_field("total_tokens", 2**70)])
    assert "'total_tokens'" in reject["Reason"] and "1,000,000,000,000" in reject["Reason"]


async def test_reject_of_forty_thousand_emoji_fits_table_storage(service: Any) -> None:
    """A 160 KB non-JSON body is kept cut to fit a property, with its length and hash."""
    body = ("😀" * 40_000).encode()
    [reject] = await counted_with(service, [body], ids=["emoji-message"])
    assert reject["Body"] == "😀" * 8_192 and reject["BodyBytes"] == 160_000
    assert reject["BodySha256"] == sha256(body) and reject["MessageId"] == "emoji-message"


async def test_hostile_ids_and_text_bodies_are_kept_readable(service: Any) -> None:
    """Bad UTF-8, lone surrogates, NUL and huge or odd message ids still give a valid reject row."""
    bad: list[Any] = [b"\xff\xfe\x00bad", "\ud800 lone \x00", "x" * 70_000]
    rejects = await counted_with(service, bad, ids=["a/b#c?d\\e", "\udfff" * 3_000, "😀" * 600])
    by_sha = {r["BodySha256"]: r for r in rejects}
    assert by_sha[sha256(bad[0])]["Body"] == "\\xff\\xfe\\x00bad"
    assert by_sha[sha256(bad[1])]["Body"] == "\\ud800 lone \\x00"
    assert by_sha[sha256(bad[0])]["MessageId"] == "a/b#c?d\\e"


async def test_redelivered_poison_keeps_one_reject_row_per_message(service: Any) -> None:
    """Three deliveries of the same bad messages, with and without ids, leave one row each."""
    tag = uuid.uuid4().hex
    bad = [f"no id {tag}".encode(), f"odd id {tag}".encode(), f"plain id {tag}".encode(), f"plain id {tag}".encode()]
    ids = [None, "odd/id", f"plain-{tag}", f"other-{tag}"]
    aggregator = Aggregator(service)
    for _ in range(3):
        assert (await aggregator.aggregate(bad, message_ids=ids)).rejected == 4
    rows = Counter([r["MessageId"] for body in set(bad) for r in await rejects_of(service, body)])
    assert rows == {"": 1, "odd/id": 1, f"plain-{tag}": 1, f"other-{tag}": 1}


async def test_event_that_would_take_a_counter_past_int64_is_rejected(service: Any) -> None:
    """Near a full Int64 counter, an event that would overflow it is rejected and smaller ones still count."""
    key = f"k{uuid.uuid4().hex[:8]}"
    table = service.get_table_client(USAGE_TABLE)
    full = 2**63 - 1 - 100
    await table.create_entity({"PartitionKey": f"2026-11|{key}", "RowKey": "month|2026-11|gpt-4o",
                               **{name: int64(0) for name in COUNTERS}, "TotalTokens": int64(full)})
    small, large, other = (json.loads(event(key, n)) for n in range(3))
    small["total_tokens"], large["total_tokens"] = 60, 60
    other["deployment"] = "gpt-4o-mini"
    bodies = [json.dumps(d).encode() for d in (small, large, other)]
    result = await Aggregator(service).aggregate(bodies)
    assert (result.counted, result.rejected) == (2, 1)
    month = await table.get_entity(f"2026-11|{key}", "month|2026-11|gpt-4o")
    assert (as_int(month["Requests"]), as_int(month["TotalTokens"])) == (1, full + 60)
    assert (await counters(service, key, "month|2026-11|gpt-4o-mini"))["Requests"] == 1
    [reject] = await rejects_of(service, bodies[1])
    assert "Int64" in reject["Reason"]


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.binary(max_size=600) | st.text(max_size=600) | st.integers(1, 200_000).map(lambda n: "\ud83d😀" * n),
       message_id=st.none() | MESSAGE_IDS, reason=st.text(max_size=3_000))
def test_every_reject_row_fits_table_storage(body: bytes | str, message_id: str | None, reason: str) -> None:
    """Whatever the body, id and reason, the reject row's keys and properties are within Table Storage's limits."""
    entity = reject_entity(body, reason, message_id, datetime.now(UTC))
    assert fits_table_storage(entity)
    assert reject_entity(body, "again", message_id, datetime.now(UTC))["RowKey"] == entity["RowKey"]


def _month_rows(key: str, documents: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, int]]:
    """What the month rows of ``key`` must hold after counting ``documents``, computed from the README."""
    rows: dict[tuple[str, str], dict[str, int]] = {}
    for document in documents:
        month = f"{datetime.fromisoformat(document['time']).astimezone(UTC):%Y-%m}"
        row = rows.setdefault((f"{month}|{key}", f"month|{month}|{document['deployment']}"), dict.fromkeys(COUNTERS, 0))
        tokens = {name: document.get(name, 0) for name in ("prompt_tokens", "completion_tokens", "total_tokens",
                                                           "cached_tokens", "reasoning_tokens")}
        for name, amount in zip(COUNTERS, (1, *tokens.values(), tokens["total_tokens"]
                                           if document["usage_source"] == "estimated" else 0), strict=True):
            row[name] += amount
    return rows


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(batch=batches())
async def test_hostile_batches_never_fail_and_count_every_event_exactly_once(
        service: Any, batch: list[tuple[Message, bool]]) -> None:
    """Generated batches of good events and hostile messages, sent twice, count the good once and reject the rest."""
    key = f"h{uuid.uuid4().hex[:12]}"
    bodies: list[bytes | str] = []
    ids: list[str | None] = []
    good: list[dict[str, Any]] = []
    hostile: list[tuple[str | None, bytes | str]] = []
    for message, twice in batch:
        event_id = f"e{uuid.uuid4().hex}"
        body = message.render(key, event_id)
        copies = 2 if twice and message.counts else 1  # a good event repeated in its batch counts once
        bodies += [body] * copies
        ids += [message.message_id] * copies
        if message.counts:
            good.append(message.document(key, event_id))
        else:
            hostile.append((message.message_id, body))
    started = datetime.now(UTC)
    aggregator = Aggregator(service)
    first = await aggregator.aggregate(bodies, message_ids=ids)
    again = await aggregator.aggregate(bodies, message_ids=ids)
    assert (first.counted, first.rejected, again.counted, again.rejected) == (len(good), len(hostile), 0, len(hostile))
    table = service.get_table_client(USAGE_TABLE)
    for (pk, row), wanted in _month_rows(key, good).items():
        entity = await table.get_entity(pk, row)
        assert {name: as_int(entity[name]) for name in COUNTERS} == wanted
    rejects = service.get_table_client(REJECTS_TABLE)
    recent = [e async for e in rejects.query_entities("RejectedAt ge @t", parameters={"t": started})]
    shas = {sha256(body) for _, body in hostile}
    mine = [e for e in recent if e["BodySha256"] in shas]
    assert {e["BodySha256"] for e in mine} == shas and len(mine) == len(set(hostile))
    assert all(fits_table_storage(e) for e in mine)
