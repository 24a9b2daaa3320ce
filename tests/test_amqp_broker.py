"""The in-memory AMQP broker (tests/amqp_broker.py) driven by the real azure-servicebus SDK, sync and async."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest
from azure.servicebus import ServiceBusClient, ServiceBusMessage, ServiceBusSubQueue
from azure.servicebus.aio import ServiceBusClient as AsyncServiceBusClient
from azure.servicebus.exceptions import ServiceBusError

from devkit.amqp_broker import AmqpBroker

QUEUE = "q"
LIMIT = 20.0  # seconds that a whole async test may take (each takes 1-4 s)
WAIT = 5.0  # seconds that one SDK step may take: open, send, receive, settle


async def _send_batch(client: AsyncServiceBusClient, count: int) -> None:
    """Send ``count`` messages ``id-N``/``body-N`` as one batch."""
    async with client.get_queue_sender(QUEUE) as sender:
        batch = await sender.create_message_batch()
        for i in range(count):
            batch.add_message(ServiceBusMessage(f"body-{i}", message_id=f"id-{i}", application_properties={"n": i}))
        await sender.send_messages(batch, timeout=WAIT)


def _client(connection_string: str) -> ServiceBusClient:
    """A sync client whose every step is bounded: no retry, each attempt and settlement within WAIT seconds."""
    return ServiceBusClient.from_connection_string(connection_string, retry_total=0, timeout=WAIT, try_timeout=WAIT)


def _async_client(connection_string: str, *, retry_total: int = 0) -> AsyncServiceBusClient:
    """An async client whose every step is bounded, retrying ``retry_total`` times with a short backoff."""
    return AsyncServiceBusClient.from_connection_string(
        connection_string,
        retry_total=retry_total,
        retry_backoff_factor=0.1,
        retry_backoff_max=0.2,
        timeout=WAIT,
        try_timeout=WAIT,
    )


def test_sync_batch_arrives_as_separate_messages() -> None:
    """A batch sent by the sync SDK lands in the queue as three messages with their ids and bodies."""
    with AmqpBroker() as broker:
        with (
            _client(broker.connection_string) as client,
            client.get_queue_sender(QUEUE) as sender,
        ):
            batch = sender.create_message_batch()
            for i in range(3):
                batch.add_message(ServiceBusMessage(f"body-{i}", message_id=f"id-{i}", content_type="text/plain"))
            sender.send_messages(batch, timeout=WAIT)
        queued = broker.messages(QUEUE)
    assert [(m.message_id, m.body, m.content_type) for m in queued] == [
        (f"id-{i}", f"body-{i}".encode(), "text/plain") for i in range(3)
    ]
    assert [m.sequence_number for m in queued] == [1, 2, 3]


async def test_async_receive_complete_abandon_and_redelivery() -> None:
    """Async receive: two completed, one abandoned and redelivered with delivery_count 1, then none left."""
    with AmqpBroker() as broker:

        async def scenario() -> None:
            async with _async_client(broker.connection_string) as client:
                await _send_batch(client, 3)
                assert len(broker.messages(QUEUE)) == 3
                async with client.get_queue_receiver(QUEUE, max_wait_time=WAIT) as receiver:
                    received = await receiver.receive_messages(max_message_count=10, max_wait_time=WAIT)
                    assert [m.message_id for m in received] == ["id-0", "id-1", "id-2"]
                    assert [str(m) for m in received] == ["body-0", "body-1", "body-2"]
                    assert [m.application_properties for m in received] == [{b"n": i} for i in range(3)]
                    assert [m.delivery_count for m in received] == [0, 0, 0]
                    assert [m.sequence_number for m in received] == [1, 2, 3]
                    now = datetime.now(UTC)
                    assert all(m.enqueued_time_utc is not None and m.enqueued_time_utc <= now for m in received)
                    assert all(m.locked_until_utc is not None and m.locked_until_utc > now for m in received)
                    assert len({m.lock_token for m in received}) == 3
                    assert broker.messages(QUEUE) == []  # all three are locked

                    await receiver.complete_message(received[0])
                    await receiver.complete_message(received[1])
                    await receiver.abandon_message(received[2])

                    redelivered = None
                    async for message in receiver:  # ends after max_wait_time without a message
                        redelivered = message
                        break
                    assert redelivered is not None
                    assert (redelivered.message_id, redelivered.delivery_count) == ("id-2", 1)
                    await receiver.complete_message(redelivered)
            assert broker.messages(QUEUE) == []

        await asyncio.wait_for(scenario(), LIMIT)


def test_dead_lettered_message_moves_to_the_dead_letter_queue() -> None:
    """A message dead-lettered by the receiver leaves the queue for its dead-letter queue, with the reason."""
    with AmqpBroker() as broker:
        with _client(broker.connection_string) as client:
            with client.get_queue_sender(QUEUE) as sender:
                sender.send_messages(ServiceBusMessage("poison", message_id="bad"), timeout=WAIT)
            with client.get_queue_receiver(QUEUE) as receiver:
                (message,) = receiver.receive_messages(max_message_count=1, max_wait_time=WAIT)
                receiver.dead_letter_message(message, reason="unparsable", error_description="not JSON")
            assert broker.messages(QUEUE) == []
            (dead,) = broker.dead_letters(QUEUE)
            assert (dead.message_id, dead.body) == ("bad", b"poison")
            assert dead.properties["DeadLetterReason"] == "unparsable"
            assert dead.properties["DeadLetterErrorDescription"] == "not JSON"

            with client.get_queue_receiver(QUEUE, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dead_receiver:
                (again,) = dead_receiver.receive_messages(max_message_count=1, max_wait_time=WAIT)
                assert (again.message_id, again.dead_letter_reason) == ("bad", "unparsable")
                dead_receiver.complete_message(again)
        assert broker.dead_letters(QUEUE) == []


async def test_outage_fails_sends_then_recovers_on_the_same_port() -> None:
    """During an outage sends fail fast with a ServiceBusError; afterwards the same sender and a new client work."""
    with AmqpBroker() as broker:

        async def scenario() -> None:
            connection_string = broker.connection_string  # taken once: the broker comes back on the same port
            async with (
                _async_client(connection_string, retry_total=1) as client,
                client.get_queue_sender(QUEUE, socket_timeout=0.5) as sender,
            ):
                await sender.send_messages(ServiceBusMessage("before"), timeout=WAIT)
                broker.set_available(False)
                started = time.monotonic()
                with pytest.raises(ServiceBusError):
                    await sender.send_messages(ServiceBusMessage("during"), timeout=WAIT)
                assert time.monotonic() - started < WAIT  # a prompt failure, not a timeout
                async with _async_client(connection_string, retry_total=1) as other:
                    with pytest.raises(ServiceBusError):
                        async with other.get_queue_sender(QUEUE, socket_timeout=0.5) as other_sender:
                            await other_sender.send_messages(ServiceBusMessage("during, new client"), timeout=WAIT)
                broker.set_available(True)
                await sender.send_messages(ServiceBusMessage("after, same sender"), timeout=WAIT)
            async with (
                _async_client(connection_string, retry_total=1) as fresh,
                fresh.get_queue_sender(QUEUE) as fresh_sender,
            ):
                await fresh_sender.send_messages(ServiceBusMessage("after, new client"), timeout=WAIT)

        await asyncio.wait_for(scenario(), LIMIT)
        assert [m.body for m in broker.messages(QUEUE)] == [b"before", b"after, same sender", b"after, new client"]
