"""Benchmark: the shared quota's cost in one process — Table operations per admitted request and the time
admission and settlement add — with N guards (instances) sharing one key's budget row in Azurite.

Run by hand: ``.venv/bin/python bench/bench_quota.py [--instances 1 2 4] [--rate 40] [--seconds 20]``;
prints a Markdown table. (``bench/bench_scale.py`` drives whole gateway processes instead.)
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from devkit.services import azurite  # noqa: E402
from gateway._budget import Meter, TableBudgets  # noqa: E402
from gateway._quota import QuotaGuard, TableUsage  # noqa: E402
from usage import KeyRecord, Limits, StorageConfig, open_table_service  # noqa: E402


class Counted:
    """A budget store and usage reader that count their Table operations."""

    def __init__(self, budgets: TableBudgets, usage: TableUsage) -> None:
        self._budgets, self._usage = budgets, usage
        self.operations = 0

    async def read(self, key: str) -> tuple[dict[str, Any], str] | None:
        self.operations += 1
        return await self._budgets.read(key)

    async def write(self, key: str, values: Mapping[str, Any], etag: str | None) -> str:
        self.operations += 1
        return await self._budgets.write(key, values, etag)

    async def read_usage(self, key: str, now: datetime, windows: Mapping[str, str]) -> dict[Meter, int]:
        self.operations += 1
        return await self._usage.read(key, now, windows)


class _UsageView:
    def __init__(self, counted: Counted) -> None:
        self._counted = counted

    async def read(self, key: str, now: datetime, windows: Mapping[str, str]) -> dict[Meter, int]:
        return await self._counted.read_usage(key, now, windows)


async def run(connection: str, instances: int, rate: float, seconds: float) -> tuple[int, int, list[float]]:
    async with open_table_service(StorageConfig(connection_string=connection)) as service:
        counted = Counted(TableBudgets(service, timeout=2.0), TableUsage(service, timeout=2.0))
        key = KeyRecord(f"bench-{uuid.uuid4().hex[:8]}", True, datetime.now(UTC),
                        Limits(tokens_per_minute=10**8, tokens_per_day=10**9, requests_per_minute=10**6))
        guards = [QuotaGuard(_UsageView(counted), counted, cache_seconds=5.0, read_timeout=0.5, refresh_timeout=2.0,
                             clock=time.monotonic, wall_clock=time.time) for _ in range(instances)]
        await guards[0].admit(key, estimate=60)  # the row and the table exist before the timing starts
        counted.operations = 0
        times: list[float] = []
        start = time.monotonic()
        for tick in range(int(rate * seconds)):
            for guard in guards:
                began = time.perf_counter()
                reservation = await guard.admit(key, estimate=60)
                guard.settle(reservation, tokens=50)
                times.append(time.perf_counter() - began)
            await asyncio.sleep(max(0.0, start + (tick + 1) / rate - time.monotonic()))
        operations = counted.operations
        for guard in guards:
            await guard.close()
        return len(times), operations, times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--instances", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rate", type=float, default=40.0, help="requests per second per instance")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    print(f"{args.rate:g} requests/s per instance for {args.seconds:g} s, a key with three limits\n")
    print("| instances | admitted | Table operations | per admitted request | admit + settle median / p95 (µs) |")
    print("|---:|---:|---:|---:|---|")
    with azurite() as connection:
        for instances in args.instances:
            admitted, operations, times = asyncio.run(run(connection, instances, args.rate, args.seconds))
            ordered = sorted(times)
            print(f"| {instances} | {admitted} | {operations} | {operations / admitted:.3f} | "
                  f"{statistics.median(times) * 1e6:.0f} / {ordered[int(len(ordered) * 0.95)] * 1e6:.0f} |")


if __name__ == "__main__":
    main()
