"""Shared budgets: the quota of a key's window, leased to the instances in slices from one Table Storage row.

Table ``quotabudgets``, one row per key (PartitionKey = the key's name, RowKey ``budget``), two columns per
meter: ``<Meter>Period``, the window the meter counts (``2026-11-30T10:29``, ``2026-11-30``, ``2026-11``, as
the usage table spells them), and ``<Meter>Granted`` (Int64), how much of that window's quota the instances
together have taken out of it. The meters: ``TokensMinute``, ``TokensDay``, ``TokensMonth``,
``RequestsMinute`` and ``CostMonth`` (nano-units of currency). A granted figure whose period is not the
current window's counts as 0: the first lease of a new window starts it afresh.

An instance takes a slice for each of the key's limited meters in one conditional write (If-Match on the
ETag it last saw; on 412 it reads the row again and recomputes), and admits requests from its slices in
memory: a request takes its reservation (prompt estimate plus the largest output cap, one request, the
reservation's price) out of the slice, and its settlement gives the difference back to the slice, or takes
what it used beyond the reservation. What a slice cannot cover is owed and written with the next lease.
Before a slice runs dry the next one is leased in the background, so a busy key makes no Table call on the
request path. A slice is what the instance expects to use in ``LEASE_HORIZON`` seconds (at least
``MIN_REQUESTS_PER_SLICE`` typical reservations), never more than half of what the window has left (but
enough for the waiting request): slices shrink as the window runs out.

**Bound.** A lease never takes the granted total past the quota, and an instance admits only what its
slices hold, so the reservations admitted in a window by all instances together are at most the quota.
Real usage passes it only by what requests use beyond their reservations (a prompt longer than its
estimate, a completion without ``max_tokens``), and during a storage outage by what a failing-open
instance admits from the last figures it knew (at most the quota's remainder as it last saw it, per
instance). Usage counted in the ``usage`` table that the row does not show (usage before the row, admissions
of failing-open instances) raises the granted figure at the next lease: ``granted = max(granted, counted)``.
Unused slices are handed back when the instance stops; a slice left at a window's end lapses with it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient

from usage import Limits, bounded
from usage._tables import as_int, int64

BUDGET_TABLE = "quotabudgets"
BUDGET_ROW = "budget"
#: a slice is what the instance expects to use in this many seconds ...
LEASE_HORIZON = 2.0
#: ... and at least this many typical reservations
MIN_REQUESTS_PER_SLICE = 10
#: a lease takes at most this share of what the window has left (more only for the waiting request)
SHARE_OF_REMAINING = 0.5


@dataclass(frozen=True, slots=True)
class Meter:
    """One quota: what it counts (``tokens``, ``requests``, ``cost``) over which window."""

    column: str
    window: str
    unit: str

    @property
    def period_column(self) -> str:
        return self.column + "Period"

    @property
    def granted_column(self) -> str:
        return self.column + "Granted"


TOKENS_MINUTE = Meter("TokensMinute", "minute", "tokens")
TOKENS_DAY = Meter("TokensDay", "day", "tokens")
TOKENS_MONTH = Meter("TokensMonth", "month", "tokens")
REQUESTS_MINUTE = Meter("RequestsMinute", "minute", "requests")
COST_MONTH = Meter("CostMonth", "month", "cost")
METERS = (TOKENS_MINUTE, TOKENS_DAY, TOKENS_MONTH, REQUESTS_MINUTE, COST_MONTH)
WINDOWS = ("minute", "day", "month")


def limit_of(limits: Limits, meter: Meter) -> int | None:
    return {
        TOKENS_MINUTE: limits.tokens_per_minute, TOKENS_DAY: limits.tokens_per_day,
        TOKENS_MONTH: limits.tokens_per_month, REQUESTS_MINUTE: limits.requests_per_minute,
        COST_MONTH: limits.budget_nano_per_month,
    }[meter]


def window_end(window: str, now: datetime) -> datetime:
    """When the UTC minute, day or month holding ``now`` ends."""
    if window == "minute":
        return now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    if window == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + timedelta(days=32)).replace(day=1)


@dataclass(slots=True)
class Account:
    """One meter of one key in this instance, for one window."""

    period: str
    held: int = 0  # leased and not yet reserved by a request
    seen: int = 0  # the window's granted total in the row, as this instance last read or wrote it
    counted: int = 0  # the window's usage in the usage table, as last read
    owed: int = 0  # taken beyond any slice (usage past a reservation, failing open); written at the next lease
    consumed: int = 0  # taken since ``rate_since``
    rate: float = 0.0  # taken per second, smoothed
    rate_since: float | None = None
    typical: int = 0  # a typical reservation, smoothed

    def known_used(self) -> int:
        """Everything taken out of the window as far as this instance knows (its own held slice included)."""
        return max(self.seen, self.counted) + self.owed

    def remaining(self, limit: int) -> int:
        """What the window has left for requests, as far as this instance knows: its slice plus the unleased."""
        return max(0, limit - self.known_used() + self.held)

    def take(self, amount: int) -> None:
        """A request's reservation out of the slice (past it: owed)."""
        covered = min(amount, max(self.held, 0))
        self.held -= covered
        self.owed += amount - covered
        self.consumed += amount
        self.typical = amount if self.typical == 0 else (self.typical * 3 + amount) // 4

    def give_back(self, amount: int) -> None:
        """A settled request used ``amount`` less than it reserved (negative: more)."""
        if amount >= 0:
            self.held += amount
            return
        covered = min(-amount, max(self.held, 0))
        self.held -= covered
        self.owed += -amount - covered
        self.consumed += -amount

    def target(self, need: int) -> int:
        """What to hold after a lease: ``LEASE_HORIZON`` seconds of use, at least ``MIN_REQUESTS_PER_SLICE``
        typical reservations, at least ``need``."""
        typical = max(self.typical, need, 1)
        return max(need, typical * MIN_REQUESTS_PER_SLICE, math.ceil(self.rate * LEASE_HORIZON))

    def note_rate(self, clock: float) -> None:
        """Fold what was taken since the last lease into the smoothed rate (the clock must have moved)."""
        if self.rate_since is None:
            self.rate_since = clock
            return
        elapsed = clock - self.rate_since
        if elapsed < 0.1:
            return
        rate = self.consumed / elapsed
        self.rate = rate if self.rate == 0 else (self.rate + rate) / 2
        self.consumed = 0
        self.rate_since = clock


