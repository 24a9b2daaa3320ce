"""Aggregating usage events into Table Storage, each event counted exactly once.

Per partition (one key's month) and batch: a query reads the counter rows it will touch, then a
second reads the ledger rows of the batch's minutes; events already in a ledger are dropped; then
ONE entity-group transaction updates the counters (``If-Match`` on their ETags, or creates them)
and inserts a ledger row listing the new events' ids. Atomicity makes the ids and the counts land
together; the ETags make two aggregators that race over the same events conflict, and the loser
starts again from the read, where it finds the winner's ledger. So a redelivered or re-raced
event changes nothing.

Cost is counted the same way: each event is priced here, never on the request path (``PRICES``: the
entry in force at its time, with its backend's override), and its nano-units (or, with no price in
force, one unpriced request) are counters of the same rows, in the same transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random as _random
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError
from azure.data.tables import (
    TableEntity,
    TableTransactionError,
    TransactionOperation,
    UpdateMode,
)
from azure.data.tables.aio import TableClient, TableServiceClient

from usage._events import MalformedEvent, UsageEvent, decode_event
from usage._metrics import usage_meter
from usage._prices import Prices
from usage._rejects import reject_entity
from usage._schema import (
    COST_COUNTERS,
    COUNTERS,
    PERIODS,
    REJECTS_TABLE,
    USAGE_TABLE,
    counter_row,
    ledger_prefix,
    partition_key,
    period_start,
)
from usage._tables import as_int, int64

log = logging.getLogger(__name__)

MAX_OPERATIONS = 100  # Table Storage's limit per entity-group transaction
IDS_PER_LEDGER_ROW = 900  # 33 characters each: well under a string property's 64 KiB
_ROWS_PER_QUERY = 14  # a filter may hold 15 comparisons: PartitionKey and 14 rows
INT64_MAX = 2**63 - 1
_CONFLICTS = {"UpdateConditionNotSatisfied", "EntityAlreadyExists", "ConditionNotMet"}
_ALL_COUNTERS = COUNTERS + COST_COUNTERS
_LAG_BUCKETS = [0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 86400]


class AggregationConflict(RuntimeError):
    """A partition kept conflicting with other aggregators; the batch should be retried."""


class _Conflict(Exception):
    pass


@dataclass(frozen=True, slots=True)
class BatchResult:
    counted: int
    duplicates: int
    rejected: int
    transactions: int
    partitions: int


@dataclass(frozen=True, slots=True)
class _Message:
    body: bytes | str
    message_id: str | None


@dataclass(frozen=True, slots=True)
class _Reject:
    message: _Message
    reason: str


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What applying some of a partition's events did."""

    counted: int = 0
    duplicates: int = 0
    transactions: int = 0
    too_large: tuple[UsageEvent, ...] = ()  # would take a counter past Int64

    def __add__(self, other: _Outcome) -> _Outcome:
        return _Outcome(self.counted + other.counted, self.duplicates + other.duplicates,
                        self.transactions + other.transactions, self.too_large + other.too_large)


@dataclass(frozen=True, slots=True)
class _Counted:
    """An event to count, with what it adds to each counter and the currency its rows are in."""

    event: UsageEvent
    increments: tuple[int, ...]
    #: the price's currency; for an unpriced event, its deployment's in PRICES (``None``: it has none)
    currency: str | None

    @property
    def unpriced(self) -> bool:
        return self.increments[-1] == 1


def _increments(event: UsageEvent, cost: int | None) -> tuple[int, ...]:
    """What ``event`` adds to ``_ALL_COUNTERS``: tokens, then its cost (or one unpriced request, unless it is a
    refusal that used no tokens: an error answer with 0 tokens costs nothing and is no unpriced usage)."""
    return (1, event.prompt_tokens, event.completion_tokens, event.total_tokens, event.cached_tokens,
            event.reasoning_tokens, event.total_tokens if event.estimated else 0,
            0 if cost is None else cost, 1 if cost is None and (event.total_tokens > 0 or event.status < 400) else 0)


