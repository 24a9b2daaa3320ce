"""Benchmark: aggregation throughput into Azurite and the publisher's cost on the request path.

Run by hand: ``.venv/bin/python bench/bench_usage.py``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from devkit.services import azurite  # noqa: E402
from gateway._publish import UsagePublisher  # noqa: E402
from gateway._records import UsageRecord, encode_event  # noqa: E402
from usage import Aggregator, StorageConfig, open_table_service  # noqa: E402


def events(count: int, keys: int, start: datetime) -> list[bytes]:
    """``count`` events over ``keys`` keys and 3 deployments, spread over a few minutes."""
    return [json.dumps({
        "schema": 1, "event_id": uuid.uuid4().hex, "time": (start + timedelta(milliseconds=20 * n)).isoformat(),
        "key_name": f"team-{n % keys:03d}", "deployment": ("gpt-4o", "gpt-4o-mini", "embeddings")[n % 3],
        "model": "gpt-4o", "backend": "eastus", "operation": "chat/completions", "streaming": True,
        "prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150, "cached_tokens": 0,
        "reasoning_tokens": 0, "usage_source": "reported", "status": 200,
    }).encode() for n in range(count)]


async def aggregation(storage: str, *, count: int, keys: int, batch: int, redeliver: bool) -> dict[str, float]:
    bodies = events(count, keys, datetime.now(UTC))
    async with open_table_service(StorageConfig(connection_string=storage)) as service:
        aggregator = Aggregator(service)
        await aggregator.ensure_tables()
        aggregator.table_requests = 0
        transactions = partitions = 0
        worst = 0.0
        started = time.perf_counter()
        for index in range(0, count, batch):
            result = await aggregator.aggregate(bodies[index:index + batch])
            transactions += result.transactions
            partitions += result.partitions
            worst = max(worst, result.transactions / max(1, result.partitions))
            if (index // batch) % 10 == 0:
                print(f"  .. {index + batch}/{count} events", file=sys.stderr, flush=True)
        elapsed = time.perf_counter() - started
        requests = aggregator.table_requests
        again = 0.0
        if redeliver:  # the same events once more: all duplicates, nothing changes
            started = time.perf_counter()
            for index in range(0, count, batch):
                assert (await aggregator.aggregate(bodies[index:index + batch])).counted == 0
            again = count / (time.perf_counter() - started)
    return {"events_per_second": count / elapsed, "requests_per_1000": requests * 1000 / count,
            "transactions_per_partition_batch": transactions / partitions, "worst": worst,
            "redelivered_per_second": again}


def record(n: int) -> UsageRecord:
    return UsageRecord(
        request_id=uuid.uuid4().hex, time="2026-11-29T13:45:00+00:00", key_name="team", deployment="gpt-4o",
        model="gpt-4o", backend="eastus", operation="chat/completions", streaming=True, prompt_tokens=100,
        completion_tokens=50, total_tokens=150, cached_tokens=0, reasoning_tokens=0, usage_source="reported",
        status=200, latency_ms=100.0, ttfb_ms=10.0, outcome="complete")


class NullTransport:
    async def send(self, events: object) -> None:
        return None

    async def probe(self) -> str:
        return "null"

    async def close(self) -> None:
        return None


async def publish_cost(count: int) -> tuple[float, float]:
    """Microseconds per emit (the request path), and per event encoded by the background task."""
    records = [record(n) for n in range(count)]
    publisher = UsagePublisher(NullTransport(), capacity=count + 1)
    started = time.perf_counter()
    for item in records:
        publisher.emit(item)
    emit = (time.perf_counter() - started) / count * 1e6
    started = time.perf_counter()
    for item in records:
        encode_event(item)
    encode = (time.perf_counter() - started) / count * 1e6
    await publisher.close()
    return emit, encode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--keys", type=int, default=50)
    args = parser.parse_args()
    rows = []
    with azurite() as storage:
        for batch in (100, 1000):
            print(f"  .. aggregating {args.events} events in batches of {batch}", file=sys.stderr)
            rows.append((batch, asyncio.run(aggregation(storage, count=args.events, keys=args.keys, batch=batch,
                                                        redeliver=batch == 1000))))
    emit, encode = asyncio.run(publish_cost(200_000))
    print(f"\n{args.events} events, {args.keys} keys, 3 deployments, Azurite (in memory) on 127.0.0.1\n")
    print("| batch | events/s | Table requests per 1,000 events | transactions per partition per batch (mean / max) |")
    print("|---:|---:|---:|---|")
    for batch, figures in rows:
        print(f"| {batch} | {figures['events_per_second']:,.0f} | {figures['requests_per_1000']:.1f} | "
              f"{figures['transactions_per_partition_batch']:.2f} / {figures['worst']:.2f} |")
    redelivered = rows[-1][1]["redelivered_per_second"]
    print(f"\nRedelivering all {args.events} events (batches of 1000): {redelivered:,.0f} events/s, "
          "nothing counted twice")
    print(f"Publisher on the request path: {emit:.2f} µs per emit; encoding off the path: {encode:.2f} µs per event")


if __name__ == "__main__":
    main()
