"""Quotas per key, shared by every instance: admission from leased slices (``_budget``), settlement to usage.

At admission a request reserves, out of this instance's slice of each of its key's limited meters, its
prompt estimate plus the largest output cap the body sets (tokens), one request (requests per minute) and
that reservation priced at the highest rate of the deployment's price in force (the money budget). When it
ends, the reservation is settled to its real usage: the difference goes back to the slice, or what it used beyond the
reservation is taken too. Windows are fixed UTC minutes, days and months, the periods the aggregator counts.

Slices are leased from the key's row in the ``quotabudgets`` table (see ``_budget`` for the row and the
bound), ahead of need and in the background, so a busy key makes no Table call on the request path. The
key's usage in the ``usage`` table (tokens, requests and cost of its current windows) is read with the
leases, at most every ``QUOTA_CACHE_SECONDS``; counted usage that the row does not show raises the row.

A request whose slice cannot cover it waits for a lease at most ``QUOTA_READ_TIMEOUT_SECONDS``. When the
lease fails (storage down or hung) the instance, by default, fails open: it admits from what it knew (the
window's remainder as it last saw it, counting its own admissions) and writes what it took with its next
lease; ``QUOTA_FAIL_CLOSED=true`` answers 503 with ``Retry-After`` instead. Either way it retries the row
only after ``FAILED_RETRY_SECONDS``, so an outage costs one request one wait, not every request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables.aio import TableClient, TableServiceClient

from gateway._budget import (
    COST_MONTH,
    METERS,
    REQUESTS_MINUTE,
    WINDOWS,
    Account,
    BudgetConflict,
    BudgetStore,
    Meter,
    limit_of,
    slice_to_lease,
    window_end,
)
from gateway._exceptions import BadRequest, QuotaExceeded, QuotaUnavailable, retry_after_headers
from usage import STORAGE_ERRORS, KeyRecord, bounded
from usage._schema import USAGE_TABLE, partition_key, period_start
from usage._tables import as_int

log = logging.getLogger(__name__)

REMAINING_HEADER = "x-ratelimit-remaining-tokens"
REMAINING_REQUESTS_HEADER = "x-ratelimit-remaining-requests"
QUOTA_HEADERS = frozenset({REMAINING_HEADER, REMAINING_REQUESTS_HEADER})
#: after a failed lease, the row is tried again only after this long (requests meanwhile do not wait)
FAILED_RETRY_SECONDS = 5.0
#: a key refused by what the instance knows re-reads its row at most this often (slices handed back)
RECHECK_SECONDS = 10.0
#: write conflicts (412) one lease rides out before it gives up until the next
MAX_CONFLICTS = 8
#: shares of a monthly money budget (percent) at which a warning is logged, once per key, month and instance
BUDGET_WARNINGS = (80, 100)
#: The usage table's column that counts each unit. Requests have none: its ``Requests`` counts every answer,
#: refusals included (a 400, a 403, a 429), which a request-rate limit must not count; the budget row alone
#: holds the requests admitted.
_USAGE_COLUMNS = {"tokens": "TotalTokens", "cost": "CostNano"}
_COUNTED_METERS = tuple(meter for meter in METERS if meter.unit in _USAGE_COLUMNS)


def _smoothed(typical: int, value: int) -> int:
    return value if typical == 0 else (typical * 3 + value) // 4


class UsageReader(Protocol):
    """Where a key's counted usage comes from: ``TableUsage``, or a test's stand-in."""

    async def read(self, key: str, now: datetime, windows: Mapping[str, str]) -> dict[Meter, int]: ...


class TableUsage:
    """A key's tokens and cost in its current windows, over all deployments, from the usage table."""

    def __init__(self, service: TableServiceClient, *, timeout: float) -> None:
        self._table: TableClient = service.get_table_client(USAGE_TABLE)
        self._options = bounded(timeout)

    async def read(self, key: str, now: datetime, windows: Mapping[str, str]) -> dict[Meter, int]:
        terms = []
        parameters = {"pk": partition_key(key, now)}
        for window in WINDOWS:
            parameters[f"{window}_lo"] = f"{window}|{windows[window]}|"
            parameters[f"{window}_hi"] = f"{window}|{windows[window]}|~"
            terms.append(f"( RowKey ge @{window}_lo and RowKey lt @{window}_hi )")
        totals = dict.fromkeys(_COUNTED_METERS, 0)
        try:
            async for entity in self._table.query_entities(
                f"PartitionKey eq @pk and ( {' or '.join(terms)} )", parameters=parameters,
                select=["RowKey", *_USAGE_COLUMNS.values()], **self._options,
            ):
                window = str(entity["RowKey"]).split("|", 1)[0]
                for meter in _COUNTED_METERS:
                    if meter.window == window:
                        totals[meter] += as_int(entity.get(_USAGE_COLUMNS[meter.unit]))
        except ResourceNotFoundError:  # no usage table yet: nothing used
            pass
        return totals


