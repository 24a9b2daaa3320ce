"""A minimal in-memory AMQP 1.0 broker that the real ``azure-servicebus`` SDK can talk to.

Tests start :class:`AmqpBroker` on the loopback interface and point ``ServiceBusClient`` (sync or
``azure.servicebus.aio``) at :attr:`AmqpBroker.connection_string`, so that the SDK is exercised over
AMQP instead of being mocked. The broker speaks just enough of the Service Bus dialect:

* claims-based auth: any ``put-token`` request on ``$cbs`` is answered with ``status-code`` 202;
* queues, created on demand by link address, keep their messages in FIFO (sequence number) order;
* a batch (message format ``0x80013700``, one data section per encoded message) is split up;
* peek-lock delivery: the delivery tag is the lock token; the header's delivery count and the
  annotations that the SDK reads (sequence number, enqueued time, locked-until) are set; each
  settlement is applied and echoed back settled with the same outcome, which the SDK waits for:
  ``accepted`` completes, ``modified`` abandons (delivery count + 1), ``rejected`` dead-letters to
  ``<queue>/$DeadLetterQueue``, ``released`` puts the message back as it was;
* ``<queue>/$management``: ``renew-lock`` and ``peek-message``; any other operation is answered
  with status 501 so that the SDK fails at once instead of waiting;
* outages: :meth:`AmqpBroker.set_available` drops every connection, and each new one as soon as it
  is accepted, until the broker is made available again (on the same port).

Locks never expire: a message stays locked until it is settled or its link or connection goes away,
when it returns to its queue as if its lock had expired (delivery count + 1). Deferral, sessions,
scheduling and transactions are not supported.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from functools import cached_property
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

from proton import (
    Condition,
    Connection,
    Data,
    Delivery,
    Described,
    Endpoint,
    Event,
    Handler,
    Link,
    Message,
    Receiver,
    Sender,
    symbol,
    timestamp,
    uint,
    ulong,
)
from proton.reactor import ApplicationEvent, Container, EventInjector

_LOGGER = logging.getLogger(__name__)

CBS_NODE = "$cbs"
MANAGEMENT_SUFFIX = "/$management"
DEAD_LETTER_SUFFIX = "/$DeadLetterQueue"
LOCK_DURATION_SECONDS = 60.0

_CREDIT = 100  # credit kept open on every link that clients send on
_CALL_TIMEOUT = 10.0  # seconds the test thread waits for the broker's thread
_HEADER, _DELIVERY_ANNOTATIONS, _MESSAGE_ANNOTATIONS, _PROPERTIES, _APPLICATION_PROPERTIES, _DATA = range(0x70, 0x76)
_MESSAGE_SECTIONS = range(0x70, 0x79)  # header .. footer, in the order the spec requires
_OUTCOMES = (Delivery.ACCEPTED, Delivery.REJECTED, Delivery.RELEASED, Delivery.MODIFIED)


@dataclass(frozen=True)
class BrokerMessage:
    """A message held by the broker: the client's encoded message plus the broker's bookkeeping."""

    encoded: bytes
    """The message as the client sent it (one encoded AMQP message)."""
    sequence_number: int
    enqueued_time: datetime
    delivery_count: int = 0

    @cached_property
    def message(self) -> Message:
        """The message decoded by proton."""
        message = Message()
        message.decode(self.encoded)
        return message

    @property
    def message_id(self) -> Any:
        """The ``message-id`` the client set, or ``None``."""
        return self.message.id

    @property
    def body(self) -> Any:
        """The body: ``bytes`` for the usual single data section, else the decoded AMQP value."""
        return _own(self.message.body)

    @property
    def properties(self) -> dict[str, Any]:
        """The application properties."""
        return _application_properties(self.message)

    @property
    def content_type(self) -> str | None:
        """The ``content-type`` the client set, or ``None``."""
        # Read from the properties section: proton reports a missing content type as symbol("None").
        properties = next((value for d, value, _ in _sections(self.encoded) if d == _PROPERTIES), None) or []
        return None if len(properties) <= 6 or properties[6] is None else str(properties[6])

    def for_delivery(self, locked_until: float | None) -> bytes:
        """Encode the message as the broker hands it out: header and Service Bus annotations set."""
        found = {descriptor: value for descriptor, value, _ in _sections(self.encoded)}
        header = [*(found.get(_HEADER) or []), None, None, None, None, None][:5]
        header[3] = self.delivery_count == 0  # first-acquirer
        header[4] = uint(self.delivery_count)  # written out even when 0: the SDK reads it as is
        annotations = dict(found.get(_MESSAGE_ANNOTATIONS) or {})
        annotations[symbol("x-opt-sequence-number")] = self.sequence_number
        annotations[symbol("x-opt-enqueued-time")] = _timestamp(self.enqueued_time.timestamp())
        if locked_until is not None:
            annotations[symbol("x-opt-locked-until")] = _timestamp(locked_until)
        return _rewrite(self.encoded, {_HEADER: header, _MESSAGE_ANNOTATIONS: annotations})


@dataclass
class _Lock:
    """A message handed out in peek-lock mode, waiting for the receiver's settlement."""

    queue: str
    message: BrokerMessage
    link: Sender


