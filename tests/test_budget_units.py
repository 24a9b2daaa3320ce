"""The shared quota's arithmetic on its own: slices leased from one row by several guards (instances), through
an injected clock and an in-memory row with ETags that counts its operations."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
from azure.core.exceptions import ServiceRequestError

from gateway._budget import (
    COST_MONTH,
    METERS,
    REQUESTS_MINUTE,
    TOKENS_DAY,
    TOKENS_MINUTE,
    Account,
    BudgetConflict,
    Meter,
    slice_to_lease,
)
from gateway._exceptions import QuotaExceeded, QuotaUnavailable
from gateway._quota import RECHECK_SECONDS, QuotaGuard, Reservation
from tests.harness import FakeClock
from usage import KeyRecord, Limits

#: A real bound for what must not hang: a test fails instead of waiting forever.
NO_WAIT = 2.0
NOON = datetime(2026, 11, 30, 12, 0, 30, tzinfo=UTC).timestamp()  # no window ends during a test
QUOTA_CACHE = 5.0


class MemoryBudgets:
    """The budget rows in memory, with ETags and conflicts as Table Storage has them; counts every operation.
    While ``held`` is clear, calls wait; with ``error`` set they raise it."""

    def __init__(self) -> None:
        self.rows: dict[str, tuple[dict[str, Any], str]] = {}
        self.operations = 0
        self.conflicts = 0
        self._etags = itertools.count(1)
        self.released = asyncio.Event()
        self.released.set()
        self.error: BaseException | None = None

    async def _call(self) -> None:
        self.operations += 1
        await self.released.wait()
        if self.error is not None:
            raise self.error

    async def read(self, key: str) -> tuple[dict[str, Any], str] | None:
        await self._call()
        found = self.rows.get(key)
        return None if found is None else (dict(found[0]), found[1])

    async def write(self, key: str, values: Mapping[str, Any], etag: str | None) -> str:
        await self._call()
        current = self.rows.get(key)
        if (current is None) != (etag is None) or (current is not None and current[1] != etag):
            self.conflicts += 1
            raise BudgetConflict(key)
        new = str(next(self._etags))
        self.rows[key] = (dict(values), new)
        return new

    def granted(self, key: str, meter: Meter) -> int:
        return int(self.rows[key][0].get(meter.granted_column, 0))


class FakeUsage:
    """A key's counted usage in the usage table; with ``error`` set reads raise it."""

    def __init__(self) -> None:
        self.counted: dict[Meter, int] = {}
        self.calls = 0
        self.error: BaseException | None = None

    async def read(self, key: str, now: datetime, windows: Mapping[str, str]) -> dict[Meter, int]:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return {meter: self.counted.get(meter, 0) for meter in METERS}


def guard(budgets: MemoryBudgets, clock: FakeClock, usage: FakeUsage | None = None, *,
          read_timeout: float = NO_WAIT, fail_closed: bool = False) -> QuotaGuard:
    return QuotaGuard(usage or FakeUsage(), budgets, cache_seconds=QUOTA_CACHE, read_timeout=read_timeout,
                      refresh_timeout=NO_WAIT, clock=clock, wall_clock=lambda: NOON, fail_closed=fail_closed)


def team(**limits: int) -> KeyRecord:
    return KeyRecord("team-budget", True, datetime(2026, 1, 1, tzinfo=UTC), Limits(**limits))


async def settle() -> None:
    """Let background leases run."""
    for _ in range(20):
        await asyncio.sleep(0)


async def admit(g: QuotaGuard, key: KeyRecord, tokens: int, cost_nano: int = 0) -> Reservation:
    async with asyncio.timeout(NO_WAIT):
        return await g.admit(key, estimate=tokens, cost_nano=cost_nano)


