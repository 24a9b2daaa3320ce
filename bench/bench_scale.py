"""Scale benchmark: N gateway processes sharing one key's quota on one Table Storage (issue 9).

Run by hand: ``.venv/bin/python bench/bench_scale.py [--instances 1,2,4] [--rates 5,20,40] [--quota 3000]
[--quick]``; progress goes to stderr, the Markdown tables to stdout.

Everything runs on 127.0.0.1: one Azurite; one simulated AOAI region (``--regions 2``: two, of one
priority), each a ``python -m devkit.simulator`` process; N gateways, each ``python -m gateway serve``
(the local Functions host and its worker process, usage aggregated in-process), all with the same
settings and ``KEY_HASH_SECRET``. Table Storage is reached through ``devkit.table_proxy``, a relay that
counts every request to the table service (one operation per HTTP request; a ``$batch`` is one).

For each N and each rate (requests per second sent to *each* gateway, open loop: sent on schedule,
whatever the answers' pace), two drives of chat completions with ``max_tokens`` set:

1. ``--latency-seconds`` long, the ticks taking turns between two keys: one without limits (the
   baseline), one *roomy* key whose minute quota the drive does not reach (3 x what it would use).
   Every request is admitted; the roomy key's latency minus the other's, under the same load at the
   same moments, is the time the quota adds, and the request-path Table operations per roomy request
   admitted are the steady-state cost (an upper bound: the key without limits makes none but its
   cached lookups);
2. *tight*: a key of ``--quota`` tokens per minute (``--limit requests``: of ``--quota`` requests per
   minute, once the gateway has request-rate limits), ``--duration`` seconds from the start of a UTC minute
   (the script waits for one, unless ``--no-align``): the tokens admitted in each UTC minute window, as a
   percentage of the quota, from the responses' ``usage`` (by the minute each request was sent) and from
   the ``usage`` table's minute rows (by the minute it reached the gateway), the 429s, and the Table
   operations per request. (``--limit requests``: the admitted requests, from the responses only: the
   table's ``Requests`` count refusals too.)

Table operations are counted in two ways: *all* of them, and those of the *request path* (key lookups,
quota reads, shared budgets), which leave out the usage aggregator's own reads and transactions: in
Azure the aggregator runs from Service Bus, off the request path; here it runs in each gateway.

On a 2-core machine 4 gateways (8 processes) at 40 requests/s each are CPU-bound: the tables give the
rate achieved (requests answered per second per gateway) and the CPU the gateways used (in cores).
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
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from devkit.services import azurite, free_port, wait_for_port  # noqa: E402
from devkit.table_proxy import CountingTableProxy, counting_table_proxy  # noqa: E402
from usage import KeyStore, StorageConfig, open_table_service  # noqa: E402
from usage._keys import Limits  # noqa: E402
from usage._schema import USAGE_TABLE  # noqa: E402
from usage._tables import as_int  # noqa: E402

SECRET = b"bench-scale"
API_KEY = "k"
MESSAGES = [{"role": "user", "content": "Say hello"}]
PATH = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
TICKS = os.sysconf("SC_CLK_TCK")
ROOMY = 3  # the roomy key's quota: this many times what its drive would use
LIMITS = {"tokens": "tokens_per_minute", "requests": "requests_per_minute"}  # the tight key's, by --limit


def progress(message: str) -> None:
    print(f"  .. {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


@contextmanager
def process(args: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(args, cwd=PROJECT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=120)
        yield proc
    finally:
        proc.terminate()
        proc.wait(60)


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(stat[11]) + int(stat[12])) / TICKS
    return total


def family(pid: int) -> list[int]:
    """``pid`` and its child processes (the local host and its worker)."""
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, children)]


@dataclass(frozen=True, slots=True)
class Answer:
    gateway: int
    key: int  # which of the drive's keys
    sent: float  # wall clock
    status: int  # 0: no HTTP answer
    tokens: int
    latency: float  # seconds


@dataclass
class Drive:
    """One drive's answers and what it cost."""

    seconds: float
    answers: list[Answer]
    table_all: int = 0
    table_request_path: int = 0
    table_by_kind: dict[str, int] = field(default_factory=dict)
    cpu_cores: float = 0.0

    def of(self, status: int, key: int | None = None) -> list[Answer]:
        return [a for a in self.answers if a.status == status and key in (None, a.key)]

    def latency_ms(self, status: int, q: float, key: int | None = None) -> float | None:
        values = sorted(a.latency for a in self.of(status, key))
        if not values:
            return None
        return (statistics.median(values) if q == 0.5 else values[min(len(values) - 1, int(q * len(values)))]) * 1000

    def achieved(self, instances: int) -> float:
        """Answers per second per gateway (of all keys)."""
        return len([a for a in self.answers if a.status]) / self.seconds / instances


