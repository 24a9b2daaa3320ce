"""Benchmark: the CPU content logging adds to a stream (target: at most 0.3 ms per logged stream).

Run by hand (``.venv/bin/python bench/bench_content.py``). One ``python -m gateway serve`` with ``CONTENT_LOG``
set to Azurite's blob service, a simulated region writing as fast as it can, and two keys: one that opted in
to content logging and one that did not. Rounds alternate between the keys; each round's figure is the
worker's CPU (from /proc) per stream, counted until the writer has uploaded the round's records (the same
wait is counted for the unlogged key), so the background work (assembling, JSON, the blob uploads) is in it.
Each logged round is compared with the unlogged round beside it and the median difference is reported, so
a machine busy with other work shifts both sides alike.
Also timed in-process: making one record from a 50-chunk stream, the part that runs in the writer's thread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import aiohttp

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "bench"))

from bench_gateway import cpu_seconds, one_stream, process, progress, worker_of  # noqa: E402

from devkit.services import azurite, free_port  # noqa: E402
from devkit.simulator import SimulatedRegion  # noqa: E402
from gateway._contentlog import ContentLog, Pending, RecordMaker, content_publisher  # noqa: E402
from gateway._endpoints import endpoint  # noqa: E402
from gateway._records import UsageRecord  # noqa: E402
from gateway._request import Call  # noqa: E402
from gateway._settings import BackendConfig, Settings  # noqa: E402
from usage import BlobStorageConfig, KeyStore, StorageConfig, open_blob_service, open_table_service  # noqa: E402

TARGET_MS = 0.3
#: the writer gathers records for 1 s, then uploads: a round is counted until well after that
SETTLE_SECONDS = 2.5


async def make_keys(storage: str) -> tuple[str, str]:
    async with open_table_service(StorageConfig(connection_string=storage)) as service:
        store = KeyStore(service, secret=b"bench")
        return (await store.create(f"plain-{os.getpid()}"),
                await store.create(f"logged-{os.getpid()}", log_content=True))


async def round_cpu(url: str, key: str, worker: int, *, requests: int, concurrency: int) -> float:
    """Worker CPU (ms) per stream for ``requests`` streams, including what the writer does after them."""
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        queue = iter(range(requests))

        async def client() -> None:
            for _ in queue:
                await one_stream(session, url, key)

        before = cpu_seconds(worker)
        await asyncio.gather(*(client() for _ in range(concurrency)))
        streamed = cpu_seconds(worker)
        await asyncio.sleep(SETTLE_SECONDS)
        settled = cpu_seconds(worker)
        progress(f"   {(streamed - before) * 1000 / requests:.3f} ms per stream while streaming, "
                 f"{(settled - streamed) * 1000:.0f} ms in the {SETTLE_SECONDS} s after")
        return (settled - before) * 1000 / requests


def _sample(chunks: int) -> Pending:
    """A logged 50-chunk stream as the proxy hands it over: frames as AOAI writes them (compact JSON)."""
    region = SimulatedRegion(chunks=chunks)
    frames = []
    base = {"id": "chatcmpl-x", "model": region.model, "object": "chat.completion.chunk", "created": 0}
    frames.append(b'data: {"choices":[],"prompt_filter_results":[{"prompt_index":0}]}\n\n')
    for word in region._text():
        chunk = {**base, "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None,
                                      "content_filter_results": {"hate": {"filtered": False, "severity": "safe"}}}]}
        frames.append(b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n")
    frames.append(b"data: [DONE]\n\n")
    body = {"messages": [{"role": "user", "content": "Say hello"}], "stream": True}
    call = Call(endpoint=endpoint("chat/completions", v1=False),
                deployment="gpt-4o", body=body, raw=json.dumps(body).encode(),
                stream=True, query="", api_version="2024-10-21", client_usage=False, add_usage=True)
    usage = UsageRecord(request_id="r" * 32, time="2026-11-29T13:45:00+00:00", key_name="bench", deployment="gpt-4o",
                        model=region.model, backend="fast", operation="chat/completions", streaming=True,
                        prompt_tokens=10, completion_tokens=chunks, total_tokens=10 + chunks, cached_tokens=0,
                        reasoning_tokens=0, usage_source="reported", status=200, latency_ms=1.0, ttfb_ms=1.0,
                        outcome="complete")
    return Pending(usage, call, BackendConfig("fast", "http://f"), True, True, frames)


def record_making_us(chunks: int, repeat: int = 2000) -> float:
    """Microseconds to turn one logged stream of ``chunks`` content chunks into its JSON line."""
    item = _sample(chunks)
    assert item.backend is not None
    maker = RecordMaker(Settings(backends=(item.backend,), storage=StorageConfig(connection_string="x=y")))
    start = time.perf_counter()
    for _ in range(repeat):
        maker.line(Pending(item.usage, item.call, item.backend, True, True, list(item.received)))
    return (time.perf_counter() - start) * 1e6 / repeat


async def writer_cpu_us(storage: str, count: int = 3000) -> float:
    """The content log's own CPU per record, in this process: ``ContentLog.record`` as the proxy calls it, the
    record made in the writer's thread and its share of the blob uploads (the real SDK, to Azurite)."""
    item = _sample(50)
    assert item.backend is not None
    settings = Settings(backends=(item.backend,), storage=StorageConfig(connection_string="x=y"))
    async with aiohttp.ClientSession() as session:
        service = open_blob_service(BlobStorageConfig(connection_string=storage), session=session)
        publisher = content_publisher(settings, service, linger=0.2)
        publisher.start()
        log = ContentLog(publisher)
        start = time.process_time()
        for n in range(count):
            log.record(replace(item.usage, request_id=f"{n:032d}"), item.call, list(item.received),
                       backend=item.backend, with_usage=True)
            if n % 100 == 99:
                await asyncio.sleep(0.01)  # requests arrive over time; the writer runs beside them
        await log.close(flush_seconds=60)
        spent = time.process_time() - start
    assert publisher.sent == count, (publisher.sent, publisher.dropped)
    return spent * 1e6 / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500, help="streams per round")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per key and concurrency")
    parser.add_argument("--chunks", type=int, default=50, help="content chunks per stream")
    args = parser.parse_args()
    python = sys.executable
    results: dict[tuple[str, int], list[float]] = {}
    with azurite() as storage:
        plain, logged = asyncio.run(make_keys(storage))
        region_port, port = free_port(), free_port()
        region = f"http://127.0.0.1:{region_port}"
        env = {**os.environ, "PYTHONPATH": str(PROJECT), "AzureWebJobs.aggregate_usage.Disabled": "true",
               "UsageStorage": storage, "CONTENT_LOG": storage, "KEY_HASH_SECRET": "bench", "ServiceBusConnection": "",
               "USAGE_QUEUE_NAME": "usage-events",
               "AOAI_BACKENDS": json.dumps([{"name": "fast", "endpoint": region, "api_key": "k"}])}
        simulator = [python, "-m", "devkit.simulator", "--api-key", "k", "--chunks", str(args.chunks),
                     "--port", str(region_port), "--chunk-delay-ms", "0"]
        with process(simulator, region_port), \
             process([python, "-m", "gateway", "serve", "--port", str(port), "--log-level", "warning"], port,
                     env) as gateway:
            worker = worker_of(gateway.pid)
            url = f"http://127.0.0.1:{port}"
            for key in (plain, logged):  # warm both keys' caches, connections and the writer
                asyncio.run(round_cpu(url, key, worker, requests=50, concurrency=1))
            for concurrency in (1, 20):
                for n in range(args.rounds):
                    order = [("unlogged", plain), ("logged", logged)]
                    for name, key in order if n % 2 == 0 else order[::-1]:
                        progress(f"{name}: round {n + 1}/{args.rounds}, {args.requests} streams at {concurrency}")
                        results.setdefault((name, concurrency), []).append(
                            asyncio.run(round_cpu(url, key, worker, requests=args.requests, concurrency=concurrency)))
    making = record_making_us(args.chunks)
    with azurite() as storage:
        writer = asyncio.run(writer_cpu_us(storage))
    print(f"\n{args.requests} streams of {args.chunks} chunks per round, {args.rounds} rounds per key, worker CPU per "
          f"stream (median of rounds), Python {sys.version.split()[0]}\n")
    print("| streams at once | unlogged (ms) | logged (ms) | added per logged stream (ms; target <= 0.3) |")
    print("|---:|---:|---:|---:|")
    for concurrency in (1, 20):
        plain_rounds, logged_rounds = results[("unlogged", concurrency)], results[("logged", concurrency)]
        # each logged round against the unlogged round beside it: a busy machine shifts both alike
        added = statistics.median(b - a for a, b in zip(plain_rounds, logged_rounds, strict=True))
        verdict = "ok" if added <= TARGET_MS else "OVER"
        spread = max(plain_rounds) - min(plain_rounds)
        print(f"| {concurrency} | {statistics.median(plain_rounds):.3f} | {statistics.median(logged_rounds):.3f} | "
              f"{added:.3f} {verdict} (unlogged rounds vary by {spread:.3f}) |")
    print(f"\nMaking one record from a {args.chunks}-chunk stream (in the writer's thread): {making:.1f} µs")
    print(f"The content log's whole CPU per record in one process (request-path hand-over, record, its share of the "
          f"blob uploads to Azurite through the SDK): {writer:.1f} µs")


if __name__ == "__main__":
    main()
