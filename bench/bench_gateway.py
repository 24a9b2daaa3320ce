"""Benchmark: the gateway on the real Functions runtime, against the platform's own floor.

Run by hand (``.venv/bin/python bench/bench_gateway.py``); it prints a Markdown table. Every target runs
in processes of its own on 127.0.0.1, read from /proc, so each figure is that process's alone:

- ``direct``: the client talks to the simulated region itself;
- ``bare relay``: a plain aiohttp relay (one process), for reference;
- ``floor``: ``bench/floor``, a function app that only relays the stream, served by the local host
  (``python -m devkit serve``): host and worker processes, as in Azure;
- ``gateway (in-process usage)`` and ``gateway (Service Bus)``: ``python -m gateway serve``, usage
  aggregated into Azurite in the worker, or sent to the AMQP test broker;
- ``gateway (in-process usage, telemetry)``: the first with OpenTelemetry on, exporting metrics and spans
  over OTLP/HTTP every second to a local sink (``bench/otlp_sink.py``), so export costs are in the figure.

The telemetry overhead is that target's worker CPU per stream over the first's (target: at most 1.10).

Targets (checked as ratios within one run): the gateway's worker CPU per stream at most 1.6 x the floor's,
at 1 and at 20 streams at once, in both usage modes; its added time to first chunk over the floor's at
most 1 ms at the median at 1 stream.
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
WORKER_CPU_TARGET = 1.6
TELEMETRY_TARGET = 1.10
MODES = ("in-process usage", "in-process usage, telemetry", "Service Bus")
FIRST_CHUNK_TARGET_MS = 1.0


def progress(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


@contextmanager
def process(args: list[str], port: int, env: dict[str, str] | None = None,
            cwd: Path = PROJECT) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=90)
        yield proc
    finally:
        proc.terminate()
        proc.wait(30)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def worker_of(host_pid: int) -> int:
    """The local host's worker: its only child process."""
    children = Path(f"/proc/{host_pid}/task/{host_pid}/children").read_text().split()
    assert len(children) == 1, f"expected one worker under {host_pid}, found {children}"
    return int(children[0])


@dataclass
class Target:
    name: str
    url: str
    key: str
    host: int | None = None  # the process that takes the client's connection
    worker: int | None = None  # the Functions worker, where there is one


@dataclass
class Row:
    target: Target
    concurrency: int
    ttfb: list[float]
    total: list[float]
    wall: float
    host_cpu_ms: float | None
    worker_cpu_ms: float | None

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