def _timestamp(seconds: float) -> timestamp:
    """An AMQP timestamp (milliseconds since the epoch) for ``seconds`` since the epoch."""
    return timestamp(int(seconds * 1000))


def _node(address: str | None) -> str:
    """The node a link address names: clients use ``amqps://host/queue`` or just ``queue``.

    The dead-letter queue's and the management node's suffixes are spelled one way: Service Bus
    matches them regardless of case.
    """
    address = address or ""
    if "://" in address:
        address = urlsplit(address).path
    address = address.lstrip("/")
    for suffix in (DEAD_LETTER_SUFFIX, MANAGEMENT_SUFFIX):
        if address.lower().endswith(suffix.lower()):
            address = address[: -len(suffix)] + suffix
    return address


def _own(value: Any) -> Any:
    """Copy proton's binary views, which point into a buffer that is reused or freed."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, dict):
        return {_own(key): _own(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_own(item) for item in value]
    return value


def _sections(encoded: bytes) -> Iterator[tuple[int, Any, bytes]]:
    """Yield ``(descriptor, value, encoded section)`` for each section of an encoded message."""
    data = Data()
    offset = 0
    while offset < len(encoded):
        data.clear()
        consumed = data.decode(encoded[offset:])
        data.rewind()
        data.next()
        section = data.get_object()
        if not isinstance(section, Described):
            raise ValueError("an AMQP message section must be a described value")
        descriptor: Any = section.descriptor
        yield int(descriptor), _own(section.value), encoded[offset : offset + consumed]
        offset += consumed


def _rewrite(encoded: bytes, replacements: dict[int, Any]) -> bytes:
    """Re-encode a message with the given sections replaced (or added) and the others kept as sent.

    Delivery annotations are dropped: they were addressed to the next hop, which is the broker.
    """
    kept = [(d, raw) for d, _, raw in _sections(encoded) if d not in replacements and d != _DELIVERY_ANNOTATIONS]
    for descriptor, value in replacements.items():
        data = Data()
        data.put_object(Described(ulong(descriptor), value))
        kept.append((descriptor, bytes(data.encode())))
    return b"".join(raw for _, raw in sorted(kept, key=lambda section: section[0]))  # a stable sort


def _is_message(encoded: bytes) -> bool:
    """Whether ``encoded`` is a complete AMQP message: a run of message sections."""
    try:
        return all(descriptor in _MESSAGE_SECTIONS for descriptor, _, _ in _sections(encoded))
    except Exception:  # proton raises DataException (and others) on bytes that are not AMQP
        return False


def split_batch(encoded: bytes) -> list[bytes]:
    """Return the messages a transfer carries: those of a batch, or else the message itself.

    proton does not expose a delivery's message format, so a batch (format ``0x80013700``) is
    recognised by its shape: its body is data sections that each hold a complete encoded message.
    A plain message whose data body happens to be an encoded AMQP message would be taken for one.
    """
    try:
        data = [value for descriptor, value, _ in _sections(encoded) if descriptor == _DATA]
    except Exception:
        return [encoded]
    if data and all(_is_message(item) for item in data):
        return data
    return [encoded]


def _application_properties(message: Message) -> dict[str, Any]:
    """A message's application properties, keyed by ``str``."""
    properties: dict[Any, Any] = message.properties or {}
    return {str(key): value for key, value in properties.items()}


def _connection(event: Event) -> Connection:
    assert event.connection is not None
    return event.connection