@dataclass(slots=True)
class Reservation:
    """What one admitted request took out of its key's slices, settled when its usage is known."""

    key: str
    taken: dict[Meter, tuple[str, int]]  # meter -> (its window's period, amount)
    remaining: int | None = None  # the key's x-ratelimit-remaining-tokens after this admission
    remaining_requests: int | None = None  # and -requests (None: a reservation of no key's limits)
    settled: bool = False

    @property
    def priced(self) -> bool:
        """It holds a money budget's reservation: its settlement needs the request's cost."""
        return COST_MONTH in self.taken

    def headers(self) -> dict[str, str]:
        """The key's own ``x-ratelimit-remaining-tokens`` and ``-requests`` (both, for a key with any limit)."""
        headers = {}
        if self.remaining is not None:
            headers[REMAINING_HEADER] = str(self.remaining)
        if self.remaining_requests is not None:
            headers[REMAINING_REQUESTS_HEADER] = str(self.remaining_requests)
        return headers


@dataclass(slots=True)
class _KeyState:
    accounts: dict[Meter, Account] = field(default_factory=dict)
    row: dict[str, Any] | None = None  # the row as last read or written
    etag: str | None = None  # None: read the row before writing it
    leasing: asyncio.Task[None] | None = None
    counted_at: float | None = None  # clock of the last usage read
    counted_windows: dict[str, str] | None = None
    failed_until: float = float("-inf")  # a failed lease: no request waits for the row until then
    last_lease: float = float("-inf")
    warned: set[tuple[str, int]] = field(default_factory=set)  # (month, percent) of the budget warnings logged
    budget: int | None = None  # the key's monthly money budget, as its last admission saw it
    typical_tokens: int = 0  # a typical admitted request's reservation, smoothed: tokens ...
    typical_cost: int = 0  # ... and nano-units

    def account(self, meter: Meter, period: str) -> Account:
        """The meter's account for ``period``; a request that arrived in a window already over (admitted just
        after its end, behind a newer one) is counted in the current window instead."""
        account = self.accounts.get(meter)
        if account is None or account.period < period:  # a new window: nothing held, nothing known
            account = self.accounts[meter] = Account(period)
        return account


