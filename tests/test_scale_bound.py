"""Quotas that hold when several gateway processes share a key (issue 9): the bound and its cost.

Two and four gateways (each the real runtime in a worker process of its own) share one Table Storage,
reached through a relay that counts the operations (``devkit.table_proxy``). The test drives them
with the ``openai`` SDK at 40 requests/s each, ``max_tokens`` set, and reads what each admitted from
its usage records (the ones the aggregator counts into the ``usage`` table, which must agree).

Each gateway's worker runs on its shared clock (``gateway.clock``: what the quota's caches and leases run
on) and on a wall clock of real time plus what the test moved that clock by (its UTC minutes are the
quota windows). The tests move all four gateways' clocks together, so their wall clocks agree: at once,
to just before a minute ends (no waiting for it), then, during a drive, with real time (so the wall
clocks run at twice real speed then: a 12-second drive covers 24 seconds of the gateways' time).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import openai
import pytest
from azure.core.exceptions import ResourceNotFoundError

from devkit.table_proxy import CountingTableProxy, counting_table_proxy
from tests.fakes import CLOCK_START
from tests.harness import Gateway, eventually, running_gateway
from usage import open_table_service
from usage._keys import Limits
from usage._schema import USAGE_TABLE
from usage._tables import as_int

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]
RATE = 40.0  # requests per second per gateway
MAX_TOKENS = 20
QUOTA = 3000  # tokens per minute: spent in about a second at this rate
REQUESTS_QUOTA = 120  # requests per minute: as fast
TOLERANCE = 1.05
DRIVE_SECONDS = 12.0
#: the drive starts this long (gateway time) before a UTC minute ends: it covers a window's end and the next start
BEFORE_MINUTE_END = 6.0
MAX_TABLE_OPS_PER_ADMITTED = 0.2
WARM_UP_SECONDS = 3.0  # the steady state is measured after this


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request as the client saw it."""

    gateway: int
    status: int
    tokens: int  # total tokens of the response's usage (0 when refused)
    retry_after: str | None
    done: float  # time.monotonic() when the answer came
    remaining: tuple[str | None, str | None] = (None, None)  # x-ratelimit-remaining-tokens, -requests


@pytest.fixture(scope="module")
def table_proxy(storage: str) -> Iterator[CountingTableProxy]:
    with counting_table_proxy(storage) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def gateways(table_proxy: CountingTableProxy) -> Iterator[list[Gateway]]:
    """Four gateways on the one Table Storage (same KEY_HASH_SECRET, so one key works on all); their clocks
    are only ever moved together."""
    with ExitStack() as stack:
        running = [stack.enter_context(running_gateway(table_proxy.connection_string)) for _ in range(4)]
        assert len({gw.settings.key_hash_secret for gw in running}) == 1
        for gw in running:  # the worker's first requests load what it uses (tiktoken's tables, clients)
            client = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=gw.key, api_version="2024-10-21")
            for _ in range(3):
                assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices
        yield running


def gateway_time(gateways: list[Gateway]) -> float:
    """The gateways' wall clock (all alike: their shared clocks start alike and move together)."""
    assert len({gw.clock() for gw in gateways}) == 1
    return time.time() + (gateways[0].clock() - CLOCK_START)


def skip_to_window_end(gateways: list[Gateway], seconds_before: float) -> None:
    """Move every gateway's clocks forward to ``seconds_before`` before their UTC minute ends (the next
    minute's, if this one is closer to its end than that)."""
    into = gateway_time(gateways) % 60
    target = 60 - seconds_before
    ahead = target - into if into <= target else 60 - into + target
    for gw in gateways:
        gw.clock.advance(ahead)


@contextmanager
def clocks_in_step(gateways: list[Gateway]) -> Iterator[None]:
    """Move every gateway's clock with real time (their wall clocks then run at twice real speed)."""
    stop = threading.Event()

    def tick() -> None:
        last = time.monotonic()
        while not stop.wait(0.02):
            now = time.monotonic()
            for gw in gateways:
                gw.clock.advance(now - last)
            last = now

    ticker = threading.Thread(target=tick, name="clocks", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join(5)


async def _one(index: int, client: openai.AsyncAzureOpenAI) -> Outcome:
    try:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=MESSAGES, max_tokens=MAX_TOKENS)
    except openai.RateLimitError as refused:
        headers = refused.response.headers
        return Outcome(index, 429, 0, headers.get("retry-after"), time.monotonic(), _remaining(headers))
    except openai.APIStatusError as failed:  # told apart in the assertions, with the others
        return Outcome(index, failed.status_code, 0, None, time.monotonic())
    except openai.APIConnectionError:
        return Outcome(index, 0, 0, None, time.monotonic())
    usage = raw.parse().usage
    assert usage is not None
    return Outcome(index, raw.status_code, usage.total_tokens, None, time.monotonic(), _remaining(raw.headers))