def _link(event: Event) -> Sender | Receiver:
    assert event.link is not None
    return event.link


class _BrokerHandler(Handler):
    """The proton event handler. It runs on the container's thread and owns every AMQP endpoint."""

    def __init__(self, host: str, port: int, lock: threading.Lock) -> None:
        super().__init__()
        self.host = host
        self.port = port
        self.lock = lock  # guards ``queues``, which the test thread reads
        self.queues: dict[str, list[BrokerMessage]] = {}
        self.available = True
        self.started = threading.Event()
        self.start_error: BaseException | None = None
        self._acceptor: Any = None
        self._connections: set[Connection] = set()
        self._consumers: dict[str, list[Sender]] = {}
        self._locks: dict[Delivery, _Lock] = {}
        self._sequence = 0
        self._calls: list[tuple[Callable[[], None], threading.Event]] = []
        self._calls_lock = threading.Lock()

    # -- calls from the test thread -------------------------------------------------------------

    def submit(self, call: Callable[[], None]) -> threading.Event:
        """Queue ``call`` for the container's thread; the returned event is set once it has run."""
        done = threading.Event()
        with self._calls_lock:
            self._calls.append((call, done))
        return done

    def on_broker_call(self, _event: Event) -> None:
        """Run the calls queued by :meth:`submit` (woken by an ``ApplicationEvent``)."""
        with self._calls_lock:
            calls, self._calls = self._calls, []
        for call, done in calls:
            try:
                call()
            except Exception:
                _LOGGER.exception("broker call failed")
            finally:
                done.set()

    # -- lifecycle ----------------------------------------------------------------------------------

    def on_reactor_init(self, event: Event) -> None:
        """Start listening, and report the port (or the failure) to :meth:`AmqpBroker.start`."""
        try:
            self._acceptor = event.container.listen(f"{self.host}:{self.port}")
            # proton keeps the listening socket in the acceptor's selectable, which delegates to it.
            self.port = int(self._acceptor._selectable.getsockname()[1])
        except Exception as error:
            self.start_error = error
            event.container.stop()
        self.started.set()

    def shutdown(self, container: Container) -> None:
        """Stop listening, drop every connection and let the container's loop end."""
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None
        for connection in list(self._connections):
            self.drop(connection)
        container.stop()

    def set_available(self, available: bool) -> None:
        """Accept connections again, or drop them all and keep dropping new ones."""
        self.available = available
        if not available:
            for connection in list(self._connections):
                self.drop(connection)

    def drop(self, connection: Connection) -> None:
        """Close ``connection``'s socket at once, as a network failure would."""
        self._forget(connection)
        transport = connection.transport
        if transport is None:
            return
        transport.close_head()
        transport.close_tail()
        # proton closes a socket only when its selectable sees an I/O event: end it now.
        selectable = getattr(transport, "_selectable", None)
        if selectable is not None:
            selectable.terminate()
            selectable.update()

    def _forget(self, connection: Connection) -> None:
        """Drop a connection's consumers and return the messages locked to it."""
        self._connections.discard(connection)
        for consumers in self._consumers.values():
            consumers[:] = [link for link in consumers if link.connection != connection]
        self._unlock(lambda lock: lock.link.connection == connection)

    # -- connections, sessions, links ------------------------------------------------------------

    def on_connection_bound(self, event: Event) -> None:
        """Track an accepted connection, or drop it at once during an outage."""
        if self.available:
            self._connections.add(_connection(event))
        else:
            _LOGGER.debug("unavailable: dropping a new connection")
            self.drop(_connection(event))

    def on_connection_remote_open(self, event: Event) -> None:
        """Open our end of the connection."""
        connection = _connection(event)
        if connection.state & Endpoint.LOCAL_UNINIT:
            connection.open()

    def on_connection_remote_close(self, event: Event) -> None:
        """Close our end of the connection and return the messages locked to it."""
        self._forget(_connection(event))
        _connection(event).close()

    def on_transport_closed(self, event: Event) -> None:
        """Forget a connection whose socket went away."""
        if event.connection is not None:
            self._forget(event.connection)

    def on_session_remote_open(self, event: Event) -> None:
        """Open our end of the session."""
        assert event.session is not None
        if event.session.state & Endpoint.LOCAL_UNINIT:
            event.session.open()

    def on_session_remote_close(self, event: Event) -> None:
        """Close our end of the session."""
        assert event.session is not None
        event.session.close()

    def on_link_remote_open(self, event: Event) -> None:
        """Attach a link to a queue, to ``$cbs`` or to a queue's management node."""
        link = _link(event)
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        link.open()
        if isinstance(link, Receiver):
            link.flow(_CREDIT)
            return
        queue = _node(link.remote_source.address)
        if queue != CBS_NODE and not queue.endswith(MANAGEMENT_SUFFIX):
            self._consumers.setdefault(queue, []).append(link)
            self._pump(queue)

    def on_link_remote_close(self, event: Event) -> None:
        """Detach our end and return the messages still locked to the link."""
        link = _link(event)
        for consumers in self._consumers.values():
            consumers[:] = [consumer for consumer in consumers if consumer != link]
        self._unlock(lambda lock: lock.link == link)
        link.close()

    def on_link_flow(self, event: Event) -> None:
        """A receiver granted credit (or asked to drain it): send what its queue holds."""
        link = _link(event)
        if isinstance(link, Sender):
            self._pump(_node(link.remote_source.address))

    # -- deliveries ----------------------------------------------------------------------------------

    def on_delivery(self, event: Event) -> None:
        """A transfer from a client, or the client's disposition of one of ours."""
        delivery = event.delivery
        assert delivery is not None
        link = delivery.link
        if isinstance(link, Receiver):
            if delivery.aborted:
                delivery.settle()
            elif delivery.readable and not delivery.partial:
                payload = link.recv(delivery.pending) or b""
                link.advance()
                self._on_transfer(link, delivery, bytes(payload))
                if link.credit < _CREDIT // 2:
                    link.flow(_CREDIT - link.credit)
        elif delivery in self._locks and (delivery.remote_state in _OUTCOMES or delivery.settled):
            self._on_settlement(delivery)
        elif delivery.settled:  # the client settled a response or a pre-settled delivery: done
            delivery.settle()

    def _on_transfer(self, link: Receiver, delivery: Delivery, payload: bytes) -> None:
        """Handle a complete message sent by a client, then accept and settle it."""
        node = _node(link.remote_target.address)
        if node == CBS_NODE:
            self._answer_cbs(link, payload)
        elif node.endswith(MANAGEMENT_SUFFIX):
            self._answer_management(link, node.removesuffix(MANAGEMENT_SUFFIX), payload)
        else:
            messages = split_batch(payload)
            with self.lock:
                for encoded in messages:
                    self._sequence += 1
                    self.queues.setdefault(node, []).append(BrokerMessage(encoded, self._sequence, datetime.now(UTC)))
            _LOGGER.debug("queue %s: %d message(s) in", node, len(messages))
            self._pump(node)
        delivery.update(Delivery.ACCEPTED)
        delivery.settle()

    def _pump(self, queue: str) -> None:
        """Send waiting messages to the queue's receivers while they have credit."""
        for link in list(self._consumers.get(queue, [])):
            while link.credit > 0:
                with self.lock:
                    waiting = self.queues.get(queue)
                    if not waiting:
                        break
                    message = waiting.pop(0)
                peek_lock = link.snd_settle_mode != Link.SND_SETTLED
                locked_until = time.time() + LOCK_DURATION_SECONDS if peek_lock else None
                delivery = link.delivery(uuid.uuid4().bytes)  # type: ignore[arg-type]  # the tag is the lock token
                link.stream(message.for_delivery(locked_until))
                link.advance()
                if peek_lock:
                    self._locks[delivery] = _Lock(queue, message, link)
                else:
                    delivery.settle()
            if link.drain_mode and link.credit > 0:
                link.drained()

    def _requeue(self, queue: str, message: BrokerMessage) -> None:
        """Put a message back into ``queue`` at its place in sequence order."""
        with self.lock:
            waiting = self.queues.setdefault(queue, [])
            later = [i for i, m in enumerate(waiting) if m.sequence_number > message.sequence_number]
            waiting.insert(later[0] if later else len(waiting), message)

    def _unlock(self, predicate: Callable[[_Lock], bool]) -> None:
        """Return the locked messages that match ``predicate``, as if their locks expired."""
        for delivery, lock in list(self._locks.items()):
            if predicate(lock):
                del self._locks[delivery]
                self._requeue(lock.queue, replace(lock.message, delivery_count=lock.message.delivery_count + 1))

    def _on_settlement(self, delivery: Delivery) -> None:
        """Apply a receiver's outcome to a locked message and echo the outcome back, settled."""
        lock = self._locks.pop(delivery)
        state = delivery.remote_state
        remote = delivery.remote
        if state == Delivery.ACCEPTED:
            _LOGGER.debug("queue %s: #%d completed", lock.queue, lock.message.sequence_number)
        elif state == Delivery.REJECTED:
            self._dead_letter(lock, remote.condition)
        elif state == Delivery.MODIFIED and remote.undeliverable:
            # A deferral: not supported. Refuse it (the SDK raises) and keep the message available.
            self._requeue(lock.queue, lock.message)
            delivery.local.condition = Condition("amqp:not-implemented", "deferral is not supported by the test broker")
            state = Delivery.REJECTED
        elif state == Delivery.MODIFIED:
            count = lock.message.delivery_count + (1 if remote.failed else 0)
            self._requeue(lock.queue, replace(lock.message, delivery_count=count))
            delivery.local.failed = remote.failed
        else:  # released, or settled without an outcome
            self._requeue(lock.queue, lock.message)
        if state is not None:
            delivery.update(state)
        delivery.settle()
        self._pump(lock.queue)

    def _dead_letter(self, lock: _Lock, condition: Condition | None) -> None:
        """Move a rejected message to its queue's dead-letter queue, with the reason it was given."""
        raw_info: Any = (condition.info if condition else None) or {}
        info = {str(key): value for key, value in raw_info.items()}
        found = {descriptor: value for descriptor, value, _ in _sections(lock.message.encoded)}
        properties = dict(found.get(_APPLICATION_PROPERTIES) or {})
        properties["DeadLetterReason"] = info.get("DeadLetterReason") or (condition.name if condition else None)
        properties["DeadLetterErrorDescription"] = info.get("DeadLetterErrorDescription")
        encoded = _rewrite(lock.message.encoded, {_APPLICATION_PROPERTIES: properties})
        with self.lock:
            self.queues.setdefault(lock.queue + DEAD_LETTER_SUFFIX, []).append(replace(lock.message, encoded=encoded))
        _LOGGER.debug("queue %s: #%d dead-lettered (%s)", lock.queue, lock.message.sequence_number, info)

    # -- request/response nodes ------------------------------------------------------------------

    def _answer_cbs(self, link: Receiver, payload: bytes) -> None:
        """Accept any token: answer a ``put-token`` request with 202, as Service Bus does."""
        request = Message()
        request.decode(payload)
        _LOGGER.debug("cbs: put-token for %s", _application_properties(request).get("name"))
        self._reply(link, request, {"status-code": 202, "status-description": "Accepted"})

    def _answer_management(self, link: Receiver, queue: str, payload: bytes) -> None:
        """Answer a management request on ``queue``: renew-lock and peek-message, else 501."""
        request = Message()
        request.decode(payload)
        operation = str(_application_properties(request).get("operation"))
        body: Any = request.body if isinstance(request.body, dict) else {}
        args = {str(key): value for key, value in body.items()}
        _LOGGER.debug("management: %s on %s", operation, queue)
        if operation == "com.microsoft:renew-lock":  # locks do not expire here: just report a new expiry
            until = _timestamp(time.time() + LOCK_DURATION_SECONDS)
            expirations = [until for _ in args.get("lock-tokens", [])]
            self._reply(link, request, {"statusCode": 200}, {"expirations": expirations})
        elif operation == "com.microsoft:peek-message":
            start, count = int(args.get("from-sequence-number", 0)), int(args.get("message-count", 1))
            with self.lock:
                locked = [lock.message for lock in self._locks.values() if lock.queue == queue]
                present = [*self.queues.get(queue, []), *locked]
            found = sorted((m for m in present if m.sequence_number >= start), key=lambda m: m.sequence_number)[:count]
            messages = [{"message": m.for_delivery(None)} for m in found]
            self._reply(link, request, {"statusCode": 200 if messages else 204}, {"messages": messages})
        else:
            description = f"{operation} is not supported by the test broker"
            status = {"statusCode": 501, "statusDescription": description, "errorCondition": "amqp:not-implemented"}
            self._reply(link, request, status)

    def _reply(self, request_link: Receiver, request: Message, status: dict[str, Any], body: Any = None) -> None:
        """Send the response to ``request`` on the link that the client reads this node's responses from."""
        node = _node(request_link.remote_target.address)
        link = request_link.connection.link_head(Endpoint.LOCAL_ACTIVE)
        while link is not None:
            same_session = link.session == request_link.session
            if isinstance(link, Sender) and same_session and _node(link.remote_source.address) == node:
                link.send(Message(body=body, correlation_id=request.id, properties=status))
                return
            link = link.next(Endpoint.LOCAL_ACTIVE)
        _LOGGER.warning("no response link attached for %s", node)


