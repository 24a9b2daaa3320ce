"""Records off the request path: a bounded buffer, a background sender, a transport.

``BatchPublisher.emit`` (on the request path) only appends to a ``deque``; a full buffer (by count, or
by the size of what it holds) drops the oldest item, counts it and says so in the log. A background task
waits ``linger`` for a batch to gather, then hands batches to a sender; a failed send puts the batch back
at the front and retries with exponential back-off while requests go on. ``close`` flushes.
``UsagePublisher`` sends usage events through a transport (Service Bus, or in-process straight to the
aggregator for the local run); the content log (``_contentlog``) sends its records to Blob Storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from azure.core.exceptions import AzureError
from azure.servicebus import ServiceBusMessage
from azure.servicebus.aio import ServiceBusClient, ServiceBusSender
from azure.servicebus.exceptions import MessageSizeExceededError

from gateway._records import UsageRecord, encode_event
from usage._aggregate import Aggregator

log = logging.getLogger(__name__)


class EventTransport(Protocol):
    async def send(self, events: Sequence[tuple[str, bytes]]) -> None:
        """Deliver ``(event_id, body)`` pairs, or raise."""

    async def close(self) -> None: ...

    async def probe(self) -> str:
        """Check that a send could go out now (raise if not); returns the transport's kind."""


class ServiceBusTransport:
    """Sends events as Service Bus message batches, ``message_id`` = event id."""

    def __init__(self, client: ServiceBusClient, queue: str) -> None:
        self._client = client
        self._queue = queue
        self._sender: ServiceBusSender = client.get_queue_sender(queue)

    async def probe(self) -> str:
        """Open a sender link of its own to the queue and close it: an open link of the publisher's says
        nothing of the connection until a send fails. Costs a connection, so readiness checks only."""
        async with self._client.get_queue_sender(self._queue) as sender:
            await sender.create_message_batch()
        return "service_bus"

    async def send(self, events: Sequence[tuple[str, bytes]]) -> None:
        batch = await self._sender.create_message_batch()
        for event_id, body in events:
            message = ServiceBusMessage(body, message_id=event_id, content_type="application/json")
            try:
                batch.add_message(message)
            except MessageSizeExceededError:
                await self._sender.send_messages(batch)
                batch = await self._sender.create_message_batch()
                batch.add_message(message)
        if len(batch):
            await self._sender.send_messages(batch)

    async def close(self) -> None:
        await self._sender.close()
        await self._client.close()


class InProcessTransport:
    """Hands events straight to the aggregator: the local run without Service Bus."""

    def __init__(self, aggregator: Aggregator) -> None:
        self._aggregator = aggregator

    async def send(self, events: Sequence[tuple[str, bytes]]) -> None:
        await self._aggregator.aggregate([body for _, body in events], message_ids=[i for i, _ in events])

    async def probe(self) -> str:
        return "in_process"  # the aggregator writes to Table Storage, which readiness checks on its own

    async def close(self) -> None:
        return None


class BatchSender[T](Protocol):
    async def send(self, batch: list[T]) -> None:
        """Deliver ``batch``, or raise. A sender that delivered part of it before failing removes those
        items from ``batch`` (the rest is put back and sent again)."""

    async def close(self) -> None: ...


