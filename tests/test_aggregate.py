"""Aggregation into real Table Storage (Azurite): every token counted exactly once."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from usage import StorageConfig, open_table_service
from usage._aggregate import Aggregator
from usage._schema import REJECTS_TABLE, USAGE_TABLE
from usage._tables import as_int

BASE = datetime(2026, 11, 29, 13, 45, 10, tzinfo=UTC)


def event(key: str, n: int, *, deployment: str = "gpt-4o", minute: int = 0, estimated: bool = False) -> bytes:
    return json.dumps({
        "schema": 1, "event_id": f"{key}-{n:06d}-{uuid.uuid5(uuid.NAMESPACE_OID, key).hex[:8]}",
        "time": (BASE + timedelta(minutes=minute, seconds=n % 40)).isoformat(),
        "key_name": key, "deployment": deployment, "model": "gpt-4o-2024-08-06", "backend": "eastus",
        "operation": "chat/completions", "streaming": True, "prompt_tokens": 10 + n % 7,
        "completion_tokens": 20 + n % 5, "total_tokens": 30 + n % 7 + n % 5, "cached_tokens": n % 3,
        "reasoning_tokens": 0, "usage_source": "estimated" if estimated else "reported", "status": 200,
        "latency_ms": 100.0, "ttfb_ms": 10.0, "outcome": "complete",
    }).encode()


def expected(bodies: list[bytes]) -> dict[str, int]:
    documents = [json.loads(b) for b in bodies]
    return {"Requests": len(documents), "TotalTokens": sum(d["total_tokens"] for d in documents),
            "PromptTokens": sum(d["prompt_tokens"] for d in documents),
            "CachedTokens": sum(d["cached_tokens"] for d in documents)}


@pytest.fixture
async def service(storage: str) -> AsyncIterator[Any]:
    async with open_table_service(StorageConfig(connection_string=storage)) as client:
        yield client


async def counters(service: Any, key: str, row: str) -> dict[str, int]:
    table = service.get_table_client(USAGE_TABLE)
    entity = await table.get_entity(f"2026-11|{key}", row)
    return {name: as_int(entity[name]) for name in ("Requests", "TotalTokens", "PromptTokens", "CachedTokens")}


async def test_same_batch_three_times_counts_once(service: Any) -> None:
    """A batch delivered three times gives the totals of one delivery, in every period."""
    key = f"k{uuid.uuid4().hex[:8]}"
    bodies = [event(key, n, minute=n % 2) for n in range(60)]
    aggregator = Aggregator(service)
    results = [await aggregator.aggregate(bodies) for _ in range(3)]
    assert [r.counted for r in results] == [60, 0, 0]
    assert [r.duplicates for r in results] == [0, 60, 60]
    assert results[0].transactions == 1
    assert await counters(service, key, "month|2026-11|gpt-4o") == expected(bodies)
    assert await counters(service, key, "day|2026-11-29|gpt-4o") == expected(bodies)
    assert await counters(service, key, "minute|2026-11-29T13:46|gpt-4o") == expected(bodies[1::2])


async def test_four_aggregators_racing_over_overlapping_events(service: Any, storage: str) -> None:
    """Four aggregators on their own clients, fed overlapping slices, together count each event once."""
    key = f"k{uuid.uuid4().hex[:8]}"
    bodies = [event(key, n, deployment=("gpt-4o", "gpt-4o-mini")[n % 2], minute=n % 3) for n in range(200)]
    slices = [bodies[0:120], bodies[60:180], bodies[100:200], bodies[0:200:3]]
    clients = [open_table_service(StorageConfig(connection_string=storage)) for _ in slices]
    try:
        async def run(client: Any, part: list[bytes]) -> int:
            aggregator = Aggregator(client)
            counted = 0
            for start in range(0, len(part), 25):  # several batches each, racing the others
                counted += (await aggregator.aggregate(part[start:start + 25])).counted
            return counted

        counted = await asyncio.gather(*(run(c, s) for c, s in zip(clients, slices, strict=True)))
    finally:
        for client in clients:
            await client.close()
    assert sum(counted) == 200
    for deployment, parity in (("gpt-4o", 0), ("gpt-4o-mini", 1)):
        assert await counters(service, key, f"month|2026-11|{deployment}") == expected(bodies[parity::2])


async def test_malformed_message_does_not_fail_its_batch(service: Any) -> None:
    """Bad messages are kept with their reason in usagerejects; the good ones are counted."""
    key = f"k{uuid.uuid4().hex[:8]}"
    good = [event(key, n) for n in range(5)]
    negative = json.loads(event(key, 99))
    negative["total_tokens"] = -5
    bad = [b"{not json", json.dumps({"schema": 99}).encode(), json.dumps(negative).encode()]
    ids = [f"good-{n}" for n in range(5)] + [f"bad-{key}-{n}" for n in range(3)]
    result = await Aggregator(service).aggregate([*good, *bad], message_ids=ids)
    assert (result.counted, result.rejected) == (5, 3)
    assert await counters(service, key, "month|2026-11|gpt-4o") == expected(good)
    rejects = service.get_table_client(REJECTS_TABLE)
    found = {e["MessageId"]: e async for e in rejects.query_entities("MessageId ge @p and MessageId lt @q",
                                                                   parameters={"p": f"bad-{key}", "q": f"bad-{key}~"})}
    assert set(found) == {f"bad-{key}-0", f"bad-{key}-1", f"bad-{key}-2"}
    assert "not JSON" in found[f"bad-{key}-0"]["Reason"] and found[f"bad-{key}-0"]["Body"] == "{not json"
    assert "schema" in found[f"bad-{key}-1"]["Reason"] and "total_tokens" in found[f"bad-{key}-2"]["Reason"]


async def test_large_batch_for_one_key_splits_transactions(service: Any) -> None:
    """More counters than one transaction holds still lands exactly (in several transactions)."""
    key = f"k{uuid.uuid4().hex[:8]}"
    bodies = [event(key, n, minute=n % 60, estimated=n % 4 == 0) for n in range(400)]
    result = await Aggregator(service).aggregate(bodies)
    assert result.counted == 400 and result.transactions > 1
    assert await counters(service, key, "month|2026-11|gpt-4o") == expected(bodies)
    table = service.get_table_client(USAGE_TABLE)
    month = await table.get_entity(f"2026-11|{key}", "month|2026-11|gpt-4o")
    estimated = sum(json.loads(b)["total_tokens"] for b in bodies[::4])
    assert as_int(month["EstimatedTokens"]) == estimated


async def test_trigger_function_counts_a_functions_batch(storage: str, service: Any) -> None:
    """aggregate_messages, what the queue trigger calls, counts azure.functions messages once."""
    from azure.functions.servicebus import ServiceBusMessage  # the type the worker hands the trigger

    from usage import AggregatorRuntime, aggregate_messages

    key = f"k{uuid.uuid4().hex[:8]}"
    bodies = [event(key, n) for n in range(10)]
    messages = [ServiceBusMessage(body=b, message_id=json.loads(b)["event_id"], application_properties={},
                                  user_properties={})
                for b in bodies]
    runtime = AggregatorRuntime()
    await runtime.aggregator({"UsageStorage": storage})
    try:
        first = await aggregate_messages(runtime, messages)
        again = await aggregate_messages(runtime, messages[:4])
    finally:
        await runtime.close()
    assert (first.counted, again.counted, again.duplicates) == (10, 0, 4)
    assert await counters(service, key, "month|2026-11|gpt-4o") == expected(bodies)


async def test_reject_with_a_message_id_table_storage_refuses_as_row_key(service: Any) -> None:
    """A bad message whose id has '/' or '#' is still kept, under a new row key, with its id."""
    odd = f"odd/{uuid.uuid4().hex}#1"
    result = await Aggregator(service).aggregate([b"nope"], message_ids=[odd])
    assert result.rejected == 1
    rejects = service.get_table_client(REJECTS_TABLE)
    found = [e async for e in rejects.query_entities("MessageId eq @m", parameters={"m": odd})]
    assert len(found) == 1 and found[0]["Body"] == "nope"