async def _one(session: aiohttp.ClientSession, index: int, url: str, keys: list[str], which: int,
               body: bytes) -> Answer:
    sent, start = time.time(), time.perf_counter()
    try:
        async with session.post(url + PATH, data=body, headers={"api-key": keys[which],
                                                                "content-type": "application/json"}) as response:
            document = await response.read()
            tokens = json.loads(document)["usage"]["total_tokens"] if response.status == 200 else 0
            return Answer(index, which, sent, response.status, tokens, time.perf_counter() - start)
    except (aiohttp.ClientError, TimeoutError):
        return Answer(index, which, sent, 0, 0, time.perf_counter() - start)


async def drive(urls: list[str], keys: list[str], *, rate: float, seconds: float,
                max_tokens: int) -> list[Answer]:
    """``rate`` requests per second to each gateway for ``seconds``, sent on schedule (open loop); with
    several ``keys``, each tick's requests use the next one in turn."""
    body = json.dumps({"messages": MESSAGES, "max_tokens": max_tokens}).encode()
    timeout = aiohttp.ClientTimeout(total=60)
    sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256), timeout=timeout) for _ in urls]
    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = []
        for tick in range(round(rate * seconds)):
            await asyncio.sleep(max(0.0, start + tick / rate - loop.time()))
            tasks += [asyncio.create_task(_one(session, index, url, keys, tick % len(keys), body))
                      for index, (session, url) in enumerate(zip(sessions, urls, strict=True))]
        return list(await asyncio.gather(*tasks))
    finally:
        for session in sessions:
            await session.close()


@dataclass
class Cluster:
    """The running gateways."""

    urls: list[str]
    pids: list[int]  # hosts and workers
    storage: str  # through the counting relay
    proxy: CountingTableProxy

    async def make_key(self, name: str, limits: Limits) -> str:
        async with open_table_service(StorageConfig(connection_string=self.storage)) as service:
            return await KeyStore(service, secret=SECRET).create(name, limits=limits)

    async def warm(self, key: str, max_tokens: int, requests: int = 1) -> None:
        """Use ``key`` on every gateway (its lookup is then cached there)."""
        for _ in range(requests):
            answers = await drive(self.urls, [key], rate=1000.0, seconds=1 / 1000, max_tokens=max_tokens)
            bad = [a for a in answers if a.status != 200]
            if bad:
                raise RuntimeError(f"warm-up request answered {bad}")

    async def measure(self, keys: list[str], *, rate: float, seconds: float, max_tokens: int) -> Drive:
        started, cpu = time.monotonic(), cpu_seconds(self.pids)
        answers = await drive(self.urls, keys, rate=rate, seconds=seconds, max_tokens=max_tokens)
        ended = time.monotonic()
        result = Drive(ended - started, answers, cpu_cores=(cpu_seconds(self.pids) - cpu) / (ended - started))
        kinds: dict[str, int] = defaultdict(int)
        for op in self.proxy.between(started, ended):
            result.table_all += 1
            if not op.aggregation:
                result.table_request_path += 1
                kinds[f"{op.method} {op.table}"] += 1
        result.table_by_kind = dict(kinds)
        return result

    async def table_minutes(self, name: str, minutes: list[str]) -> dict[str, int]:
        """The ``usage`` table's total tokens of key ``name`` per minute (all deployments)."""
        totals = dict.fromkeys(minutes, 0)
        async with open_table_service(StorageConfig(connection_string=self.storage)) as service:
            table = service.get_table_client(USAGE_TABLE)
            for minute in minutes:
                async for row in table.query_entities(
                        "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                        parameters={"pk": f"{minute[:7]}|{name}", "lo": f"minute|{minute}|",
                                    "hi": f"minute|{minute}|~"}):
                    totals[minute] += as_int(row.get("TotalTokens"))
        return totals