def _remaining(headers: Any) -> tuple[str | None, str | None]:
    return headers.get("x-ratelimit-remaining-tokens"), headers.get("x-ratelimit-remaining-requests")


async def _drive(gateways: list[Gateway], key: str, seconds: float) -> list[Outcome]:
    """``RATE`` requests per second to each gateway for ``seconds`` (open loop: sent on time, whatever
    the answers' pace)."""
    clients = [openai.AsyncAzureOpenAI(azure_endpoint=gw.url, api_key=key, api_version="2024-10-21",
                                       max_retries=0, timeout=30.0) for gw in gateways]
    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for tick in range(math.ceil(RATE * seconds)):
        await asyncio.sleep(max(0.0, start + tick / RATE - loop.time()))
        tasks += [asyncio.create_task(_one(index, client)) for index, client in enumerate(clients)]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for client in clients:
            await client.close()


def drive(gateways: list[Gateway], key: str, *, clocks: list[Gateway], seconds: float = DRIVE_SECONDS
          ) -> list[Outcome]:
    """``_drive`` with ``clocks`` moving in step with real time, and the SDK's per-request DEBUG lines off
    (the load would spend its time logging)."""
    loggers = [logging.getLogger(name) for name in ("openai", "httpx", "httpcore", "httpcore2")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with clocks_in_step(clocks):
            return asyncio.run(_drive(gateways, key, seconds))
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def admitted_by_minute(gateways: list[Gateway], name: str, meter: str = "tokens") -> dict[str, int]:
    """Tokens (or requests) each UTC minute admitted for key ``name``, over all gateways, from their usage
    records (the records the aggregator counts, by the minute the request arrived)."""
    minutes: dict[str, int] = defaultdict(int)
    for gw in gateways:
        for record in gw.sink.records:
            if record.key_name == name and record.status == 200:
                minutes[record.time[:16]] += record.total_tokens if meter == "tokens" else 1
    return dict(minutes)


def table_minutes(gw: Gateway, name: str, minutes: list[str]) -> dict[str, int]:
    """The usage table's total tokens of ``name`` per minute (all deployments)."""

    async def read() -> dict[str, int]:
        totals = dict.fromkeys(minutes, 0)
        async with open_table_service(gw.settings.storage) as service:
            table = service.get_table_client(USAGE_TABLE)
            for minute in minutes:
                try:
                    async for row in table.query_entities(
                            "PartitionKey eq @pk and RowKey ge @lo and RowKey lt @hi",
                            parameters={"pk": f"{minute[:7]}|{name}", "lo": f"minute|{minute}|",
                                        "hi": f"minute|{minute}|~"}):
                        totals[minute] += as_int(row.get("TotalTokens"))
                except ResourceNotFoundError:  # no usage table yet
                    pass
        return totals

    return gw.loop.run(read())


def shared_key(gateways: list[Gateway], limits: Limits) -> tuple[str, str, int]:
    """A new key with ``limits``, already used once on each gateway (so none looks it up under load),
    and the tokens those first requests used."""
    name = f"shared-{uuid.uuid4().hex[:10]}"
    key = gateways[0].create_key(name, limits)
    used = 0
    for gw in gateways:
        client = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=key, api_version="2024-10-21", max_retries=0)
        usage = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=MAX_TOKENS).usage
        assert usage is not None
        used += usage.total_tokens
    return name, key, used


def statuses(outcomes: list[Outcome]) -> dict[int, int]:
    counted: dict[int, int] = defaultdict(int)
    for outcome in outcomes:
        counted[outcome.status] += 1
    return dict(counted)