class AmqpBroker:
    """An in-memory AMQP 1.0 broker on a daemon thread, speaking enough Service Bus for its SDK.

    Use it as a context manager (``with AmqpBroker() as broker:``) and connect the SDK with
    :attr:`connection_string`. Queues are created on demand, named by link address.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._lock = threading.Lock()
        self._handler = _BrokerHandler(host, port, self._lock)
        self._injector = EventInjector()
        self._container: Container | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> AmqpBroker:
        """Run the broker on a daemon thread and return once it listens."""
        if self._container is not None:
            raise RuntimeError("the broker was already started")
        self._container = Container(self._handler)
        self._container.selectable(self._injector)
        self._thread = threading.Thread(target=self._run, args=(self._container,), name="amqp-broker", daemon=True)
        self._thread.start()
        if not self._handler.started.wait(_CALL_TIMEOUT):
            raise RuntimeError("the broker did not start listening")
        if self._handler.start_error is not None:
            self._thread.join(_CALL_TIMEOUT)
            raise RuntimeError(f"the broker could not listen on {self._host}") from self._handler.start_error
        _LOGGER.info("AMQP broker listening on %s:%d", self._host, self.port)
        return self

    @staticmethod
    def _run(container: Container) -> None:
        try:
            container.run()
        except Exception:
            _LOGGER.exception("the AMQP broker's container failed")

    def stop(self) -> None:
        """Stop listening and close every connection. Does nothing when already stopped."""
        if self._stopped:
            return
        self._stopped = True
        if self._container is None or self._thread is None:
            return
        container = self._container
        if self._thread.is_alive():
            self._call(lambda: self._handler.shutdown(container))
        self._injector.close()
        self._thread.join(_CALL_TIMEOUT)
        if self._thread.is_alive():
            _LOGGER.warning("the AMQP broker's thread did not stop")
            return
        for fd in self._injector.pipe:  # proton leaves the injector's pipe open
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> AmqpBroker:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The port the broker listens on (the one the system chose, if 0 was asked for)."""
        return self._handler.port

    @property
    def connection_string(self) -> str:
        """A Service Bus connection string for the SDK: plain AMQP to this broker, with a dummy key."""
        return (
            f"Endpoint=sb://{self._host}:{self.port};SharedAccessKeyName=test;"
            "SharedAccessKey=dGVzdA==;UseDevelopmentEmulator=true;"
        )

    def messages(self, queue: str) -> list[BrokerMessage]:
        """A snapshot of the messages waiting in ``queue``; those locked by a receiver are not in it."""
        with self._lock:
            return list(self._handler.queues.get(queue, []))

    def dead_letters(self, queue: str) -> list[BrokerMessage]:
        """A snapshot of ``queue``'s dead-letter queue (``<queue>/$DeadLetterQueue``)."""
        return self.messages(queue + DEAD_LETTER_SUFFIX)

    def set_available(self, available: bool) -> None:
        """Simulate an outage: ``False`` drops every connection, and each new one as soon as it is accepted,
        until ``True`` (the broker keeps listening on the same port throughout)."""
        self._call(lambda: self._handler.set_available(available))

    def _call(self, call: Callable[[], None]) -> None:
        """Run ``call`` on the broker's thread and wait for it."""
        if self._thread is None or not self._thread.is_alive():
            raise RuntimeError("the broker is not running")
        done = self._handler.submit(call)
        self._injector.trigger(ApplicationEvent("broker_call"))
        if not done.wait(_CALL_TIMEOUT):
            raise TimeoutError("the broker's thread did not answer")


__all__ = ["AmqpBroker", "BrokerMessage", "split_batch"]