@contextmanager
def cluster(instances: int, proxy: CountingTableProxy, regions: list[str]) -> Iterator[Cluster]:
    backends = [{"name": f"region{i}", "endpoint": url, "api_key": API_KEY, "priority": 1}
                for i, url in enumerate(regions)]
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "AzureWebJobs.aggregate_usage.Disabled": "true",
           "UsageStorage": proxy.connection_string, "KEY_HASH_SECRET": SECRET.decode(),
           "USAGE_QUEUE_NAME": "usage-events", "ServiceBusConnection": "", "AOAI_BACKENDS": json.dumps(backends)}
    with ExitStack() as stack:
        urls, pids = [], []
        for index in range(instances):
            port = free_port()
            progress(f"starting gateway {index + 1} of {instances} on port {port}")
            host = stack.enter_context(process(
                [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--log-level", "warning"], port, env))
            urls.append(f"http://127.0.0.1:{port}")
            pids += family(host.pid)
        yield Cluster(urls, pids, proxy.connection_string, proxy)
        progress(f"stopping {instances} gateway(s)")


def minute_of(wall: float) -> str:
    return datetime.fromtimestamp(wall, UTC).isoformat()[:16]


async def wait_for_minute_start() -> None:
    """Until just after the next UTC minute starts."""
    wait = 60 - time.time() % 60
    progress(f"waiting {wait:.0f} s for the next UTC minute")
    await asyncio.sleep(wait + 0.05)


@dataclass
class Cell:
    instances: int
    rate: float
    latency: Drive  # keys: 0 without limits, 1 roomy
    tight: Drive
    by_minute: dict[str, int]  # responses' tokens (or requests) by the minute they were sent
    table: dict[str, int]  # the usage table's minute rows


async def run_cell(gateways: Cluster, instances: int, rate: float, args: argparse.Namespace) -> Cell:
    tag = uuid.uuid4().hex[:8]
    tokens_each = 40  # about what one request uses here (prompt and 20 completion tokens)
    roomy_quota = int(ROOMY * rate * instances * tokens_each * 60)
    keys = {"none": await gateways.make_key(f"scale-none-{tag}", Limits()),
            "roomy": await gateways.make_key(f"scale-roomy-{tag}", Limits(tokens_per_minute=roomy_quota)),
            "tight": await gateways.make_key(f"scale-tight-{tag}", Limits(**{LIMITS[args.limit]: args.quota}))}
    for key in keys.values():
        await gateways.warm(key, args.max_tokens)
    label = f"{instances} gateway(s) at {rate:g}/s each"
    progress(f"{label}: a key without limits and one of {roomy_quota} tokens/min in turn, {args.latency_seconds:g} s")
    latency = await gateways.measure([keys["none"], keys["roomy"]], rate=rate, seconds=args.latency_seconds,
                                     max_tokens=args.max_tokens)
    seconds = args.duration
    if args.align:
        await wait_for_minute_start()
        seconds = min(seconds, 59.5)  # the drive's last requests still in the minute
    progress(f"{label}: key of {args.quota} {args.limit}/min, {seconds:g} s")
    tight = await gateways.measure([keys["tight"]], rate=rate, seconds=seconds, max_tokens=args.max_tokens)
    by_minute: dict[str, int] = defaultdict(int)
    for answer in tight.of(200):
        by_minute[minute_of(answer.sent)] += answer.tokens if args.limit == "tokens" else 1
    await asyncio.sleep(3)  # the gateways' usage events reach the table (0.5 s linger, then aggregation)
    # the table's Requests count refusals too: with --limit requests there is nothing there to compare
    table = await gateways.table_minutes(f"scale-tight-{tag}", sorted(by_minute)) if args.limit == "tokens" else {}
    cell = Cell(instances, rate, latency, tight, dict(by_minute), table)
    progress(f"{label}: admitted {dict(by_minute)} {args.limit} by minute (table {table}), "
             f"{len(tight.of(429))} refused of {len(tight.answers)}, achieved {tight.achieved(instances):.1f}/s each")
    return cell


def _pct(values: dict[str, int], quota: int) -> str:
    return " · ".join(f"{100 * v / quota:.0f}%" for _, v in sorted(values.items())) or "-"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _added(drive: Drive, q: float) -> str:
    ours, base = drive.latency_ms(200, q, key=1), drive.latency_ms(200, q, key=0)
    return "-" if ours is None or base is None else f"{ours - base:+.1f}"


def report(cells: list[Cell], args: argparse.Namespace, runtime: float) -> None:
    print(f"\nScale benchmark: {args.regions} simulated region(s), max_tokens {args.max_tokens} (a request uses "
          f"~37 tokens), Python {sys.version.split()[0]}, {os.cpu_count()} CPU(s); {runtime / 60:.1f} min in all.\n")
    print(f"Key of {args.quota} {args.limit} per minute, driven {args.duration:g} s"
          f"{' from the start of a UTC minute' if args.align else ''}:\n")
    print(f"| gateways | sent/s each | answered/s each | admitted {args.limit} per UTC minute, % of quota "
          "(responses; table) | 429s | Table ops per request (all; request path) "
          "| request-path ops per admitted request | gateway CPU (cores) |")
    print("|---:|---:|---:|---|---:|---|---:|---:|")
    for c in cells:
        t = c.tight
        sent, admitted = len(t.answers), len(t.of(200))
        failed = sent - admitted - len(t.of(429))
        print(f"| {c.instances} | {c.rate:g} | {t.achieved(c.instances):.1f} | {_pct(c.by_minute, args.quota)}; "
              f"{_pct(c.table, args.quota)} | {len(t.of(429))}{f' (+{failed} failed)' if failed else ''} | "
              f"{t.table_all / sent:.3f}; {t.table_request_path / sent:.3f} | "
              f"{t.table_request_path / admitted if admitted else float('nan'):.2f} | {t.cpu_cores:.2f} |")
    print(f"\nA key whose quota the drive does not reach ({ROOMY} x its use) and a key without limits, taking "
          f"turns, {args.latency_seconds:g} s:\n")
    print("| gateways | sent/s each | answered/s each | 429s | request-path Table ops per roomy request admitted "
          "(the roomy key gets half the rate) "
          "| latency p50 / p95, no limits (ms) | added by the quota, p50 / p95 (ms) | gateway CPU (cores) |")
    print("|---:|---:|---:|---:|---:|---|---|---:|")
    for c in cells:
        d = c.latency
        admitted = len(d.of(200, key=1))
        print(f"| {c.instances} | {c.rate:g} | {d.achieved(c.instances):.1f} | {len(d.of(429))} | "
              f"{d.table_request_path / admitted if admitted else float('nan'):.3f} | "
              f"{_ms(d.latency_ms(200, 0.5, key=0))} / {_ms(d.latency_ms(200, 0.95, key=0))} | "
              f"{_added(d, 0.5)} / {_added(d, 0.95)} | {d.cpu_cores:.2f} |")
    print("\nRequest-path Table operations during the tight drives, by kind:")
    for c in cells:
        print(f"- {c.instances} x {c.rate:g}/s: {c.tight.table_by_kind or 'none'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", default="1,2,4", help="gateway counts, comma-separated")
    parser.add_argument("--rates", default="5,20,40", help="requests per second per gateway, comma-separated")
    parser.add_argument("--quota", type=int, default=None,
                        help="the tight key's tokens (default 3000) or requests (default 60) per minute")
    parser.add_argument("--limit", choices=sorted(LIMITS), default="tokens", help="what the tight key limits")
    parser.add_argument("--duration", type=float, default=None, help="seconds of the tight drive (default 60)")
    parser.add_argument("--latency-seconds", type=float, default=None,
                        help="seconds of the latency drive, keys without limits and roomy in turn (default 30)")
    parser.add_argument("--max-tokens", type=int, default=20)
    parser.add_argument("--regions", type=int, choices=(1, 2), default=1)
    parser.add_argument("--no-align", dest="align", action="store_false",
                        help="start the tight drive at once, not at the start of a UTC minute")
    parser.add_argument("--quick", action="store_true",
                        help="tight drives of 15 s, latency drives of 10 s, not aligned: about 5 minutes in all")
    args = parser.parse_args()
    if LIMITS[args.limit] not in {f.name for f in fields(Limits)}:
        parser.error(f"--limit {args.limit}: this gateway's keys have no {LIMITS[args.limit]}")
    args.quota = args.quota or {"tokens": 3000, "requests": 60}[args.limit]
    if args.quick:
        args.duration = args.duration or 15.0
        args.latency_seconds = args.latency_seconds or 10.0
        args.align = False
    args.duration = args.duration or 60.0
    args.latency_seconds = args.latency_seconds or 30.0
    instances = [int(n) for n in args.instances.split(",")]
    rates = [float(r) for r in args.rates.split(",")]
    started = time.monotonic()
    cells: list[Cell] = []
    with azurite() as storage, counting_table_proxy(storage) as proxy, ExitStack() as stack:
        regions = []
        for index in range(args.regions):
            port = free_port()
            stack.enter_context(process(
                [sys.executable, "-m", "devkit.simulator", "--port", str(port), "--api-key", API_KEY,
                 "--region", f"region{index}", "--chunk-delay-ms", "0", "--chunks", "20"], port))
            regions.append(f"http://127.0.0.1:{port}")
        for count in instances:
            with cluster(count, proxy, regions) as gateways:
                warm = asyncio.run(gateways.make_key(f"scale-warm-{uuid.uuid4().hex[:8]}", Limits()))
                asyncio.run(gateways.warm(warm, args.max_tokens, requests=5))
                for rate in rates:
                    cells.append(asyncio.run(run_cell(gateways, count, rate, args)))
    report(cells, args, time.monotonic() - started)


if __name__ == "__main__":
    main()