def _fitting(
    events: list[UsageEvent], existing: dict[str, TableEntity], prices: Prices
) -> tuple[list[_Counted], list[UsageEvent]]:
    """The events priced and counted, keeping every counter they touch within Int64, and the others.

    An event is unpriced when no price is in force for it, or when a row it touches already holds a
    cost in another currency (``PRICES`` changed a deployment's currency within the row's period).
    A row's ``Currency`` is its deployment's, also while only unpriced usage is in it.
    """
    totals = {row: [as_int(entity.get(name)) for name in _ALL_COUNTERS] for row, entity in existing.items()}
    currencies = {row: str(entity.get("Currency") or "") for row, entity in existing.items()}
    fitting: list[_Counted] = []
    too_large: list[UsageEvent] = []
    for event in events:
        rows = [counter_row(p, event.time, event.deployment) for p in PERIODS]
        held = {currencies[row] for row in rows if currencies.get(row)}
        price = prices.lookup(event.deployment, event.backend or None, event.time)
        if price is not None and held - {price.currency}:
            log.warning("usage event %s of %s is counted unpriced: its rows already hold a cost in %s, "
                        "PRICES now says %s", event.event_id, event.deployment, sorted(held), price.currency)
            price = None
        cost = None if price is None else price.cost_nano(event.prompt_tokens, event.cached_tokens,
                                                          event.completion_tokens)
        currency = price.currency if price is not None else prices.currency(event.deployment)
        if currency is not None and held - {currency}:
            currency = None  # rows already in another currency keep it
        increments = _increments(event, cost)
        after = {row: [a + b for a, b in zip(totals.get(row, [0] * len(_ALL_COUNTERS)), increments, strict=True)]
                 for row in rows}
        if max(max(amounts) for amounts in after.values()) > INT64_MAX:
            too_large.append(event)
        else:
            totals.update(after)
            if currency is not None:
                currencies.update(dict.fromkeys(rows, currency))
            fitting.append(_Counted(event, increments, currency))
    return fitting, too_large


def _decode(messages: list[_Message]) -> tuple[dict[str, UsageEvent], dict[str, _Message], list[_Reject]]:
    """The batch's events by id (the first of each id), the message each came from, and the rejects."""
    events: dict[str, UsageEvent] = {}
    sources: dict[str, _Message] = {}
    rejects: list[_Reject] = []
    for message in messages:
        try:
            event = decode_event(message.body)
        except MalformedEvent as exc:
            rejects.append(_Reject(message, str(exc)))
            continue
        if event.event_id not in events:
            events[event.event_id] = event
            sources[event.event_id] = message
    return events, sources, rejects