def test_a_slice_shrinks_as_the_window_runs_out() -> None:
    """A slice tops up to its target but takes at most half of what is left, yet enough for the waiting request;
    nothing when even that does not fit."""
    account = Account("2026-11-30T12:00", typical=100)
    assert slice_to_lease(account, limit=100_000, granted=0, need=100) == 1000  # 10 typical reservations
    assert slice_to_lease(account, limit=1000, granted=0, need=100) == 500  # half of what is left
    assert slice_to_lease(account, limit=1000, granted=850, need=100) == 100  # less than half, but the request's
    assert slice_to_lease(account, limit=1000, granted=950, need=100) == 0  # it cannot fit
    account.rate, account.held = 5000.0, 300  # 2 s of use at 5,000 a second
    assert slice_to_lease(account, limit=100_000, granted=0, need=100) == 10_000 - 300


async def test_instances_sharing_a_key_never_admit_more_than_its_quota() -> None:
    """Four guards on one row, each admitting as fast as it can: the reservations they admit in the window add up
    to at most the quota, and all but one reservation of it is used."""
    budgets, clock = MemoryBudgets(), FakeClock()
    key = team(tokens_per_minute=3000)
    guards = [guard(budgets, clock) for _ in range(4)]
    admitted = refused = 0
    for _ in range(200):
        for g in guards:
            try:
                await admit(g, key, 30)
                admitted += 1
            except QuotaExceeded as exc:
                refused += 1
                assert exc.headers["Retry-After"] == "30"  # to the end of the minute
        await settle()
    assert 3000 - 30 * 4 <= admitted * 30 <= 3000
    assert budgets.granted("team-budget", TOKENS_MINUTE) <= 3000
    assert refused == 800 - admitted


async def test_a_busy_key_makes_few_table_operations() -> None:
    """At 40 requests a second per instance (the injected clock), two instances lease about once per slice:
    half of 0.2 operations per admitted request at most, and none on the request path once a slice is held."""
    budgets, clock, usage = MemoryBudgets(), FakeClock(), FakeUsage()
    key = team(tokens_per_minute=1_000_000, tokens_per_day=10_000_000)
    guards = [guard(budgets, clock, usage) for _ in range(2)]
    admitted = 0
    for _ in range(400):  # 10 s
        for g in guards:
            reservation = await admit(g, key, 50)
            g.settle(reservation, tokens=40)
            admitted += 1
        clock.advance(0.025)
        await settle()
    ratio = (budgets.operations + usage.calls) / admitted
    assert ratio <= 0.1, (budgets.operations, usage.calls, admitted)


async def test_settlement_gives_back_and_takes_what_was_used_beyond() -> None:
    """A request that used less than its reservation gives the rest back to the slice; one that used more (no
    max_tokens) takes it too, and the next lease writes it to the row."""
    budgets, clock = MemoryBudgets(), FakeClock()
    key = team(tokens_per_day=10_000)
    g = guard(budgets, clock)
    first = await admit(g, key, 100)
    before = first.remaining
    assert before is not None
    g.settle(first, tokens=40)
    second = await admit(g, key, 100)
    assert second.remaining == before - 40
    g.settle(second, tokens=5000)  # far past its reservation
    third = await admit(g, key, 10)
    assert third.remaining == 10_000 - 40 - 5000 - 10
    await settle()
    clock.advance(1)
    await g.close()  # the unused slice goes back: the row holds what was used
    assert budgets.granted("team-budget", TOKENS_DAY) == 40 + 5000 + 10


async def test_request_rate_limit_counts_requests() -> None:
    """requests_per_minute admits that many requests a minute across instances, whatever their tokens."""
    budgets, clock = MemoryBudgets(), FakeClock()
    key = team(requests_per_minute=25)
    guards = [guard(budgets, clock) for _ in range(2)]
    results: list[Reservation] = []
    with pytest.raises(QuotaExceeded) as caught:
        for n in range(100):
            results.append(await admit(guards[n % 2], key, 10_000))
            await settle()
    assert len(results) == 25
    assert caught.value.headers["x-ratelimit-remaining-requests"] == "0"
    assert caught.value.headers["x-ratelimit-remaining-tokens"] == "0"  # no request left: no tokens either
    assert "requests per minute" in caught.value.message
    assert budgets.granted("team-budget", REQUESTS_MINUTE) <= 25