class BatchPublisher[T]:
    """A sink that never blocks: buffer, background batches, back-off, flush on close.

    ``retry_on`` are the sender's errors worth retrying (storage or network failures): the batch waits
    and goes again. Anything else is a bug: it is logged with its traceback and the batch is dropped
    (and counted), rather than retried forever. ``weigh`` (cheap: called on the request path) and
    ``max_weight`` bound the buffer by the size of what it holds as well as by ``capacity``.
    """

    def __init__(
        self,
        sender: BatchSender[T],
        *,
        what: str,
        retry_on: tuple[type[BaseException], ...],
        capacity: int = 10_000,
        batch_size: int = 200,
        linger: float = 1.0,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        weigh: Callable[[T], int] | None = None,
        max_weight: int = 0,
    ) -> None:
        self._sender = sender
        self._what = what
        self._retry_on = retry_on
        self._capacity = capacity
        self._buffer: deque[T] = deque()
        self._batch_size = batch_size
        self._linger = linger
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._sleep = sleep
        self._weigh = weigh
        self._max_weight = max_weight
        self._weight = 0
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sent = 0
        self.dropped = 0
        self.failed_sends = 0
        self.failing = False  # the last send failed: events wait for a retry

    @property
    def capacity(self) -> int:
        return self._capacity

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def emit(self, item: T) -> None:
        if len(self._buffer) == self._capacity:
            self._drop_oldest()
        self._buffer.append(item)
        if self._weigh is not None:
            self._weight += self._weigh(item)
            while self._weight > self._max_weight and len(self._buffer) > 1:
                self._drop_oldest()
        self._wakeup.set()

    def _drop_oldest(self) -> None:
        oldest = self._buffer.popleft()
        if self._weigh is not None:
            self._weight -= self._weigh(oldest)
        self._dropped(1)

    def _dropped(self, count: int) -> None:
        before = self.dropped
        self.dropped += count
        if before == 0 or self.dropped // 1000 > before // 1000:
            log.warning("%s buffer full (%d items): %d oldest %s(s) dropped so far",
                        self._what, self._capacity, self.dropped, self._what)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{self._what} publisher")

    async def _run(self) -> None:
        backoff = self._initial_backoff
        while True:
            await self._wakeup.wait()
            if self._linger and len(self._buffer) < self._batch_size:
                await self._sleep(self._linger)  # gather a batch: one send per burst, not per request
            self._wakeup.clear()
            # send what gathered; items arriving meanwhile wait for a linger of their own, or a stream of
            # requests would keep the sender busy with one small send after another
            due = len(self._buffer)
            while due > 0 and self._buffer:
                size = min(self._batch_size, due, len(self._buffer))
                if await self._send_one_batch(size):
                    due -= size
                    backoff = self._initial_backoff
                else:
                    await self._sleep(backoff)
                    backoff = min(backoff * 2, self._max_backoff)
            if self._buffer:
                self._wakeup.set()

    async def _send_one_batch(self, size: int | None = None) -> bool:
        count = min(self._batch_size, len(self._buffer)) if size is None else size
        batch = [self._buffer.popleft() for _ in range(count)]
        if self._weigh is not None:
            self._weight -= sum(self._weigh(item) for item in batch)
        try:
            await self._sender.send(batch)
        except asyncio.CancelledError:  # shutdown in the middle of a send: close() sends them again
            self._put_back(batch)
            raise
        except self._retry_on as exc:  # the service failed: keep the items and retry later
            self.failed_sends += 1
            self.sent += count - len(batch)  # what a sender delivered before failing
            self.failing = True
            log.warning("sending %d %s(s) failed (%s: %s); will retry", len(batch), self._what,
                        type(exc).__name__, str(exc)[:200])
            self._put_back(batch)
            return False
        except Exception:  # a bug of ours: retrying would fail forever
            log.exception("sending %d %s(s) failed inside the gateway; they are dropped", len(batch), self._what)
            self._dropped(len(batch))
            return True
        self.sent += count
        self.failing = False
        return True

    def _put_back(self, batch: list[T]) -> None:
        """Return a batch to the front of the buffer, dropping its oldest if the buffer filled up."""
        room = self._capacity - len(self._buffer)
        if len(batch) > room:
            self._dropped(len(batch) - room)
            batch = batch[len(batch) - room:]
        self._buffer.extendleft(reversed(batch))
        if self._weigh is not None:
            self._weight += sum(self._weigh(item) for item in batch)

    async def close(self, *, flush_seconds: float = 10.0) -> None:
        """Stop the background task, then try for up to ``flush_seconds`` to send what is left."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        try:
            async with asyncio.timeout(flush_seconds):
                while self._buffer:
                    if not await self._send_one_batch():
                        await self._sleep(self._initial_backoff)
        except TimeoutError:
            log.error("shutdown: %d %s(s) could not be sent and are lost", len(self._buffer), self._what)
        finally:
            await self._sender.close()


class _EventSender:
    """Encodes usage records as events for an ``EventTransport``."""

    def __init__(self, transport: EventTransport) -> None:
        self._transport = transport

    async def send(self, batch: list[UsageRecord]) -> None:
        await self._transport.send([(r.request_id, encode_event(r)) for r in batch])

    async def close(self) -> None:
        await self._transport.close()


class UsagePublisher(BatchPublisher[UsageRecord]):
    """A ``UsageSink`` that never blocks; any transport failure is retried (Service Bus raises many kinds)."""

    def __init__(
        self,
        transport: EventTransport,
        *,
        capacity: int = 10_000,
        batch_size: int = 200,
        linger: float = 1.0,
        initial_backoff: float = 0.5,
        max_backoff: float = 30.0,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        super().__init__(_EventSender(transport), what="usage event", retry_on=(Exception,), capacity=capacity,
                         batch_size=batch_size, linger=linger, initial_backoff=initial_backoff,
                         max_backoff=max_backoff, sleep=sleep)
        self._transport = transport

    async def health(self) -> dict[str, Any]:
        """``down`` when the transport cannot send now; ``degraded`` while sends fail or the buffer fills."""
        try:
            transport = await self._transport.probe()
        except (AzureError, OSError) as exc:  # Service Bus errors (AzureError), sockets; a bug still raises
            return {"status": "down", "reason": type(exc).__name__}
        degraded = self.failing or len(self._buffer) * 2 > self._capacity
        return {"status": "degraded" if degraded else "ok", "transport": transport,
                "buffered": len(self._buffer), "dropped": self.dropped}

