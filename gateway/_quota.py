"""Token quotas per key: checked before proxying, from the usage table plus this instance's own
admitted-but-not-yet-aggregated tokens.

At admission a request reserves its prompt estimate plus ``max_tokens`` (or
``max_completion_tokens``); when it ends the reservation becomes its real usage and stays counted
for ``QUOTA_SETTLE_SECONDS`` more, the time the event needs to reach the table. Windows are fixed
UTC minutes, days and months, the periods the aggregator counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from azure.core.exceptions import AzureError, ResourceNotFoundError
from azure.data.tables.aio import TableClient, TableServiceClient

from gateway._exceptions import BadRequest, QuotaExceeded, retry_after_headers
from usage._keys import KeyRecord, Limits
from usage._schema import USAGE_TABLE, partition_key, period_start
from usage._tables import as_int

log = logging.getLogger(__name__)

_WINDOWS = ("minute", "day", "month")
REMAINING_HEADER = "x-ratelimit-remaining-tokens"


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
    expires: float


@dataclass(slots=True)
class _KeyState:
    reservations: list[Reservation] = field(default_factory=list)
    cached: _Cached | None = None


class QuotaGuard:
    """Admits or refuses requests against their key's quotas."""

    def __init__(
        self,
        service: TableServiceClient,
        *,
        cache_seconds: float,
        settle_seconds: float,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self._table: TableClient = service.get_table_client(USAGE_TABLE)
        self._cache_seconds = cache_seconds
        self.settle_seconds = settle_seconds
        self._clock = clock
        self._wall_clock = wall_clock
        self._keys: dict[str, _KeyState] = {}

    async def _table_usage(self, key: str, now: datetime, windows: dict[str, str]) -> dict[str, int]:
        """Total tokens of ``key`` in each current window, over all deployments, from the table."""
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
                select=["RowKey", "TotalTokens"],
            ):
                totals[str(entity["RowKey"]).split("|", 1)[0]] += as_int(entity.get("TotalTokens"))
        except ResourceNotFoundError:  # no usage table yet: nothing used
            pass
        return totals

    async def _used(self, key: str, state: _KeyState, now: datetime, windows: dict[str, str]) -> dict[str, int]:
        cached = state.cached
        if cached is None or cached.windows != windows or cached.expires <= self._clock():
            try:
                values = await self._table_usage(key, now, windows)
            except AzureError as exc:  # fail open on the table, keep counting this instance's own
                log.warning("quota: cannot read usage of %s (%s); counting this instance's only",
                            key, type(exc).__name__)
                values = dict.fromkeys(_WINDOWS, 0)
            cached = state.cached = _Cached(values, windows, self._clock() + self._cache_seconds)
        return cached.values

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