async def test_counted_usage_the_row_does_not_show_is_seen() -> None:
    """Usage in the usage table beyond what the row granted (usage before the row, a failing-open instance)
    lowers what is left at the next lease."""
    budgets, clock, usage = MemoryBudgets(), FakeClock(), FakeUsage()
    key = team(tokens_per_day=1000)
    usage.counted[TOKENS_DAY] = 900
    g = guard(budgets, clock, usage)
    reservation = await admit(g, key, 50)
    assert reservation.remaining == 50
    with pytest.raises(QuotaExceeded):
        await admit(g, key, 60)


async def test_hung_storage_costs_one_wait_then_fails_open_on_what_is_known() -> None:
    """With the row hung, one request waits QUOTA_READ_TIMEOUT_SECONDS, later ones not at all; this instance admits
    what it knew was left, counting its own admissions, then refuses."""
    budgets, clock = MemoryBudgets(), FakeClock()
    key = team(tokens_per_day=3000)
    g = guard(budgets, clock, read_timeout=0.1)
    await admit(g, key, 1000)  # leases 1500 (half of what is left)
    await settle()
    budgets.released.clear()
    waits = []
    with pytest.raises(QuotaExceeded):
        for _ in range(10):
            started = time.monotonic()
            await admit(g, key, 400)
            waits.append(time.monotonic() - started)
    assert len(waits) == 5  # 1000 + 5 * 400 of 3000
    assert sum(w > 0.05 for w in waits) <= 1 and max(waits) < 1.0
    budgets.released.set()
    await settle()


async def test_unreachable_storage_fails_closed_when_asked() -> None:
    """QUOTA_FAIL_CLOSED: a request its slice cannot cover gets 503 with Retry-After; what the slice holds is
    still admitted."""
    budgets, clock = MemoryBudgets(), FakeClock()
    key = team(tokens_per_day=100_000)
    g = guard(budgets, clock, fail_closed=True)
    await admit(g, key, 100)  # leases 1000
    await settle()
    budgets.error = ServiceRequestError("connection refused")
    for _ in range(5):
        await admit(g, key, 100)
    with pytest.raises(QuotaUnavailable) as caught:
        for _ in range(20):
            await admit(g, key, 100)
    assert caught.value.status == 503 and int(caught.value.headers["Retry-After"]) >= 1
    assert caught.value.code == "QuotaUnavailable"
    budgets.error = None
    clock.advance(10)
    await admit(g, key, 100)


async def test_money_budget_refuses_when_spent() -> None:
    """The monthly budget in nano-units: reservations priced by the caller; a reservation larger than what is left
    of a budget not yet spent takes what is left (the overshoot is that one request), and once the month's spending
    has reached the budget every request is refused, with Retry-After to the start of next month."""
    budgets, clock = MemoryBudgets(), FakeClock()
    key = team(budget_nano_per_month=1_000_000)
    g = guard(budgets, clock)
    g.settle(await admit(g, key, 10, cost_nano=600_000), tokens=10, cost_nano=500_000)
    g.settle(await admit(g, key, 10, cost_nano=600_000), tokens=10, cost_nano=400_000)  # 500,000 were left
    g.settle(await admit(g, key, 10, cost_nano=600_000), tokens=10, cost_nano=300_000)  # 100,000 were left
    for _ in range(3):  # 1,200,000 spent
        with pytest.raises(QuotaExceeded) as caught:
            await admit(g, key, 10, cost_nano=1)
        assert "monthly budget" in caught.value.message and "spent" in caught.value.message
        assert int(caught.value.headers["Retry-After"]) == int(datetime(2026, 12, 1, tzinfo=UTC).timestamp() - NOON)
    clock.advance(RECHECK_SECONDS)
    with pytest.raises(QuotaExceeded):
        await admit(g, key, 10, cost_nano=1)  # re-reads the row, in the background
    await settle()
    assert budgets.granted("team-budget", COST_MONTH) == 1_200_000  # what was spent, the overshoot included
    assert COST_MONTH.column == "CostMonth"