def slice_to_lease(account: Account, *, limit: int, granted: int, need: int) -> int:
    """How much to lease for ``account`` when the row says ``granted`` is taken out of its window.

    Tops the slice up to its ``target``, taking at most ``SHARE_OF_REMAINING`` of what the window has left
    but enough for ``need`` (the waiting request's reservation); 0 when even that does not fit.
    """
    remaining = limit - max(granted, account.counted) - account.owed
    must = need - account.held
    want = account.target(need) - account.held
    if want <= 0 or remaining <= 0:
        return 0
    grant = min(want, max(must, int(remaining * SHARE_OF_REMAINING)), remaining)
    return grant if grant >= must else 0


class BudgetConflict(Exception):
    """The row changed since it was read (412), or someone created it first: read it again."""


class BudgetStore(Protocol):
    """Where the shared row lives: ``TableBudgets``, or a test's stand-in."""

    async def read(self, key: str) -> tuple[dict[str, Any], str] | None:
        """The key's row (columns to values) and its ETag; ``None`` when there is none."""
        ...

    async def write(self, key: str, values: Mapping[str, Any], etag: str | None) -> str:
        """Replace the row if its ETag is still ``etag`` (create it when ``None``); the new ETag."""
        ...


class TableBudgets:
    """The budget rows in Table Storage, each call bounded as request-path reads are."""

    def __init__(self, service: TableServiceClient, *, timeout: float) -> None:
        self._service = service
        self._table: TableClient = service.get_table_client(BUDGET_TABLE)
        self._options = bounded(timeout)

    async def read(self, key: str) -> tuple[dict[str, Any], str] | None:
        try:
            entity = await self._table.get_entity(key, BUDGET_ROW, **self._options)
        except ResourceNotFoundError:
            return None
        values = {name: value if isinstance(value, str) else as_int(value)
                  for name, value in entity.items() if name not in ("PartitionKey", "RowKey")}
        return values, str(entity.metadata["etag"])

    async def write(self, key: str, values: Mapping[str, Any], etag: str | None) -> str:
        entity = {"PartitionKey": key, "RowKey": BUDGET_ROW,
                  **{name: value if isinstance(value, str) else int64(value) for name, value in values.items()}}
        if etag is None:
            try:
                written = await self._create(entity)
            except ResourceExistsError:
                raise BudgetConflict(key) from None
        else:
            try:
                written = await self._table.update_entity(entity, mode=UpdateMode.REPLACE, etag=etag,
                                                          match_condition=MatchConditions.IfNotModified,
                                                          **self._options)
            except (ResourceModifiedError, ResourceNotFoundError):
                raise BudgetConflict(key) from None
            except HttpResponseError as exc:
                if exc.status_code == 412:
                    raise BudgetConflict(key) from None
                raise
        return str(written["etag"])

    async def _create(self, entity: dict[str, Any]) -> Mapping[str, Any]:
        try:
            return await self._table.create_entity(entity, **self._options)
        except ResourceNotFoundError:  # no table yet
            with contextlib.suppress(ResourceExistsError):
                await self._service.create_table(BUDGET_TABLE, **self._options)
            return await self._table.create_entity(entity, **self._options)