@pytest.mark.parametrize(("instances", "meter"), [(2, "tokens"), (4, "tokens"), (2, "requests")])
def test_gateways_sharing_a_key_admit_at_most_its_minute_quota(
        gateways: list[Gateway], instances: int, meter: str) -> None:
    """At 40 requests/s per gateway with max_tokens set, the tokens (or requests) admitted for the key in
    each UTC minute stay within its quota x 1.05 plus one request's worth, whichever gateways admitted
    them; each gateway, once the quota is spent, refuses with 429 and Retry-After; every answer carries
    the key's own remaining figure."""
    group = gateways[:instances]
    limits = Limits(tokens_per_minute=QUOTA) if meter == "tokens" else Limits(requests_per_minute=REQUESTS_QUOTA)
    name, key, warm_up = shared_key(group, limits)
    skip_to_window_end(gateways, BEFORE_MINUTE_END)
    first_minute = datetime.fromtimestamp(gateway_time(gateways), UTC).isoformat()[:16]
    outcomes = drive(group, key, clocks=gateways)
    assert set(statuses(outcomes)) == {200, 429}, statuses(outcomes)

    admitted = [o for o in outcomes if o.status == 200]
    answered = warm_up + sum(o.tokens for o in admitted)
    eventually(lambda: sum(admitted_by_minute(group, name).values()) == answered, timeout=15,
               message=lambda: f"records {admitted_by_minute(group, name)} vs {answered} tokens answered")
    minutes = {m: used for m, used in admitted_by_minute(group, name, meter).items() if m >= first_minute}
    assert len(minutes) == 2, f"the drive covers the end of one minute and the start of the next: {minutes}"
    quota, one_request = (QUOTA, max(o.tokens for o in admitted)) if meter == "tokens" else (REQUESTS_QUOTA, 1)
    assert all(used <= quota * TOLERANCE + one_request for used in minutes.values()), (
        f"{instances} gateways admitted {minutes} {meter} per minute, over {quota} x {TOLERANCE} + {one_request}")
    assert all(used >= quota * 0.8 for used in minutes.values()), f"quota left unused: {minutes}"
    refused = [o for o in outcomes if o.status == 429]
    assert {o.gateway for o in refused} == set(range(instances))  # every gateway met the shared limit
    assert all(o.retry_after is not None and int(o.retry_after) >= 1 for o in refused)
    position = 0 if meter == "tokens" else 1
    figures = [o.remaining[position] for o in outcomes]
    assert all(f is not None and 0 <= int(f) <= quota for f in figures), sorted(set(figures), key=str)[:10]
    tokens = admitted_by_minute(group, name)  # what the usage table counts (its Requests count refusals too)
    eventually(lambda: table_minutes(group[0], name, list(tokens)) == tokens, timeout=15,
               message=lambda: f"usage table {table_minutes(group[0], name, list(tokens))} vs records {tokens}")


@pytest.mark.parametrize("instances", [2, 4])
def test_shared_quota_costs_few_table_operations_per_admitted_request(
        gateways: list[Gateway], table_proxy: CountingTableProxy, instances: int) -> None:
    """Gateways at 40 requests/s each under a key whose minute quota they do not reach: every request is
    admitted, and in the steady state the request path (key lookups, quota reads or budget leases; not
    the usage aggregation, which runs off the request path in Azure) makes at most 0.2 Table operations
    per admitted request."""
    group = gateways[:instances]
    per_minute = int(RATE * len(group) * 60 * 40 * 1.5)  # ~40 tokens a request: the drive uses under 2/3
    _, key, _ = shared_key(group, Limits(tokens_per_minute=per_minute))
    started = time.monotonic()
    outcomes = drive(group, key, clocks=gateways)
    ended = time.monotonic()

    counts = statuses(outcomes)
    dropped = counts.pop(0, 0)  # connections the local host's front dropped on a loaded 2-core box (1 in 1,920
    assert counts == {200: len(outcomes) - dropped}  # once in CI): not the quota's doing; none refused, none failed
    assert dropped <= len(outcomes) // 1000
    steady = started + WARM_UP_SECONDS
    relayed = table_proxy.between(steady, ended)
    operations = [op for op in relayed if not op.aggregation]
    assert operations and len(operations) < len(relayed)  # the relay saw both the quota's and the aggregator's
    admitted = sum(steady <= o.done for o in outcomes)
    per_request = len(operations) / admitted
    summary: dict[str, int] = defaultdict(int)
    for op in operations:
        summary[f"{op.method} {op.table}"] += 1
    assert per_request <= MAX_TABLE_OPS_PER_ADMITTED, (
        f"{len(operations)} Table operations for {admitted} admitted requests: {dict(summary)}")
