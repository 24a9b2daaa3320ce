"""Time-limits measured on the gateway's injected monotonic clock.

The request path never hands its own numbers to ``asyncio.timeout`` or ``loop.call_at``: every
limit (a client's body, a backend's response headers, silence in a stream, the request deadline)
is a point on ``Timer.clock``, so a test that moves a fake clock moves every limit with it.

With the real clock (``time.monotonic``, the event loop's own) a limit costs one loop callback
at the right moment. Any other clock cannot say when it moves, so its limits are checked every
``poll`` seconds of real time (10 ms by default): cheap for a test, exact enough for a limit.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

_POLL = 0.01


class Timer:
    """The clock limits are measured on, and the means to wait on it."""

    __slots__ = ("clock", "poll")

    def __init__(self, clock: Callable[[], float] = time.monotonic, *, poll: float | None = None) -> None:
        self.clock = clock
        #: real seconds between checks of a clock the loop does not run on; ``None``: exact callbacks
        self.poll = poll

    @classmethod
    def on(cls, clock: Callable[[], float]) -> Timer:
        """Exact for ``time.monotonic``; polled for any other clock (a test's, moved by hand)."""
        return cls(clock, poll=None if clock is time.monotonic else _POLL)

    def delay(self, due: float) -> float:
        """Real seconds to wait before looking at the clock again for a limit at ``due``."""
        remaining = due - self.clock()
        return remaining if self.poll is None else min(remaining, self.poll)

    @asynccontextmanager
    async def deadline(self, due: float) -> AsyncIterator[None]:
        """Raise ``TimeoutError`` out of the block if the clock reaches ``due`` before it ends."""
        loop = asyncio.get_running_loop()
        handle: asyncio.TimerHandle | None = None
        async with asyncio.timeout(None) as scope:

            def check() -> None:
                nonlocal handle
                wait = self.delay(due)
                if wait <= 0:
                    scope.reschedule(loop.time())  # expire now: the block is cancelled, TimeoutError
                else:
                    handle = loop.call_later(wait, check)

            check()
            try:
                yield
            finally:
                if handle is not None:
                    handle.cancel()

    def watch(self, idle: float, on_idle: Callable[[], object], *, deadline: float = math.inf) -> IdleWatch:
        """An ``IdleWatch`` on this clock; see there."""
        return IdleWatch(self, idle, on_idle, deadline=deadline)


class IdleWatch:
    """Calls ``on_idle`` once ``idle`` seconds pass without ``touch()``, or the clock reaches ``deadline``.

    One timer per stream, moved only when it fires: far cheaper than a time-out around every read.
    """

    __slots__ = ("_clock", "_deadline", "_handle", "_idle", "_loop", "_on_idle", "_timer", "fired", "last")

    def __init__(self, timer: Timer, idle: float, on_idle: Callable[[], object], *, deadline: float) -> None:
        self._timer = timer
        self._clock = timer.clock
        self._loop = asyncio.get_running_loop()
        self._idle = idle
        self._deadline = deadline
        self._on_idle = on_idle
        self.fired = False
        self.last = self._clock()
        self._handle = self._loop.call_later(max(0.0, timer.delay(self._due())), self._check)

    def _due(self) -> float:
        return min(self.last + self._idle, self._deadline)

    def touch(self) -> None:
        """Data came: the silence starts again from now."""
        self.last = self._clock()

    def _check(self) -> None:
        wait = self._timer.delay(self._due())
        if wait <= 0:
            self.fired = True
            self._on_idle()
        else:
            self._handle = self._loop.call_later(wait, self._check)

    def cancel(self) -> None:
        self._handle.cancel()