class Aggregator:
    """Counts batches of usage events into the ``usage`` table; keeps malformed ones in ``usagerejects``."""

    def __init__(
        self,
        service: TableServiceClient,
        *,
        prices: Prices | None = None,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        random: Callable[[], float] = _random.random,
        max_attempts: int = 100,
        concurrency: int = 16,
    ) -> None:
        self._service = service
        #: ``PRICES``: what each event costs; none: every event is counted as unpriced
        self._prices = Prices() if prices is None else prices
        self._usage: TableClient = service.get_table_client(USAGE_TABLE)
        self._rejects: TableClient = service.get_table_client(REJECTS_TABLE)
        self._sleep = sleep
        self._random = random
        self._max_attempts = max_attempts
        self._limit = asyncio.Semaphore(concurrency)
        self._tables_ready = False
        #: Table Storage calls made, for the benchmark: queries, transactions, reject writes.
        self.table_requests = 0
        meter = usage_meter()  # no-ops unless the process set up telemetry before making the aggregator
        self._counted = meter.create_counter("aoai_gateway.usage.counted", unit="{event}",
                                             description="Usage events the aggregator counted")
        self._rejected = meter.create_counter("aoai_gateway.usage.rejected", unit="{event}",
                                              description="Usage messages the aggregator rejected")
        self._unpriced = meter.create_counter("aoai_gateway.usage.unpriced", unit="{event}",
                                              description="Usage events counted with no price in force")
        self._lag = meter.create_histogram("aoai_gateway.usage.lag", unit="s",
                                           description="From an event's time to its being counted",
                                           explicit_bucket_boundaries_advisory=_LAG_BUCKETS)

    async def ensure_tables(self) -> None:
        if self._tables_ready:
            return
        for name in (USAGE_TABLE, REJECTS_TABLE):
            with contextlib.suppress(ResourceExistsError):
                await self._service.create_table(name)
        self._tables_ready = True

    async def aggregate(
        self, bodies: Sequence[bytes | str], *, message_ids: Sequence[str | None] | None = None
    ) -> BatchResult:
        """Count one batch of message bodies; keep those that cannot be counted in ``usagerejects``.

        Raises only on storage errors (the batch is then retried), never because of a message.
        """
        await self.ensure_tables()
        ids: Sequence[str | None] = [None] * len(bodies) if message_ids is None else message_ids
        events, sources, rejects = _decode([_Message(b, i) for b, i in zip(bodies, ids, strict=True)])
        in_batch_duplicates = len(bodies) - len(rejects) - len(events)
        partitions: dict[str, list[UsageEvent]] = defaultdict(list)
        for event in events.values():
            partitions[partition_key(event.key_name, event.time)].append(event)
        outcome = sum(await asyncio.gather(*(self._partition(pk, group) for pk, group in partitions.items())),
                      _Outcome())
        rejects += [_Reject(sources[e.event_id], "counting it would take a counter of its key's month past Int64")
                    for e in outcome.too_large]
        await asyncio.gather(*(self._reject(reject) for reject in rejects))
        self._counted.add(outcome.counted)
        self._rejected.add(len(rejects))
        return BatchResult(
            counted=outcome.counted,
            duplicates=in_batch_duplicates + outcome.duplicates,
            rejected=len(rejects),
            transactions=outcome.transactions,
            partitions=len(partitions),
        )

    async def _reject(self, reject: _Reject) -> None:
        entity = reject_entity(reject.message.body, reject.reason, reject.message.message_id, datetime.now(UTC))
        log.warning("usage message %r rejected: %s", entity["MessageId"], entity["Reason"])
        async with self._limit:
            self.table_requests += 1
            await self._rejects.upsert_entity(entity)

    async def _partition(self, pk: str, events: list[UsageEvent]) -> _Outcome:
        """What counting one partition's events did, retrying on conflicts."""
        async with self._limit:
            for attempt in range(self._max_attempts):
                try:
                    return await self._apply(pk, events)
                except _Conflict:
                    await self._sleep(min(0.2, 0.005 * 2 ** min(attempt, 6)) * (0.5 + self._random()))
        raise AggregationConflict(f"partition {pk} still conflicted after {self._max_attempts} attempts")

    async def _query(self, pk: str, terms: list[str], parameters: dict[str, Any]) -> list[TableEntity]:
        self.table_requests += 1
        # the SDK substitutes @names only when spaces surround them, hence "( ... )"
        found = self._usage.query_entities(
            f"PartitionKey eq @pk and ( {' or '.join(terms)} )", parameters={"pk": pk, **parameters})
        return [entity async for entity in found]

    async def _read(self, pk: str, events: list[UsageEvent], rows: list[str]) -> list[TableEntity]:
        """The counter rows, THEN the ledger rows of the events' minutes.

        The order is what makes the ETags sufficient: an aggregator that commits the same events
        after our ledger read committed after our counter reads too, so our counter ETags are stale
        and our transaction fails. (Read together, a commit could fall between the two.)
        """
        chunks = [rows[i:i + _ROWS_PER_QUERY] for i in range(0, len(rows), _ROWS_PER_QUERY)]
        pages = await asyncio.gather(*(
            self._query(pk, [f"RowKey eq @r{i}" for i in range(len(chunk))],
                        {f"r{i}": row for i, row in enumerate(chunk)})
            for chunk in chunks))
        minutes = sorted(period_start("minute", e.time) for e in events)
        ledgers = await self._query(pk, ["( RowKey ge @lf and RowKey lt @lt )"],
                                    {"lf": f"ledger|{minutes[0]}|", "lt": f"ledger|{minutes[-1]}|~"})
        return [entity for page in pages for entity in page] + ledgers

    async def _state(self, pk: str, events: list[UsageEvent]) -> tuple[set[str], dict[str, TableEntity]]:
        """The ids the partition's ledgers have counted, and its counter rows that ``events`` touch."""
        rows = sorted({counter_row(p, e.time, e.deployment) for e in events for p in PERIODS})
        seen: set[str] = set()
        existing: dict[str, TableEntity] = {}
        for entity in await self._read(pk, events, rows):
            row_key = str(entity["RowKey"])
            if row_key.startswith("ledger|"):
                seen.update(str(entity.get("Ids", "")).split(","))
            else:
                existing[row_key] = entity
        return seen, existing

    async def _apply(self, pk: str, events: list[UsageEvent]) -> _Outcome:
        seen, existing = await self._state(pk, events)
        fresh, too_large = _fitting([e for e in events if e.event_id not in seen], existing, self._prices)
        skipped = _Outcome(duplicates=sum(e.event_id in seen for e in events), too_large=tuple(too_large))
        if not fresh:
            return skipped
        operations = self._operations(pk, fresh, existing)
        if len(operations) > MAX_OPERATIONS:  # too much for one transaction: halve and go again
            half = len(fresh) // 2
            return (skipped + await self._apply(pk, [c.event for c in fresh[:half]])
                    + await self._apply(pk, [c.event for c in fresh[half:]]))
        self.table_requests += 1
        try:
            await self._usage.submit_transaction(operations)
        except TableTransactionError as exc:
            if exc.status_code in (409, 412) or str(getattr(exc, "error_code", "")) in _CONFLICTS:
                raise _Conflict from exc
            raise
        now = datetime.now(UTC)
        for counted in fresh:
            self._lag.record(max(0.0, (now - counted.event.time).total_seconds()))
        self._unpriced.add(sum(c.unpriced for c in fresh))
        return skipped + _Outcome(counted=len(fresh), transactions=1)

    def _operations(
        self, pk: str, fresh: list[_Counted], existing: dict[str, TableEntity]
    ) -> list[Any]:
        totals: dict[str, list[int]] = {}
        described: dict[str, tuple[str, str, str]] = {}
        currencies = {row: str(entity.get("Currency") or "") for row, entity in existing.items()}
        for counted in fresh:
            event = counted.event
            for period in PERIODS:
                row = counter_row(period, event.time, event.deployment)
                current = totals.setdefault(row, [0] * len(_ALL_COUNTERS))
                for i, amount in enumerate(counted.increments):
                    current[i] += amount
                described[row] = (period, period_start(period, event.time), event.deployment)
                if counted.currency is not None and not currencies.get(row):
                    currencies[row] = counted.currency
        key_name = pk.split("|", 1)[1]
        operations: list[Any] = []
        for row, amounts in totals.items():
            period, start, deployment = described[row]
            entity: dict[str, Any] = {"PartitionKey": pk, "RowKey": row, "Key": key_name,
                                      "Deployment": deployment, "Period": period, "Start": start,
                                      "Currency": currencies.get(row, "")}
            before = existing.get(row)
            for name, amount in zip(_ALL_COUNTERS, amounts, strict=True):
                entity[name] = int64(amount + (as_int(before.get(name)) if before is not None else 0))
            if before is None:
                operations.append((TransactionOperation.CREATE, entity))
            else:
                operations.append((TransactionOperation.UPDATE, entity, {
                    "mode": UpdateMode.REPLACE, "etag": before.metadata["etag"],
                    "match_condition": MatchConditions.IfNotModified}))
        by_minute: dict[str, list[str]] = defaultdict(list)
        for counted in fresh:
            by_minute[ledger_prefix(counted.event.time)].append(counted.event.event_id)
        for prefix, ids in by_minute.items():
            for first in range(0, len(ids), IDS_PER_LEDGER_ROW):
                chunk = ids[first:first + IDS_PER_LEDGER_ROW]
                operations.append((TransactionOperation.CREATE, {
                    "PartitionKey": pk, "RowKey": prefix + uuid.uuid4().hex, "Ids": ",".join(chunk),
                    "Count": len(chunk)}))
        return operations
