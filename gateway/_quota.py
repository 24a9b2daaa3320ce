"""Token quotas per key: checked before proxying, from the usage table plus this instance's own
admitted-but-not-yet-aggregated tokens.

At admission a request reserves its prompt estimate plus ``max_tokens`` (or
``max_completion_tokens``); when it ends the reservation becomes its real usage and stays counted
for ``QUOTA_SETTLE_SECONDS`` more, the time the event needs to reach the table. Windows are fixed
UTC minutes, days and months, the periods the aggregator counts.

A key's usage read from the table is reused for ``QUOTA_CACHE_SECONDS`` and re-read in the
background before that runs out, so a busy key never waits for the table. A request that finds no
usable figure (first use, a new window, a long pause) waits for the read at most
``QUOTA_READ_TIMEOUT_SECONDS``; when the table cannot be read in time the gateway fails open on the
table part (the last figures read for windows still current, else nothing) and keeps counting its own
admissions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Protocol

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables.aio import TableClient, TableServiceClient

from gateway._exceptions import BadRequest, QuotaExceeded, retry_after_headers
from usage import STORAGE_ERRORS, KeyRecord, Limits, bounded
from usage._schema import USAGE_TABLE, partition_key, period_start
from usage._tables import as_int

log = logging.getLogger(__name__)

_WINDOWS = ("minute", "day", "month")
REMAINING_HEADER = "x-ratelimit-remaining-tokens"
#: A key's usage is re-read in the background once this share of ``QUOTA_CACHE_SECONDS`` has passed.
REFRESH_AHEAD = 0.8


def _window_end(window: str, now: datetime) -> datetime:
    if window == "minute":
        return now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    if window == "day":
        return now.replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
    first = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return (first + timedelta(days=32)).replace(day=1)


def _limit_of(limits: Limits, window: str) -> int | None:
    return {"minute": limits.tokens_per_minute, "day": limits.tokens_per_day, "month": limits.tokens_per_month}[window]


@dataclass(slots=True)
class Reservation:
    """One request's tokens, counted by this instance until the table has them."""

    windows: dict[str, str]  # window -> period start, when the request was admitted
    tokens: int
    expires: float | None = None  # clock time after which the table is trusted instead
    remaining: int | None = None  # the key's remaining tokens after this admission

    def settle(self, tokens: int, *, until: float) -> None:
        self.tokens = tokens
        self.expires = until


@dataclass(slots=True)
class _Cached:
    values: dict[str, int]
    windows: dict[str, str]
    expires: float  # clock time until which the figures are used without waiting for the table
    refresh_at: float  # clock time from which a request starts a background read
    failed: bool = False  # the last read failed: used until one succeeds, no request waits meanwhile


@dataclass(slots=True)
class _KeyState:
    reservations: list[Reservation] = field(default_factory=list)
    cached: _Cached | None = None
    reading: asyncio.Task[None] | None = None


class UsageReader(Protocol):
    """Where a key's usage comes from: ``TableUsage``, or a test's stand-in."""

    async def read(self, key: str, now: datetime, windows: Mapping[str, str]) -> dict[str, int]: ...


class TableUsage:
    """A key's tokens in its current windows, over all deployments, from the usage table."""

    def __init__(self, service: TableServiceClient, *, timeout: float) -> None:
        self._table: TableClient = service.get_table_client(USAGE_TABLE)
        self._options = bounded(timeout)

    async def read(self, key: str, now: datetime, windows: Mapping[str, str]) -> dict[str, int]:
        terms = []
        parameters = {"pk": partition_key(key, now)}
        for window in _WINDOWS:
            parameters[f"{window}_lo"] = f"{window}|{windows[window]}|"
            parameters[f"{window}_hi"] = f"{window}|{windows[window]}|~"
            terms.append(f"( RowKey ge @{window}_lo and RowKey lt @{window}_hi )")
        totals = dict.fromkeys(_WINDOWS, 0)
        try:
            async for entity in self._table.query_entities(
                f"PartitionKey eq @pk and ( {' or '.join(terms)} )", parameters=parameters,
                select=["RowKey", "TotalTokens"], **self._options,
            ):
                totals[str(entity["RowKey"]).split("|", 1)[0]] += as_int(entity.get("TotalTokens"))
        except ResourceNotFoundError:  # no usage table yet: nothing used
            pass
        return totals


def _known(cached: _Cached | None, windows: Mapping[str, str]) -> dict[str, int]:
    """The cached figures of the windows still current; 0 for the others."""
    if cached is None:
        return dict.fromkeys(_WINDOWS, 0)
    return {w: cached.values[w] if cached.windows[w] == windows[w] else 0 for w in _WINDOWS}


