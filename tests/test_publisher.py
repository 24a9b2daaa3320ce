"""The usage publisher: never blocks a request, keeps events through outages, drops oldest when full."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence

from gateway._publish import UsagePublisher
from gateway._records import UsageRecord


def record(n: int) -> UsageRecord:
    return UsageRecord(
        request_id=f"req-{n:08d}", time="2026-11-29T13:45:00+00:00", key_name="team", deployment="gpt-4o",
        model="m", backend="b", operation="chat/completions", streaming=False, prompt_tokens=1, completion_tokens=1,
        total_tokens=2, cached_tokens=0, reasoning_tokens=0, usage_source="reported", status=200, latency_ms=1.0,
        ttfb_ms=1.0, outcome="complete")


class FlakyTransport:
    """Fails while ``down`` is set; records what it delivered."""

    def __init__(self) -> None:
        self.down = True
        self.delivered: list[tuple[str, bytes]] = []
        self.attempts = 0
        self.closed = False

    async def send(self, events: Sequence[tuple[str, bytes]]) -> None:
        self.attempts += 1
        if self.down:
            raise ConnectionError("service bus unreachable")
        self.delivered.extend(events)

    async def probe(self) -> str:
        if self.down:
            raise ConnectionError("service bus unreachable")
        return "flaky"

    async def close(self) -> None:
        self.closed = True


async def test_events_survive_an_outage_and_arrive_once_in_order() -> None:
    """While sending fails the events wait (backing off on the injected sleep); then all arrive once."""
    transport = FlakyTransport()
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 5:
            transport.down = False
        await asyncio.sleep(0)

    publisher = UsagePublisher(transport, batch_size=7, linger=0, sleep=sleep, initial_backoff=0.5, max_backoff=4.0)
    publisher.start()
    for n in range(20):
        publisher.emit(record(n))
    for _ in range(200):
        await asyncio.sleep(0)
        if publisher.sent == 20:
            break
    assert [event_id for event_id, _ in transport.delivered] == [f"req-{n:08d}" for n in range(20)]
    assert sleeps[:5] == [0.5, 1.0, 2.0, 4.0, 4.0]
    first = json.loads(transport.delivered[0][1])
    assert first["schema"] == 1 and first["event_id"] == "req-00000000" and first["total_tokens"] == 2
    await publisher.close()
    assert transport.closed


async def test_full_buffer_drops_the_oldest_and_counts() -> None:
    """A full buffer drops its oldest events, counts them, and never blocks emit."""
    transport = FlakyTransport()
    publisher = UsagePublisher(transport, capacity=5, sleep=lambda _: asyncio.sleep(0))
    for n in range(8):
        publisher.emit(record(n))  # not started: nothing drains the buffer
    assert publisher.dropped == 3 and publisher.pending == 5
    transport.down = False
    await publisher.close(flush_seconds=1)
    assert [event_id for event_id, _ in transport.delivered] == [f"req-{n:08d}" for n in range(3, 8)]


async def test_close_gives_up_after_its_flush_time() -> None:
    """Shutdown does not hang when the transport stays down; the loss is logged."""
    transport = FlakyTransport()
    publisher = UsagePublisher(transport, sleep=lambda _: asyncio.sleep(0.01))
    publisher.emit(record(1))
    await asyncio.wait_for(publisher.close(flush_seconds=0.1), timeout=5)
    assert transport.closed and publisher.pending == 1


async def test_close_during_a_send_loses_nothing() -> None:
    """Shutting down while a batch is on its way puts it back and sends it in the final flush."""

    class SlowOnce(FlakyTransport):
        def __init__(self) -> None:
            super().__init__()
            self.down = False
            self.started = asyncio.Event()

        async def send(self, events: Sequence[tuple[str, bytes]]) -> None:
            if self.attempts == 0:
                self.attempts += 1
                self.started.set()
                await asyncio.sleep(3600)  # the first send hangs until it is cancelled
            await super().send(events)

    transport = SlowOnce()
    publisher = UsagePublisher(transport, linger=0)
    publisher.start()
    publisher.emit(record(1))
    await asyncio.wait_for(transport.started.wait(), 5)
    await asyncio.wait_for(publisher.close(flush_seconds=2), 5)
    assert [event_id for event_id, _ in transport.delivered] == ["req-00000001"]


class SlowTransport:
    """Each send takes a while, during which the test emits more events."""

    def __init__(self, during_send: object) -> None:
        self.batches: list[int] = []
        self.during_send = during_send

    async def send(self, events: Sequence[tuple[str, bytes]]) -> None:
        self.batches.append(len(events))
        self.during_send()  # type: ignore[operator]
        await asyncio.sleep(0)

    async def probe(self) -> str:
        return "slow"

    async def close(self) -> None:
        return None


async def test_events_arriving_during_a_send_wait_for_their_own_linger() -> None:
    """A steady trickle of requests costs one send per linger, not one small send after another."""
    lingers: list[float] = []
    emitted = iter(range(1, 1000))

    async def sleep(seconds: float) -> None:
        lingers.append(seconds)
        await asyncio.sleep(0)

    publishers: list[UsagePublisher] = []
    transport = SlowTransport(lambda: publishers[0].emit(record(next(emitted))))  # one new event per send
    publisher = UsagePublisher(transport, linger=0.25, sleep=sleep)
    publishers.append(publisher)
    publisher.start()
    publisher.emit(record(0))
    for _ in range(50):
        await asyncio.sleep(0)
    assert transport.batches and len(lingers) == len(transport.batches)  # each send came after a linger
    assert set(lingers) == {0.25}
    transport.during_send = lambda: None
    await publisher.close()


async def test_health_says_down_while_the_transport_cannot_send_and_degraded_while_sends_fail() -> None:
    """The readiness view of the publisher: down when the probe fails, degraded while a send is being retried,
    ok once it went out."""
    transport = FlakyTransport()
    gate = asyncio.Event()

    async def sleep(seconds: float) -> None:
        await gate.wait()

    publisher = UsagePublisher(transport, capacity=10, linger=0, sleep=sleep)
    publisher.start()
    publisher.emit(record(1))
    for _ in range(50):
        await asyncio.sleep(0)
    assert (await publisher.health())["status"] == "down"
    transport.down = False  # the link is back, but the batch still waits for its retry
    health = await publisher.health()
    assert (health["status"], health["buffered"]) == ("degraded", 1)
    gate.set()
    for _ in range(50):
        await asyncio.sleep(0)
    assert (await publisher.health()) == {"status": "ok", "transport": "flaky", "buffered": 0, "dropped": 0}
    await publisher.close(flush_seconds=1)
