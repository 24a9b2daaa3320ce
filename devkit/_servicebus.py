"""Service Bus queue triggers, run by the local host as the Functions host's Service Bus extension does.

For each ``serviceBusTrigger`` binding whose connection setting is present, a background task receives
batches (peek-lock, up to ``host.json``'s ``maxMessageBatchSize`` for ``cardinality: many``) and invokes
the function through the worker with the bodies and the per-message metadata arrays the extension sends
(``MessageIdArray``, ``DeliveryCountArray``, ``EnqueuedTimeUtcArray``, …). The messages are completed
when the invocation succeeds and abandoned when it fails, so Service Bus redelivers and at last
dead-letters them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from azure.identity.aio import DefaultAzureCredential
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver
from azure.servicebus.exceptions import ServiceBusError

from devkit._protos import protos

log = logging.getLogger("devkit.host")
_SETTING = re.compile(r"%([^%]+)%")


@dataclass(frozen=True, slots=True)
class QueueTrigger:
    """One function's ``serviceBusTrigger`` binding, with its settings resolved."""

    function: str
    function_id: str
    arg_name: str
    queue: str
    connection: str
    many: bool


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the trigger loops and wait until each has stopped."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


class UnresolvedSetting(ValueError):
    """A binding expression names an app setting that is not set."""


def resolve(expression: str, env: Mapping[str, str]) -> str:
    """``%NAME%`` parts replaced by app settings, as the host resolves binding expressions."""

    def setting(match: re.Match[str]) -> str:
        value = env.get(match.group(1), "")
        if not value:
            raise UnresolvedSetting(f"{match.group(0)} does not resolve to a value (set {match.group(1)})")
        return value

    return _SETTING.sub(setting, expression)


def queue_trigger(function: str, function_id: str, binding: Mapping[str, Any], env: Mapping[str, str]) -> QueueTrigger:
    return QueueTrigger(function, function_id, str(binding.get("name", "")),
                        resolve(str(binding.get("queueName", "")), env), str(binding.get("connection", "")),
                        str(binding.get("cardinality", "one")).lower() == "many")


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _metadata(messages: list[Any], many: bool) -> dict[str, Any]:
    """The trigger metadata the Service Bus extension sends (arrays for a batch)."""

    def j(value: Any) -> Any:
        return protos.TypedData(json=json.dumps(value))

    fields: dict[str, list[Any]] = {
        "MessageId": [m.message_id for m in messages],
        # the extension (.NET SDK) counts this delivery too: 1 on the first, where AMQP's header says 0
        "DeliveryCount": [(m.delivery_count or 0) + 1 for m in messages],
        "EnqueuedTimeUtc": [_iso(m.enqueued_time_utc) for m in messages],
        "ExpiresAtUtc": [_iso(m.expires_at_utc) for m in messages],
        "LockedUntil": [_iso(m.locked_until_utc) for m in messages],
        "SequenceNumber": [m.sequence_number for m in messages],
        "LockToken": [str(m.lock_token) for m in messages],
        "ContentType": [m.content_type for m in messages],
        "CorrelationId": [m.correlation_id for m in messages],
        "Subject": [m.subject for m in messages],
        "UserProperties": [_properties(m) for m in messages],
        "ApplicationProperties": [_properties(m) for m in messages],
    }
    if many:
        return {f"{name}Array": j(values) for name, values in fields.items()}
    return {name: j(values[0]) for name, values in fields.items()}


def _properties(message: Any) -> dict[str, Any]:
    raw = message.application_properties or {}
    return {(k.decode() if isinstance(k, bytes) else str(k)): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()}


def _body(message: Any) -> bytes:
    body = message.body
    return body if isinstance(body, bytes) else b"".join(body)


Invoke = Callable[[QueueTrigger, str, list[Any], dict[str, Any]], Awaitable[Any]]


class TriggerRunner:
    """Receives for each configured queue trigger until ``stop``."""

    def __init__(self, triggers: list[QueueTrigger], env: Mapping[str, str], *, invoke: Invoke,
                 max_batch: int = 1000) -> None:
        self._triggers = triggers
        self._env = env
        self._invoke = invoke
        self._max_batch = max_batch
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def start(self) -> None:
        for trigger in self._triggers:
            connection = self._env.get(trigger.connection, "").strip()
            namespace = self._env.get(f"{trigger.connection}__fullyQualifiedNamespace", "").strip()
            if not connection and not namespace:
                log.warning("function %s is not run: its connection setting %s is not set",
                            trigger.function, trigger.connection)
                continue
            if connection:
                client = ServiceBusClient.from_connection_string(connection)
            else:
                credential = DefaultAzureCredential()
                client = ServiceBusClient(namespace, credential)
                self._closers.append(credential.close)
            self._closers.append(client.close)
            self._tasks.append(asyncio.get_running_loop().create_task(self._run(trigger, client),
                                                                      name=trigger.function))
            log.info("function %s receives from queue %s", trigger.function, trigger.queue)

    async def _run(self, trigger: QueueTrigger, client: ServiceBusClient) -> None:
        backoff = 1.0
        while True:
            try:
                async with client.get_queue_receiver(trigger.queue) as receiver:
                    backoff = 1.0
                    while True:
                        await self._receive_once(trigger, receiver)
            except ServiceBusError as exc:
                log.warning("function %s: Service Bus error (%s); reconnecting in %.0fs",
                            trigger.function, type(exc).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _receive_once(self, trigger: QueueTrigger, receiver: ServiceBusReceiver) -> None:
        messages = await receiver.receive_messages(max_message_count=self._max_batch if trigger.many else 1,
                                                   max_wait_time=5)
        if not messages:
            return
        bodies = [_body(m) for m in messages]
        data = (protos.TypedData(collection_bytes=protos.CollectionBytes(bytes=bodies)) if trigger.many
                else protos.TypedData(bytes=bodies[0]))
        invocation_id = str(uuid.uuid4())
        answer = await self._invoke(trigger, invocation_id, [protos.ParameterBinding(name=trigger.arg_name, data=data)],
                                    _metadata(messages, trigger.many))
        if answer.result.status != protos.StatusResult.Success:
            log.error("function %s failed (invocation %s); abandoning %d message(s): %s", trigger.function,
                      invocation_id, len(messages), answer.result.exception.message)
            for message in messages:
                await receiver.abandon_message(message)
            return
        for message in messages:
            await receiver.complete_message(message)

    async def stop(self) -> None:
        await cancel_all(self._tasks)
        for close in reversed(self._closers):
            await close()
        self._tasks, self._closers = [], []