class QuotaGuard:
    """Admits or refuses requests against their key's quotas.

    ``read_timeout`` is the longest a request waits for its key's usage; ``refresh_timeout`` bounds
    each read of the table, which goes on in the background for the next request once a request
    stopped waiting.
    """

    def __init__(
        self,
        usage: UsageReader,
        *,
        cache_seconds: float,
        settle_seconds: float,
        read_timeout: float,
        refresh_timeout: float,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self._usage = usage
        self._cache_seconds = cache_seconds
        self.settle_seconds = settle_seconds
        self._read_timeout = read_timeout
        self._refresh_timeout = refresh_timeout
        self._clock = clock
        self._wall_clock = wall_clock
        self._keys: dict[str, _KeyState] = {}

    async def _used(self, key: str, state: _KeyState, now: datetime, windows: dict[str, str]) -> dict[str, int]:
        """The key's usage in the table, as far as it is known without waiting long."""
        cached = state.cached
        clock = self._clock()
        current = cached is not None and cached.windows == windows and clock < cached.expires
        if cached is not None and (current or cached.failed):
            if clock >= cached.refresh_at or cached.windows != windows:
                self._read(key, state, now, windows)
            return _known(cached, windows)
        try:
            async with asyncio.timeout(self._read_timeout):
                await asyncio.shield(self._read(key, state, now, windows))
        except TimeoutError:
            log.warning("quota: usage of %s not read within %gs; counting what is known", key, self._read_timeout)
            return self._keep(state, _known(state.cached, windows), windows, failed=True)
        return _known(state.cached, windows)

    def _keep(
        self, state: _KeyState, values: dict[str, int], windows: dict[str, str], *, failed: bool = False
    ) -> dict[str, int]:
        """Use ``values`` for the next ``QUOTA_CACHE_SECONDS`` (re-read in the background before then)."""
        clock = self._clock()
        state.cached = _Cached(values, windows, clock + self._cache_seconds,
                               clock + self._cache_seconds * REFRESH_AHEAD, failed)
        return values

    def _read(self, key: str, state: _KeyState, now: datetime, windows: dict[str, str]) -> asyncio.Task[None]:
        """The running read of ``key``'s usage, started if there is none."""
        if state.reading is None:
            state.reading = asyncio.create_task(self._refresh(key, state, now, windows), name="quota read")
            state.reading.add_done_callback(partial(self._read_done, key, state))
        return state.reading

    async def _refresh(self, key: str, state: _KeyState, now: datetime, windows: dict[str, str]) -> None:
        try:
            async with asyncio.timeout(self._refresh_timeout):
                values = await self._usage.read(key, now, windows)
        except STORAGE_ERRORS as exc:  # fail open on the table, keep counting this instance's own
            log.warning("quota: cannot read usage of %s (%s); counting this instance's admissions and the "
                        "last figures read", key, type(exc).__name__)
            self._keep(state, _known(state.cached, windows), windows, failed=True)
            return
        self._keep(state, values, windows)

    @staticmethod
    def _read_done(key: str, state: _KeyState, task: asyncio.Task[None]) -> None:
        state.reading = None
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("quota: reading usage of %s failed inside the gateway", key, exc_info=error)

    async def close(self) -> None:
        """Cancel the reads still running (at shutdown)."""
        tasks = [state.reading for state in self._keys.values() if state.reading is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def admit(self, key: KeyRecord, *, estimate: int) -> Reservation:
        """Reserve ``estimate`` tokens for ``key``, or raise ``QuotaExceeded`` (429)."""
        now = datetime.fromtimestamp(self._wall_clock(), UTC)
        windows = {window: period_start(window, now) for window in _WINDOWS}
        state = self._keys.setdefault(key.name, _KeyState())
        clock = self._clock()
        state.reservations = [r for r in state.reservations if r.expires is None or r.expires > clock]
        for window in _WINDOWS:
            limit = _limit_of(key.limits, window)
            if limit is not None and estimate > limit:  # no wait would ever let it in
                raise BadRequest(
                    f"This request may use about {estimate} tokens (prompt plus max_tokens), more than key "
                    f"'{key.name}' may use per {window} ({limit}). Lower max_tokens or shorten the prompt.",
                    code="QuotaTooSmall")
        table = await self._used(key.name, state, now, windows)
        remaining: int | None = None
        blocked: list[str] = []
        for window in _WINDOWS:
            limit = _limit_of(key.limits, window)
            if limit is None:
                continue
            used = table[window] + sum(r.tokens for r in state.reservations if r.windows[window] == windows[window])
            left = limit - used - estimate
            if left < 0:
                blocked.append(window)
            remaining = left if remaining is None else min(remaining, left)
        if blocked:
            wait = max((_window_end(w, now) - now).total_seconds() for w in blocked)
            left_now = max(0, (remaining or 0) + estimate)
            raise QuotaExceeded(
                f"Key '{key.name}' is over its token quota per {' and '.join(blocked)} "
                f"(this request needs about {estimate} tokens, {left_now} are left). "
                f"Please retry after {max(1, round(wait))} seconds.",
                headers={**retry_after_headers(wait), REMAINING_HEADER: str(left_now)},
            )
        reservation = Reservation(windows, estimate, remaining=None if remaining is None else max(0, remaining))
        state.reservations.append(reservation)
        return reservation