async def test_a_reservation_larger_than_what_is_left_is_not_called_spent(caplog: pytest.LogCaptureFixture) -> None:
    """A budget with nothing spent admits a request whose reservation is larger than the whole budget, and says
    nothing of 100%; the warnings come when the money really spent crosses 80% and 100%, not before."""
    budgets, clock = MemoryBudgets(), FakeClock()
    warned: list[int] = []
    g = QuotaGuard(FakeUsage(), budgets, cache_seconds=QUOTA_CACHE, read_timeout=NO_WAIT, refresh_timeout=NO_WAIT,
                   clock=clock, wall_clock=lambda: NOON, on_budget_warning=lambda k, p: warned.append(p))
    key = team(budget_nano_per_month=2_000_000)
    g.settle(await admit(g, key, 10, cost_nano=5_000_000), tokens=10, cost_nano=10_000)  # larger than the budget
    spent = 10_000
    while True:  # reservations of 1,100,000 costing 520,000: refused only once 2,000,000 are spent
        try:
            reservation = await admit(g, key, 10, cost_nano=1_100_000)
        except QuotaExceeded:
            break
        assert spent < 2_000_000
        assert warned == ([80] if spent >= 1_600_000 else [])
        g.settle(reservation, tokens=10, cost_nano=520_000)
        spent += 520_000
    assert spent == 10_000 + 4 * 520_000 and warned == [80, 100]
    lines = [r.getMessage() for r in caplog.records if "budget" in r.getMessage()]
    assert len(lines) == 2 and all("team-budget" in line for line in lines)
    assert "80%" in lines[0] and "100%" in lines[1]


async def test_a_spent_budget_refuses_though_a_lease_landed_after_the_overshoot() -> None:
    """A request that cost more than the budget's remainder spends it, even when a lease ahead lands after its
    settlement: what that lease brings pays what was owed, it is not money left to admit from."""
    budgets, clock = MemoryBudgets(), FakeClock()
    key = team(budget_nano_per_month=300_000_000)
    g = guard(budgets, clock)
    first = await admit(g, key, 1, cost_nano=100_000_000)  # a lease ahead starts, in the background
    budgets.released.clear()
    await settle()  # the lease is on its way to the row
    g.settle(first, tokens=8, cost_nano=800_000_000)  # before it lands
    budgets.released.set()
    await settle()
    with pytest.raises(QuotaExceeded):
        await admit(g, key, 1, cost_nano=100_000_000)


async def test_requests_without_a_cap_reserve_what_such_requests_overran() -> None:
    """Requests without an output cap reserve their prompt, and out of a money budget also the most such a request
    has cost beyond its reservation: several in flight together pass the budget by one request, not by all."""
    budgets, clock = MemoryBudgets(), FakeClock()
    key = team(budget_nano_per_month=1_000_000)
    g = guard(budgets, clock)

    async def uncapped() -> Reservation:
        async with asyncio.timeout(NO_WAIT):
            return await g.admit(key, estimate=10, cost_nano=10_000, capped=False)

    g.settle(await uncapped(), tokens=300, cost_nano=300_000)  # a long completion: 290,000 beyond its reservation
    in_flight: list[Reservation] = []
    with pytest.raises(QuotaExceeded):
        for _ in range(10):
            in_flight.append(await uncapped())
    assert len(in_flight) == 3  # 300,000 + 300,000 + the 100,000 left
    for reservation in in_flight:
        g.settle(reservation, tokens=300, cost_nano=300_000)
    spent = 300_000 * (1 + len(in_flight))
    assert spent <= 1_000_000 + 300_000