async def load(target: Target, *, requests: int, concurrency: int, warmup: int) -> Row:
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(warmup):  # warm connections, caches and the runtime's first-use work
            await one_stream(session, target.url, target.key)
        queue = iter(range(requests))
        ttfb: list[float] = []
        total: list[float] = []

        async def client() -> None:
            for _ in queue:
                first, whole = await one_stream(session, target.url, target.key)
                ttfb.append(first)
                total.append(whole)

        before = {pid: cpu_seconds(pid) for pid in (target.host, target.worker) if pid}
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - start
        spent = {pid: (cpu_seconds(pid) - cpu) * 1000 / requests for pid, cpu in before.items()}
    return Row(target, concurrency, ttfb, total, wall, spent.get(target.host or -1), spent.get(target.worker or -1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=400, help="streams per measured run")
    parser.add_argument("--chunks", type=int, default=50, help="content chunks per stream")
    parser.add_argument("--open-streams", type=int, default=500, help="streams held open to measure memory")
    parser.add_argument("--export-interval-ms", type=int, default=0,
                        help="telemetry mode: export metrics and spans this often (default: the exporters' own)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="gateway modes to run")
    args = parser.parse_args()
    python = sys.executable
    with azurite() as storage, AmqpBroker() as broker:
        key = asyncio.run(make_key(storage))
        region_port, slow_port, bare_port, floor_port = free_port(), free_port(), free_port(), free_port()
        sink_port = free_port()
        region, slow = f"http://127.0.0.1:{region_port}", f"http://127.0.0.1:{slow_port}"
        base = {**os.environ, "PYTHONPATH": str(PROJECT), "AzureWebJobs.aggregate_usage.Disabled": "true"}
        gateway_env = {**base, "UsageStorage": storage, "KEY_HASH_SECRET": "bench", "USAGE_QUEUE_NAME": "usage-events",
                       "ServiceBusConnection": "", "AOAI_BACKENDS": json.dumps([
                           {"name": "fast", "endpoint": region, "api_key": "k", "deployments": ["gpt-4o"]},
                           {"name": "slow", "endpoint": slow, "api_key": "k", "deployments": ["slow"]}])}
        simulator = [python, "-m", "devkit.simulator", "--api-key", "k", "--chunks", str(args.chunks)]
        with process([*simulator, "--port", str(region_port), "--chunk-delay-ms", "0"], region_port), \
             process([*simulator, "--port", str(slow_port), "--chunk-delay-ms", "200"], slow_port), \
             process([python, "bench/bare_relay.py", str(bare_port), region, "k"], bare_port) as bare, \
             process([python, "bench/otlp_sink.py", str(sink_port)], sink_port), \
             process([python, "-m", "devkit", "serve", "--port", str(floor_port), "--log-level", "warning"],
                     floor_port, {**base, "FLOOR_UPSTREAM": region, "FLOOR_API_KEY": "k"},
                     cwd=PROJECT / "bench/floor") as floor:
            targets = [Target("direct", region, "k"), Target("bare relay", f"http://127.0.0.1:{bare_port}", key,
                                                              host=bare.pid),
                       Target("floor", f"http://127.0.0.1:{floor_port}", key, floor.pid, worker_of(floor.pid))]
            rows = measure(targets, args)
            memory = {}
            # the exporters' own intervals (metrics 60 s, spans 5 s) unless --export-interval-ms sets both
            telemetry = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink_port}"}
            if args.export_interval_ms:
                telemetry |= {"OTEL_METRIC_EXPORT_INTERVAL": str(args.export_interval_ms),
                              "OTEL_BSP_SCHEDULE_DELAY": str(args.export_interval_ms)}
            for mode, extra in (("in-process usage", {}), ("in-process usage, telemetry", telemetry),
                                ("Service Bus", {"ServiceBusConnection": broker.connection_string})):
                if mode not in args.modes:
                    continue
                port = free_port()
                # a key (so a usage partition) of its own: its aggregation reads no ledger rows of the runs before
                mode_key = asyncio.run(make_key(storage, f"bench-{len(rows)}"))
                with process([python, "-m", "gateway", "serve", "--port", str(port), "--log-level", "warning"], port,
                             {**gateway_env, **extra}) as gateway:
                    target = Target(f"gateway ({mode})", f"http://127.0.0.1:{port}", mode_key, gateway.pid,
                                    worker_of(gateway.pid))
                    rows += measure([target], args)
                    if mode == [m for m in MODES if m in args.modes][-1]:  # last: the 500 slow streams it leaves
                        # behind (the region still writes them out) must not weigh on a later run
                        progress(f"holding {args.open_streams} open streams through the gateway")
                        memory = asyncio.run(measure_open(target, args.open_streams))
    report(rows, memory, args)


def measure(targets: list[Target], args: argparse.Namespace) -> list[Row]:
    rows = []
    for concurrency in (1, 20):
        for target in targets:
            progress(f"{target.name}: {args.requests} streams at concurrency {concurrency}")
            rows.append(asyncio.run(load(target, requests=args.requests, concurrency=concurrency, warmup=30)))
    return rows


async def measure_open(target: Target, count: int) -> dict[str, int]:
    assert target.worker is not None and target.host is not None
    path = PATH.replace("gpt-4o", "slow")
    idle = {"worker": rss_kib(target.worker), "host": rss_kib(target.host)}
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    responses = []
    try:
        for index in range(0, count, 100):
            batch = await asyncio.gather(*(session.post(target.url + path, data=BODY, headers={
                "api-key": target.key, "content-type": "application/json"}) for _ in range(min(100, count - index))))
            for response in batch:
                assert response.status == 200
                await response.content.readany()
            responses.extend(batch)
        await asyncio.sleep(0.5)
        return {"worker idle": idle["worker"], "host idle": idle["host"], "worker open": rss_kib(target.worker),
                "host open": rss_kib(target.host)}
    finally:
        for response in responses:
            response.close()
        await session.close()


async def make_key(storage: str, name: str = "bench") -> str:
    async with open_table_service(StorageConfig(connection_string=storage)) as service:
        return await KeyStore(service, secret=b"bench").create(name)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def report(rows: list[Row], memory: dict[str, int], args: argparse.Namespace) -> None:
    print(f"\n{args.requests} streams of {args.chunks} chunks per run, simulated region on 127.0.0.1, "
          f"Python {sys.version.split()[0]}\n")
    print("| path | streams at once | first chunk p50 / p95 (ms) | total p50 / p95 (ms) | streams/s "
          "| host CPU per stream (ms) | worker CPU per stream (ms) |")
    print("|---|---:|---|---|---:|---:|---:|")
    for row in rows:
        first = " / ".join(f"{row.pct(row.ttfb, q):.2f}" for q in (0.5, 0.95))
        total = " / ".join(f"{row.pct(row.total, q):.2f}" for q in (0.5, 0.95))
        print(f"| {row.target.name} | {row.concurrency} | {first} | {total} | {len(row.total) / row.wall:.0f} | "
              f"{_ms(row.host_cpu_ms)} | {_ms(row.worker_cpu_ms)} |")
    floor = {r.concurrency: r for r in rows if r.target.name == "floor"}
    print("\n| gateway | streams at once | worker CPU / floor's (target <= 1.6) | added first chunk over the floor, "
          "median (ms; target <= 1 at 1 stream) |")
    print("|---|---:|---:|---:|")
    for row in rows:
        if not row.target.name.startswith("gateway"):
            continue
        base = floor[row.concurrency]
        assert row.worker_cpu_ms is not None and base.worker_cpu_ms is not None
        ratio = row.worker_cpu_ms / base.worker_cpu_ms
        added = (statistics.median(row.ttfb) - statistics.median(base.ttfb)) * 1000
        verdict = "ok" if ratio <= WORKER_CPU_TARGET else "OVER"
        first = f"{added:.2f}"
        if row.concurrency == 1:
            first += " ok" if added <= FIRST_CHUNK_TARGET_MS else " OVER"
        print(f"| {row.target.name} | {row.concurrency} | {ratio:.2f} {verdict} | {first} |")
    plain = {r.concurrency: r for r in rows if r.target.name == "gateway (in-process usage)"}
    for row in rows:
        if row.target.name == "gateway (in-process usage, telemetry)" and row.concurrency in plain:
            base = plain[row.concurrency]
            assert row.worker_cpu_ms is not None and base.worker_cpu_ms is not None
            ratio = row.worker_cpu_ms / base.worker_cpu_ms
            print(f"\nTelemetry at {row.concurrency} stream(s) at once: worker CPU per stream {row.worker_cpu_ms:.3f} "
                  f"against {base.worker_cpu_ms:.3f} ms, x{ratio:.3f} "
                  f"({'ok' if ratio <= TELEMETRY_TARGET else 'OVER'}, target <= {TELEMETRY_TARGET})")
    if memory:
        per_stream = (memory["worker open"] - memory["worker idle"] + memory["host open"] - memory["host idle"])
        print(f"\nMemory with {args.open_streams} open streams through the gateway: worker "
              f"{memory['worker idle'] / 1024:.0f} -> {memory['worker open'] / 1024:.0f} MiB, host "
              f"{memory['host idle'] / 1024:.0f} -> {memory['host open'] / 1024:.0f} MiB: "
              f"{per_stream / args.open_streams:.1f} KiB per open stream (both processes)")


if __name__ == "__main__":
    main()
