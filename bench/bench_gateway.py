"""Benchmark: the gateway against a fast simulated region, side by side with a direct connection.

Run by hand (``.venv/bin/python bench/bench_gateway.py``); it prints a Markdown table. It starts
Azurite, simulated regions, a bare aiohttp relay and ``python -m gateway serve`` as separate
processes on 127.0.0.1, so the gateway's CPU time and memory are its own (read from /proc).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from devkit.amqp_broker import AmqpBroker  # noqa: E402
from devkit.services import azurite, free_port, wait_for_port  # noqa: E402
from usage import KeyStore, StorageConfig, open_table_service  # noqa: E402

BODY = json.dumps({"messages": [{"role": "user", "content": "Say hello"}], "stream": True}).encode()
PATH = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
TICKS = os.sysconf("SC_CLK_TCK")


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


@contextmanager
def process(args: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


@dataclass
class Run:
    ttfb: list[float]
    total: list[float]
    wall: float

    def pct(self, values: list[float], q: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def one_stream(session: aiohttp.ClientSession, url: str, key: str) -> tuple[float, float]:
    start = time.perf_counter()
    first = 0.0
    async with session.post(url + PATH, data=BODY, headers={"api-key": key, "content-type": "application/json"}) as r:
        assert r.status == 200, await r.text()
        async for _chunk in r.content.iter_any():
            if not first:
                first = time.perf_counter() - start
    return first, time.perf_counter() - start


async def load(url: str, key: str, *, requests: int, concurrency: int) -> Run:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(min(20, requests)):  # warm connections and caches
            await one_stream(session, url, key)
        queue = iter(range(requests))
        ttfb: list[float] = []
        total: list[float] = []

        async def worker() -> None:
            for _ in queue:
                first, whole = await one_stream(session, url, key)
                ttfb.append(first)
                total.append(whole)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return Run(ttfb, total, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=400, help="streams per measured run")
    parser.add_argument("--chunks", type=int, default=50, help="content chunks per stream")
    parser.add_argument("--chunk-delay-ms", type=float, default=0.0,
                        help="pause between the fast region's chunks (0: as fast as it can write)")
    parser.add_argument("--open-streams", type=int, default=1000)
    parser.add_argument("--usage", choices=("servicebus", "inprocess"), default="servicebus",
                        help="where the gateway sends usage events: the AMQP test broker (as in Azure), or "
                             "straight to the aggregator in the gateway's process (the local run)")
    args = parser.parse_args()
    python = sys.executable
    with azurite() as storage, AmqpBroker() as broker:
        key = asyncio.run(make_key(storage))
        fast_port, slow_port, bare_port, gw_port = free_port(), free_port(), free_port(), free_port()
        fast = f"http://127.0.0.1:{fast_port}"
        slow = f"http://127.0.0.1:{slow_port}"
        env = {**os.environ, "UsageStorage": storage, "KEY_HASH_SECRET": "bench",
               "AOAI_BACKENDS": json.dumps([
                   {"name": "fast", "endpoint": fast, "api_key": "k", "deployments": ["gpt-4o"]},
                   {"name": "slow", "endpoint": slow, "api_key": "k", "deployments": ["slow"]}])}
        if args.usage == "servicebus":
            env["ServiceBusConnection"] = broker.connection_string
        region = [python, "-m", "devkit.simulator", "--api-key", "k", "--chunks", str(args.chunks)]
        with process([*region, "--port", str(fast_port), "--chunk-delay-ms", str(args.chunk_delay_ms)], fast_port), \
             process([*region, "--port", str(slow_port), "--chunk-delay-ms", "200"], slow_port), \
             process([python, "bench/bare_relay.py", str(bare_port), fast, "k"], bare_port) as bare, \
             process([python, "-m", "gateway", "serve", "--port", str(gw_port), "--log-level", "warning"],
                     gw_port, env) as gateway:
            targets = {"direct": (fast, None, "k"), "bare relay": (f"http://127.0.0.1:{bare_port}", bare.pid, key),
                       "gateway": (f"http://127.0.0.1:{gw_port}", gateway.pid, key)}
            rows = []
            for concurrency in (1, 50):
                for name, (url, pid, secret) in targets.items():
                    progress(f"{name}: {args.requests} streams at concurrency {concurrency}")
                    before = cpu_seconds(pid) if pid else 0.0
                    run = asyncio.run(load(url, secret, requests=args.requests, concurrency=concurrency))
                    cpu_ms = (cpu_seconds(pid) - before) * 1000 / (args.requests + 20) if pid else None
                    rows.append((name, concurrency, run, cpu_ms))
            progress(f"holding {args.open_streams} open streams through the gateway")
            idle = rss_kib(gateway.pid)
            memory = asyncio.run(measure_open(f"http://127.0.0.1:{gw_port}", key, args.open_streams, gateway.pid))
    report(rows, idle, memory, args)


async def measure_open(url: str, key: str, count: int, pid: int) -> int:
    path = PATH.replace("gpt-4o", "slow")
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    responses = []
    try:
        for index in range(0, count, 100):
            batch = await asyncio.gather(*(session.post(url + path, data=BODY, headers={
                "api-key": key, "content-type": "application/json"}) for _ in range(min(100, count - index))))
            for response in batch:
                assert response.status == 200
                await response.content.readany()
            responses.extend(batch)
        await asyncio.sleep(0.5)
        return rss_kib(pid)
    finally:
        for response in responses:
            response.close()
        await session.close()


async def make_key(storage: str) -> str:
    async with open_table_service(StorageConfig(connection_string=storage)) as service:
        return await KeyStore(service, secret=b"bench").create("bench")


def report(rows: list[tuple[str, int, Run, float | None]], idle: int, open_rss: int, args: argparse.Namespace) -> None:
    print(f"\n{args.requests} streams of {args.chunks} chunks per run, {args.chunk_delay_ms} ms between chunks, "
          f"simulated region on 127.0.0.1, usage events: {args.usage}\n")
    print("| path | streams at once | first chunk p50 / p95 / p99 (ms) | total p50 / p95 / p99 (ms) "
          "| streams/s | CPU per stream (ms) |")
    print("|---|---:|---|---|---:|---:|")
    for name, concurrency, run, cpu in rows:
        first = " / ".join(f"{run.pct(run.ttfb, q):.2f}" for q in (0.5, 0.95, 0.99))
        total = " / ".join(f"{run.pct(run.total, q):.2f}" for q in (0.5, 0.95, 0.99))
        print(f"| {name} | {concurrency} | {first} | {total} | {len(run.total) / run.wall:.0f} | "
              f"{'-' if cpu is None else f'{cpu:.2f}'} |")
    direct = {c: statistics.median(r.ttfb) for n, c, r, _ in rows if n == "direct"}
    added = {c: (statistics.median(r.ttfb) - direct[c]) * 1000 for n, c, r, _ in rows if n == "gateway"}
    print("\nAdded time to first chunk (gateway - direct, median): "
          + ", ".join(f"{v:.2f} ms at {c} stream(s)" for c, v in added.items()))
    per_stream = (open_rss - idle) / args.open_streams
    print(f"Memory: {idle / 1024:.0f} MiB idle, {open_rss / 1024:.0f} MiB with {args.open_streams} open streams: "
          f"{per_stream:.1f} KiB per open stream")


if __name__ == "__main__":
    main()
