"""Running a ``FunctionApp``'s Service Bus queue triggers in the local host, as the Functions host would.

For each queue trigger whose connection setting is present, a background task receives batches
(peek-lock), hands them to the function (a list for ``cardinality="many"``), completes them when it
returns, and abandons them when it raises, so Service Bus redelivers and finally dead-letters.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from azure.identity.aio import DefaultAzureCredential
from azure.servicebus.aio import ServiceBusClient, ServiceBusReceiver
from azure.servicebus.exceptions import ServiceBusError

log = logging.getLogger(__name__)
_SETTING = re.compile(r"%([^%]+)%")


class ReceivedMessage:
    """An ``azure.servicebus`` received message seen through the parts the functions use."""

    def __init__(self, message: Any) -> None:
        self._message = message
        self.message_id: str | None = message.message_id

    def get_body(self) -> bytes:
        body = self._message.body
        return body if isinstance(body, bytes) else b"".join(body)


@dataclass(frozen=True, slots=True)
class QueueTrigger:
    name: str
    queue: str
    connection: str
    many: bool
    arg_name: str
    function: Callable[..., Awaitable[Any]]


def queue_triggers(functions: list[Any], env: Mapping[str, str]) -> list[QueueTrigger]:
    found = []
    for function in functions:
        trigger = function.get_trigger()
        if trigger is None or trigger.get_binding_name() != "serviceBusTrigger" or not hasattr(trigger, "queue_name"):
            continue
        queue = _SETTING.sub(lambda m: env.get(m.group(1), "usage-events" if m.group(1) == "USAGE_QUEUE_NAME" else ""),
                             trigger.queue_name)
        many = str(getattr(trigger, "cardinality", "one")).lower().endswith("many")
        found.append(QueueTrigger(function.get_function_name(), queue, trigger.connection, many, trigger.name,
                                  function.get_user_function()))
    return found


class TriggerRunner:
    """Receives for each configured queue trigger until ``stop``."""

    def __init__(self, triggers: list[QueueTrigger], env: Mapping[str, str], *, max_batch: int = 1000) -> None:
        self._triggers = triggers
        self._env = env
        self._max_batch = max_batch
        self._tasks: list[asyncio.Task[None]] = []
        self._closers: list[Callable[[], Awaitable[None]]] = []

    def start(self) -> None:
        for trigger in self._triggers:
            disabled = f"AzureWebJobs.{trigger.name}.Disabled"
            if self._env.get(disabled, "").strip().lower() in ("true", "1"):
                log.info("function %s is disabled by %s", trigger.name, disabled)
                continue
            connection = self._env.get(trigger.connection, "").strip()
            namespace = self._env.get(f"{trigger.connection}__fullyQualifiedNamespace", "").strip()
            if not connection and not namespace:
                log.info("function %s not run locally: %s is not set (events are aggregated in process)",
                         trigger.name, trigger.connection)
                continue
            if connection:
                client = ServiceBusClient.from_connection_string(connection)
            else:
                credential = DefaultAzureCredential()
                client = ServiceBusClient(namespace, credential)
                self._closers.append(credential.close)
            self._closers.append(client.close)
            self._tasks.append(asyncio.get_running_loop().create_task(self._run(trigger, client), name=trigger.name))
            log.info("function %s receives from queue %s", trigger.name, trigger.queue)

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
                            trigger.name, type(exc).__name__, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)

    async def _receive_once(self, trigger: QueueTrigger, receiver: ServiceBusReceiver) -> None:
        messages = await receiver.receive_messages(max_message_count=self._max_batch if trigger.many else 1,
                                                   max_wait_time=5)
        if not messages:
            return
        argument: Any = [ReceivedMessage(m) for m in messages]
        try:
            await trigger.function(**{trigger.arg_name: argument if trigger.many else argument[0]})
        except Exception:  # as the Functions host does: abandon, so the messages are redelivered
            log.exception("function %s failed; abandoning %d message(s)", trigger.name, len(messages))
            for message in messages:
                await receiver.abandon_message(message)
            return
        for message in messages:
            await receiver.complete_message(message)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for close in reversed(self._closers):
            await close()
        self._tasks, self._closers = [], []