async def test_budget_warnings_count_money_spent_not_slices(caplog: pytest.LogCaptureFixture) -> None:
    """Two instances: slices another instance leased (and reservations it holds) are not spending; a warning comes
    from money settled by this instance or counted in the usage table, once each per month, naming the key."""
    budgets, clock, usage = MemoryBudgets(), FakeClock(), FakeUsage()
    warned: list[tuple[str, int]] = []

    def instance() -> QuotaGuard:
        return QuotaGuard(usage, budgets, cache_seconds=QUOTA_CACHE, read_timeout=NO_WAIT, refresh_timeout=NO_WAIT,
                          clock=clock, wall_clock=lambda: NOON, on_budget_warning=lambda k, p: warned.append((k, p)))

    key = team(budget_nano_per_month=1_000_000)
    east, west = instance(), instance()
    in_flight = await admit(west, key, 10, cost_nano=400_000)  # west leases half the month's budget
    for _ in range(5):
        east.settle(await admit(east, key, 10, cost_nano=60_000), tokens=10, cost_nano=50_000)
        await settle()
    assert budgets.granted("team-budget", COST_MONTH) >= 800_000  # slices: most of the budget is leased
    assert warned == []  # 250,000 spent
    west.settle(in_flight, tokens=10, cost_nano=400_000)
    assert warned == []  # west knows of its own 400,000
    usage.counted[COST_MONTH] = 850_000  # both, aggregated (with 200,000 from elsewhere)
    clock.advance(QUOTA_CACHE + RECHECK_SECONDS)
    with contextlib.suppress(QuotaExceeded):  # east's next lease reads the usage table; west's slice may block it
        await admit(east, key, 10, cost_nano=10_000)
    await settle()
    assert warned == [("team-budget", 80)]
    lines = [r.getMessage() for r in caplog.records if "budget" in r.getMessage()]
    assert len(lines) == 1 and "team-budget" in lines[0] and "80%" in lines[0]


async def test_a_slice_handed_back_is_found_by_a_refused_instance() -> None:
    """An instance stopping hands its unused slice back; another, refused meanwhile, finds it within
    RECHECK_SECONDS without a Table call per refusal."""
    budgets, clock = MemoryBudgets(), FakeClock()
    key = team(tokens_per_day=1000)
    first, second = guard(budgets, clock), guard(budgets, clock)
    await admit(first, key, 100)  # leases 500, holds 400
    await settle()
    with pytest.raises(QuotaExceeded):
        for _ in range(10):
            await admit(second, key, 100)  # leases what is left, by halves
            await settle()
    operations = budgets.operations
    for _ in range(20):
        with pytest.raises(QuotaExceeded):
            await admit(second, key, 100)
    assert budgets.operations - operations <= 1
    await first.close()  # hands back 400
    clock.advance(RECHECK_SECONDS)
    with pytest.raises(QuotaExceeded):
        await admit(second, key, 100)  # starts the re-read, in the background
    await settle()
    await admit(second, key, 100)


async def test_a_request_that_arrived_in_the_last_minute_does_not_reset_the_new_one() -> None:
    """Windows come from the arrival time; one admitted just after its minute ended, behind a request of the new
    minute, is counted in the new minute, whose slice it does not throw away."""
    budgets, clock = MemoryBudgets(), FakeClock()
    key = team(tokens_per_minute=10_000)
    g = guard(budgets, clock)
    first = await g.admit(key, estimate=100, arrived=NOON)
    await settle()
    operations = budgets.operations
    late = await g.admit(key, estimate=100, arrived=NOON - 31)  # 11:59:59
    assert late.taken[TOKENS_MINUTE][0] == first.taken[TOKENS_MINUTE][0] == "2026-11-30T12:00"
    assert late.remaining == 10_000 - 200 and budgets.operations == operations


async def test_a_lease_for_a_window_already_over_does_not_move_the_row_back() -> None:
    """An instance still in the last minute (its lease made, or retried, after another instance opened the new
    one) never writes the old minute back over the new one: the new minute's grants stand, and the instance in it
    admits at most the quota."""
    budgets, clock = MemoryBudgets(), FakeClock()
    key = team(tokens_per_minute=1000)
    behind, ahead = guard(budgets, clock), guard(budgets, clock)
    await behind.admit(key, estimate=100, arrived=NOON - 31)  # 11:59:59
    await settle()
    await ahead.admit(key, estimate=100, arrived=NOON)  # 12:00:30: the row moves to the new minute
    await settle()
    with contextlib.suppress(QuotaExceeded):  # more than its slice holds: a lease, for the minute that is over
        await behind.admit(key, estimate=450, arrived=NOON - 31)
    await settle()
    assert budgets.rows["team-budget"][0][TOKENS_MINUTE.period_column] == "2026-11-30T12:00"
    admitted = 100
    for _ in range(30):
        try:
            await ahead.admit(key, estimate=100, arrived=NOON)
        except QuotaExceeded:
            break
        admitted += 100
        await settle()
    assert admitted <= 1000