class QuotaGuard:
    """Admits or refuses requests against their key's quotas, shared with every instance through ``budgets``.

    ``read_timeout`` is the longest a request waits for a lease; ``refresh_timeout`` bounds each lease, which
    goes on in the background once a request stopped waiting.
    """

    def __init__(
        self,
        usage: UsageReader,
        budgets: BudgetStore,
        *,
        cache_seconds: float,
        read_timeout: float,
        refresh_timeout: float,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        fail_closed: bool = False,
        on_budget_warning: Callable[[str, int], None] | None = None,
    ) -> None:
        self._usage = usage
        self._budgets = budgets
        self._cache_seconds = cache_seconds
        self._read_timeout = read_timeout
        self._refresh_timeout = refresh_timeout
        self._clock = clock
        self._wall_clock = wall_clock
        self._fail_closed = fail_closed
        self._on_budget_warning = on_budget_warning
        self._keys: dict[str, _KeyState] = {}

    # -- admission -----------------------------------------------------------------------------

    async def admit(self, key: KeyRecord, *, estimate: int, cost_nano: int = 0, arrived: float | None = None,
                    capped: bool = True) -> Reservation:
        """Reserve ``estimate`` tokens, one request and ``cost_nano`` for ``key``, or raise ``QuotaExceeded``
        (429), ``QuotaUnavailable`` (503, failing closed) or ``BadRequest`` (a request no window can hold).

        ``arrived`` (wall-clock seconds) picks the windows, as the aggregator does with the event's time. A
        request that sets no output cap (``capped=False``) also reserves, out of a money budget, the most a
        request of the key has cost beyond its reservation this month on this instance: requests without a cap
        in flight together then pass the budget by their completions beyond that, not by all of them.
        """
        now = datetime.fromtimestamp(self._wall_clock() if arrived is None else arrived, UTC)
        periods = {window: period_start(window, now) for window in WINDOWS}
        needs = self._needs(key, estimate, cost_nano)
        state = self._keys.setdefault(key.name, _KeyState())
        state.budget = key.limits.budget_nano_per_month
        state.typical_tokens = _smoothed(state.typical_tokens, estimate)
        state.typical_cost = _smoothed(state.typical_cost, cost_nano)
        accounts = {meter: state.account(meter, periods[meter.window]) for meter in needs}
        if not capped and COST_MONTH in needs and needs[COST_MONTH] > 0:
            needs[COST_MONTH] += accounts[COST_MONTH].overrun
        short = [m for m, need in needs.items() if accounts[m].held < need]
        if short:
            blocked = [m for m in short if self._known_blocked(key, m, accounts[m], needs[m])]
            if blocked:
                if self._clock() >= state.last_lease + RECHECK_SECONDS and state.leasing is None:
                    state.etag = None  # read the row afresh: a slice handed back may let it in later
                    self._lease(key, state, periods, needs)
            else:
                await self._wait_for_lease(key, state, periods, needs, accounts)
            # a money budget not yet spent admits a reservation larger than what is left: it takes all that is
            # left and owes the rest (the overshoot: this one request's cost, at most)
            blocked = [m for m, need in needs.items() if accounts[m].held < need and not (
                m is COST_MONTH and accounts[m].held > 0 and not self._known_blocked(key, m, accounts[m], need))]
            if blocked:
                raise self._refusal(key, accounts, needs, blocked, now)
        for meter, need in needs.items():
            accounts[meter].take(need)
        if state.leasing is None and self._clock() >= state.failed_until and any(
                accounts[m].held < accounts[m].target(0) // 2
                and accounts[m].remaining(self._limit(key, m)) > accounts[m].held for m in needs):
            self._lease(key, state, periods, {})  # the next slice, before this one runs dry
        reservation = Reservation(key.name, {m: (accounts[m].period, need) for m, need in needs.items()})
        reservation.remaining, reservation.remaining_requests = self._remaining(key, state, accounts)
        return reservation

    def remaining_headers(self, key: KeyRecord) -> dict[str, str]:
        """The key's ``x-ratelimit-remaining-*`` as this instance knows them, without admitting anything (for an
        answer refused before admission)."""
        now = datetime.fromtimestamp(self._wall_clock(), UTC)
        state = self._keys.setdefault(key.name, _KeyState())
        accounts = {meter: state.account(meter, period_start(meter.window, now)) for meter in METERS
                    if limit_of(key.limits, meter) is not None}
        reservation = Reservation(key.name, {})
        reservation.remaining, reservation.remaining_requests = self._remaining(key, state, accounts)
        return reservation.headers()

    def settle(self, reservation: Reservation, *, tokens: int, cost_nano: int = 0) -> None:
        """The request used ``tokens`` and cost ``cost_nano``: give back what it reserved beyond that, or take more."""
        if reservation.settled:
            return
        reservation.settled = True
        state = self._keys.get(reservation.key)
        if state is None:
            return
        for meter, (period, reserved) in reservation.taken.items():
            account = state.accounts.get(meter)
            if account is None or account.period != period:
                continue  # that window is over
            used = {"tokens": tokens, "requests": 1, "cost": cost_nano}[meter.unit]
            account.give_back(reserved - used)
            account.settled += used
            account.overrun = max(account.overrun, used - reserved)
            if meter is COST_MONTH:
                self._warn_budget(reservation.key, state, account)

    def _warn_budget(self, name: str, state: _KeyState, account: Account) -> None:
        """Log (and count) a key passing 80% and 100% of its monthly budget, once each per month and instance: by
        the money really spent (counted, and this instance's settled costs), never slices or reservations."""
        limit = state.budget
        if limit is None:
            return
        spent = account.spent()
        for percent in BUDGET_WARNINGS:
            if (account.period, percent) in state.warned or spent * 100 < limit * percent:
                continue
            state.warned.add((account.period, percent))
            log.warning("quota: key %s has spent %d%% of its monthly budget (%s)", name, percent, account.period)
            if self._on_budget_warning is not None:
                self._on_budget_warning(name, percent)

    @staticmethod
    def _limit(key: KeyRecord, meter: Meter) -> int:
        limit = limit_of(key.limits, meter)
        assert limit is not None
        return limit

    @staticmethod
    def _needs(key: KeyRecord, estimate: int, cost_nano: int) -> dict[Meter, int]:
        needs: dict[Meter, int] = {}
        for meter in METERS:
            limit = limit_of(key.limits, meter)
            if limit is None:
                continue
            need = {"tokens": estimate, "requests": 1, "cost": cost_nano}[meter.unit]
            if meter.unit == "tokens" and need > limit:  # no wait would ever let it in
                raise BadRequest(
                    f"This request may use about {estimate} tokens (prompt plus max_tokens), more than key "
                    f"'{key.name}' may use per {meter.window} ({limit}). Lower max_tokens or shorten the prompt.",
                    code="QuotaTooSmall")
            needs[meter] = need
        return needs

    def _known_blocked(self, key: KeyRecord, meter: Meter, account: Account, need: int) -> bool:
        """Even the whole remainder this instance knows of cannot hold ``need`` (a money budget: nothing is left
        at all): no lease can help."""
        left = self._limit(key, meter) - account.known_used() + account.held
        return left <= 0 if meter is COST_MONTH else left < need

    def _leased_enough(self, key: KeyRecord, meter: Meter, account: Account, need: int) -> bool:
        """No further lease can do more for ``need``: it is held, or (a money budget) nothing is left to lease."""
        if account.held >= need or self._known_blocked(key, meter, account, need):
            return True
        return meter is COST_MONTH and self._limit(key, meter) - account.known_used() <= 0

    async def _wait_for_lease(self, key: KeyRecord, state: _KeyState, periods: dict[str, str],
                              needs: dict[Meter, int], accounts: dict[Meter, Account]) -> None:
        """Lease what ``needs`` lacks, waiting at most ``QUOTA_READ_TIMEOUT_SECONDS``; when the row cannot be
        leased, fail open (admit from what this instance knows) or closed (503)."""
        for _ in range(2):  # a lease ahead already running may not cover this request: then one of its own
            if self._clock() < state.failed_until:
                break
            task = state.leasing if state.leasing is not None else self._lease(key, state, periods, needs)
            try:
                async with asyncio.timeout(self._read_timeout):
                    await asyncio.shield(task)
            except TimeoutError:
                log.warning("quota: the budget of %s was not leased within %gs", key.name, self._read_timeout)
                state.failed_until = self._clock() + FAILED_RETRY_SECONDS
                break
            if self._clock() < state.failed_until:
                break  # the lease failed
            if all(self._leased_enough(key, m, accounts[m], need) for m, need in needs.items()):
                return  # leased; what is still short is refused by the caller
        else:
            return
        if self._fail_closed:
            raise QuotaUnavailable(retry_after=max(1.0, state.failed_until - self._clock()))
        for meter, need in needs.items():  # fail open: whatever this instance knows is left, once per outage
            account = accounts[meter]
            if account.held < need:
                known = max(0, self._limit(key, meter) - account.known_used())
                account.held += known
                account.owed += known

    def _remaining(self, key: KeyRecord, state: _KeyState, accounts: dict[Meter, Account]
                   ) -> tuple[int | None, int | None]:
        """``x-ratelimit-remaining-tokens`` and ``-requests`` of a key with limits (``None`` for one without).

        A limited meter gives its own figure: the smallest remainder of the token windows, the request rate's
        remainder. A meter the key does not limit gives what its limits leave of it at the key's typical
        request (its smoothed reservation: tokens and cost; 1 before its first): tokens = remaining requests
        × typical tokens, requests = remaining tokens (or budget) ÷ typical tokens (or cost), the smallest.
        """
        tokens_each, cost_each = max(state.typical_tokens, 1), max(state.typical_cost, 1)
        token_windows = [a.remaining(self._limit(key, m)) for m, a in accounts.items() if m.unit == "tokens"]
        tokens = min(token_windows) if token_windows else None
        rate = accounts.get(REQUESTS_MINUTE)
        requests = None if rate is None else rate.remaining(self._limit(key, REQUESTS_MINUTE))
        money = accounts.get(COST_MONTH)
        budget = None if money is None else money.remaining(self._limit(key, COST_MONTH))
        fit = [n for n in (requests, None if tokens is None else tokens // tokens_each,
                           None if budget is None else budget // cost_each) if n is not None]
        if not fit:
            return None, None
        return (tokens if tokens is not None else min(fit) * tokens_each,
                requests if requests is not None else min(fit))

    def _refusal(self, key: KeyRecord, accounts: dict[Meter, Account], needs: dict[Meter, int],
                 blocked: list[Meter], now: datetime) -> QuotaExceeded:
        wait = max((window_end(m.window, now) - now).total_seconds() for m in blocked)
        tokens, requests = self._remaining(key, self._keys[key.name], accounts)
        headers = retry_after_headers(wait)
        if tokens is not None:
            headers[REMAINING_HEADER] = str(tokens)
        if requests is not None:
            headers[REMAINING_REQUESTS_HEADER] = str(requests)
        seconds = max(1, round(wait))
        if COST_MONTH in blocked:
            message = (f"The monthly budget of key '{key.name}' is spent; it renews at the start of next month "
                       f"(UTC). Please retry after {seconds} seconds.")
        elif REQUESTS_MINUTE in blocked and not any(m.unit == "tokens" for m in blocked):
            message = (f"Key '{key.name}' is over its rate limit of {key.limits.requests_per_minute} requests per "
                       f"minute. Please retry after {seconds} seconds.")
        else:
            windows = [m.window for m in blocked if m.unit == "tokens"]
            left = 0 if tokens is None else tokens
            message = (f"Key '{key.name}' is over its token quota per {' and '.join(windows)} "
                       f"(this request needs about {needs[blocked[0]]} tokens, {left} are left). "
                       f"Please retry after {seconds} seconds.")
        return QuotaExceeded(message, headers=headers)

    # -- leases --------------------------------------------------------------------------------

    def _lease(self, key: KeyRecord, state: _KeyState, periods: dict[str, str],
               needs: Mapping[Meter, int]) -> asyncio.Task[None]:
        """The running lease of ``key``'s slices, started if there is none."""
        if state.leasing is None:
            state.last_lease = self._clock()
            state.leasing = asyncio.create_task(self._leased(key, state, periods, dict(needs)), name="quota lease")
            state.leasing.add_done_callback(partial(self._lease_done, key.name, state))
        return state.leasing

    async def _leased(self, key: KeyRecord, state: _KeyState, periods: dict[str, str], needs: dict[Meter, int]
                      ) -> None:
        try:
            async with asyncio.timeout(self._refresh_timeout):
                await self._read_counted(key, state, periods)
                await self._write_slices(key, state, periods, needs)
        except STORAGE_ERRORS as exc:
            state.failed_until = self._clock() + FAILED_RETRY_SECONDS
            log.warning("quota: cannot lease the budget of %s (%s); %s", key.name, type(exc).__name__,
                        "refusing what its slices cannot cover" if self._fail_closed
                        else "admitting from what this instance knows")

    async def _read_counted(self, key: KeyRecord, state: _KeyState, periods: dict[str, str]) -> None:
        clock = self._clock()
        if (state.counted_at is not None and state.counted_windows == periods
                and clock < state.counted_at + self._cache_seconds):
            return
        now = datetime.fromtimestamp(self._wall_clock(), UTC)
        try:
            counted = await self._usage.read(key.name, now, periods)
        except STORAGE_ERRORS as exc:  # the row may still answer: lease on the last figures
            log.warning("quota: cannot read the usage of %s (%s)", key.name, type(exc).__name__)
            return
        state.counted_at, state.counted_windows = clock, dict(periods)
        for meter, value in counted.items():
            account = state.accounts.get(meter)
            if account is not None and account.period == periods[meter.window]:
                account.counted = max(account.counted, value)
                if account.settled == 0:  # none of this instance's usage in it yet: a base to add it to
                    account.base = account.counted
                if meter is COST_MONTH:  # money spent through other instances shows here
                    self._warn_budget(key.name, state, account)

    async def _write_slices(self, key: KeyRecord, state: _KeyState, periods: dict[str, str],
                            needs: dict[Meter, int]) -> None:
        for _ in range(MAX_CONFLICTS):
            if state.etag is None:
                found = await self._budgets.read(key.name)
                state.row, state.etag = (None, None) if found is None else found
            row = dict(state.row or {})
            grants: dict[Meter, tuple[Account, int, int, int]] = {}
            for meter in METERS:
                limit = limit_of(key.limits, meter)
                if limit is None:
                    continue
                account = state.account(meter, periods[meter.window])
                if str(row.get(meter.period_column) or "") > account.period:
                    continue  # another instance opened a newer window: this one's is over; never move the row back
                account.note_rate(self._clock())
                granted = as_int(row.get(meter.granted_column)) if row.get(meter.period_column) == account.period \
                    else 0
                base = max(granted, account.counted)
                account.seen = max(account.seen, granted)
                grant = slice_to_lease(account, limit=limit, granted=base, need=needs.get(meter, 0),
                                       partial=meter is COST_MONTH)
                owed = account.owed
                if grant or owed or base != granted:
                    row[meter.period_column] = account.period
                    row[meter.granted_column] = base + owed + grant
                    grants[meter] = (account, grant, owed, base + owed + grant)
            if not grants:
                return
            try:
                state.etag = await self._budgets.write(key.name, row, state.etag)
            except BudgetConflict:
                state.etag = None
                continue
            state.row = row
            for account, grant, owed, total in grants.values():
                account.held += grant
                account.owed -= owed
                account.seen = total
                account.pay_owed()  # taken beyond the slice while the lease was on its way
            return
        log.warning("quota: the budget row of %s kept changing under %d leases; trying later", key.name,
                    MAX_CONFLICTS)

    @staticmethod
    def _lease_done(name: str, state: _KeyState, task: asyncio.Task[None]) -> None:
        state.leasing = None
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("quota: leasing the budget of %s failed inside the gateway", name, exc_info=error)

    async def close(self) -> None:
        """Cancel the leases still running and hand the unused slices back (at shutdown, best effort)."""
        tasks = [state.leasing for state in self._keys.values() if state.leasing is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        try:
            async with asyncio.timeout(self._refresh_timeout):
                await asyncio.gather(*(self._hand_back(name, state) for name, state in self._keys.items()))
        except STORAGE_ERRORS as exc:
            log.warning("quota: unused slices not handed back at shutdown (%s)", type(exc).__name__)

    async def _hand_back(self, name: str, state: _KeyState) -> None:
        for _ in range(MAX_CONFLICTS):
            if not any(a.held > 0 for a in state.accounts.values()):
                return
            if state.etag is None:
                found = await self._budgets.read(name)
                if found is None:
                    return
                state.row, state.etag = found
            row = dict(state.row or {})
            returned: list[Account] = []
            for meter, account in state.accounts.items():
                if account.held > 0 and row.get(meter.period_column) == account.period:
                    row[meter.granted_column] = max(0, as_int(row.get(meter.granted_column)) - account.held)
                    returned.append(account)
            if not returned:
                return
            try:
                state.etag = await self._budgets.write(name, row, state.etag)
            except BudgetConflict:
                state.etag = None
                continue
            for account in returned:
                account.held = 0
            return
