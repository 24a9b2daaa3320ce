"""Time-limits on the injected clock: they pass when the clock passes them, not before."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway._timing import Timer
from tests.harness import FakeClock


async def until(predicate: object, *, seconds: float = 2.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.005)
    return False


def test_real_clock_gets_exact_timers_and_others_are_polled() -> None:
    """time.monotonic is the loop's own clock; any other clock is looked at every few milliseconds."""
    assert Timer.on(time.monotonic).poll is None
    assert Timer.on(FakeClock()).poll == pytest.approx(0.01)


async def test_deadline_passes_when_the_clock_does() -> None:
    """A block under a deadline runs until the clock reaches it, however long that takes for real."""
    clock = FakeClock()
    timer = Timer.on(clock)
    task = asyncio.create_task(asyncio.sleep(3600))

    async def wait() -> None:
        async with timer.deadline(clock() + 30):
            await task

    waiting = asyncio.create_task(wait())
    clock.advance(29.9)
    await asyncio.sleep(0.1)
    assert not waiting.done()
    clock.advance(0.2)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(waiting, 2)
    task.cancel()


async def test_deadline_already_passed_and_block_that_finishes_in_time() -> None:
    """A deadline in the past times out at the first wait; a block that ends in time is left alone."""
    clock = FakeClock()
    timer = Timer.on(clock)
    with pytest.raises(TimeoutError):
        async with timer.deadline(clock() - 1):
            await asyncio.sleep(1)
    async with timer.deadline(clock() + 1):
        await asyncio.sleep(0)
    clock.advance(5)
    await asyncio.sleep(0.05)  # no stray callback fires into this task later


async def test_real_clock_deadline() -> None:
    """On the real clock the limit is the loop's own timer."""
    timer = Timer.on(time.monotonic)
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        async with timer.deadline(time.monotonic() + 0.05):
            await asyncio.sleep(5)
    assert 0.04 < time.monotonic() - started < 1


async def test_idle_watch_fires_on_silence_not_on_steady_data() -> None:
    """touch() moves the silence's start; the watch fires once idle seconds pass without one."""
    clock = FakeClock()
    fired: list[float] = []
    watch = Timer.on(clock).watch(10, lambda: fired.append(clock()))
    for _ in range(5):  # data every 6 seconds: 30 seconds in all, never 10 of silence
        clock.advance(6)
        watch.touch()
        await asyncio.sleep(0.03)
    assert fired == []
    clock.advance(9.9)
    await asyncio.sleep(0.05)
    assert fired == []
    clock.advance(0.2)
    assert await until(lambda: fired)
    assert watch.fired and fired == [pytest.approx(1040.1)]
    watch.cancel()


async def test_idle_watch_fires_at_its_deadline_even_while_data_flows() -> None:
    """With a deadline the watch fires when the clock reaches it, however recent the last data."""
    clock = FakeClock()
    fired: list[float] = []
    watch = Timer.on(clock).watch(10, lambda: fired.append(clock()), deadline=clock() + 15)
    for _ in range(3):
        clock.advance(4)
        watch.touch()
        await asyncio.sleep(0.03)
    assert fired == []
    clock.advance(4)
    assert await until(lambda: fired)
    watch.cancel()
