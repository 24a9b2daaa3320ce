"""A relay in front of Azurite's table port that counts the Table Storage operations passing through it,
and that a test can make hang (as a SIGSTOPped server) or refuse.

For the scale benchmark (bench/bench_scale.py) and the tests: point every gateway at
``connection_string`` instead of Azurite's, and read ``operations`` (each request's time, method and
table) afterwards. Each operation is one HTTP request to the table service; an entity-group
transaction (``$batch``) is one operation, named after the table its changes go to.

``TableOp.aggregation`` tells the usage aggregator's own traffic apart (its counter and ledger reads of
``usage``, its transactions on ``usage``, its writes to ``usagerejects``): in Azure the aggregator
runs from Service Bus, off the request path, while locally it runs inside each gateway. Everything
else (key lookups, quota reads, shared budgets) is what requests cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from devkit.services import free_port

_ENDPOINT = re.compile(r"TableEndpoint=http://127\.0\.0\.1:(\d+)/")
_REQUEST_LINE = re.compile(rb"^([A-Z]+) (\S+) HTTP/1\.[01]$")
_CONTENT_LENGTH = re.compile(rb"^content-length:\s*(\d+)\s*$", re.IGNORECASE | re.MULTILINE)
_TABLE_IN_PATH = re.compile(r"^/[^/]+/([^/(?]+)")
_TABLE_IN_BATCH = re.compile(rb"/[A-Za-z0-9]+/([A-Za-z][A-Za-z0-9]*)\(")
_AGGREGATOR_TABLES = {"usagerejects"}


@dataclass(frozen=True, slots=True)
class TableOp:
    """One request to the table service, as the relay saw it."""

    time: float  # time.monotonic() in the relay's process when the request was complete
    method: str
    table: str  # the table it names ("Tables" for table creation and listing)
    target: str  # the decoded path and query

    @property
    def aggregation(self) -> bool:
        """The usage aggregator's own operation (not made for a request, in Azure)."""
        if self.table in _AGGREGATOR_TABLES:
            return True
        if self.table != "usage":
            return False
        # the quota's reads of the usage table are ranges of minute/day/month rows; the aggregator's are
        # its counter rows by RowKey eq and its ledger range, and its writes are transactions
        return self.method != "GET" or "ledger|" in self.target or "RowKey eq" in self.target


def _table_of(method: str, target: str, body: bytes) -> str:
    path = target.split("?", 1)[0]
    if path.endswith("/$batch"):
        found = _TABLE_IN_BATCH.search(body)
        return found.group(1).decode() if found else "$batch"
    match = _TABLE_IN_PATH.match(path)
    return match.group(1) if match else path


class _RequestCounter:
    """Reads one connection's bytes from client to server as HTTP/1.1 requests, noting each one."""

    def __init__(self, record: list[TableOp]) -> None:
        self._record = record
        self._buffer = b""
        self._broken = False

    def feed(self, data: bytes) -> None:
        if self._broken:
            return
        self._buffer += data
        while not self._broken:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self._buffer[:end]
            length_match = _CONTENT_LENGTH.search(head)
            length = int(length_match.group(1)) if length_match else 0
            if b"transfer-encoding: chunked" in head.lower():  # not sent by the Azure SDK: stop counting
                self._broken = True
                return
            if len(self._buffer) < end + 4 + length:
                return
            body = self._buffer[end + 4:end + 4 + length]
            self._buffer = self._buffer[end + 4 + length:]
            request_line = _REQUEST_LINE.match(head.split(b"\r\n", 1)[0])
            if request_line is None:
                self._broken = True
                return
            method, target = request_line.group(1).decode(), unquote(request_line.group(2).decode())
            self._record.append(TableOp(time.monotonic(), method, _table_of(method, target, body), target))


class CountingTableProxy:
    """Relays every connection to Azurite's table port and notes each request in ``operations``, until told
    to ``hang`` (connections accepted, nothing answered, as under SIGSTOP; data resumes on ``restore`` as
    after SIGCONT) or to ``refuse`` (nothing listens, open connections are reset).

    Runs its own event loop in a thread, so it serves whatever the caller's threads and loops do.
    """

    def __init__(self, connection_string: str) -> None:
        match = _ENDPOINT.search(connection_string)
        if match is None:
            raise ValueError("an Azurite connection string with a TableEndpoint on 127.0.0.1")
        self._target = int(match.group(1))
        self.port = free_port()
        self.connection_string = connection_string.replace(f":{self._target}/", f":{self.port}/")
        self.operations: list[TableOp] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="table proxy", daemon=True)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._flowing = asyncio.Event()  # clear while hung

    def start(self) -> None:
        self._thread.start()
        self._run(self._listen())

    def hang(self) -> None:
        """Keep accepting connections, but answer nothing until ``restore``."""
        self._run(self._hang())

    def refuse(self) -> None:
        """Stop listening (connections are refused) and reset the open ones."""
        self._run(self._stop())

    def restore(self) -> None:
        """Relay again; held data goes on, as after SIGCONT."""
        self._run(self._listen())

    def close(self) -> None:
        self._run(self._stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def _run(self, step: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(step, self._loop).result(10)

    def between(self, start: float, end: float) -> list[TableOp]:
        """The operations noted from ``start`` to ``end`` (``time.monotonic()`` values)."""
        return [op for op in list(self.operations) if start <= op.time < end]

    async def _hang(self) -> None:
        self._flowing.clear()

    async def _listen(self) -> None:
        self._flowing.set()
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._connections):
            writer.transport.abort()
        self._connections.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            await self._flowing.wait()
            with contextlib.suppress(OSError):  # Azurite gone: the client sees its connection closed
                up_reader, upstream = await asyncio.open_connection("127.0.0.1", self._target)
                self._connections.add(upstream)
                counter = _RequestCounter(self.operations)
                pipes = [asyncio.create_task(self._pipe(reader, upstream, counter)),
                         asyncio.create_task(self._pipe(up_reader, writer, None))]
                _, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
        finally:
            for end in (writer, upstream):
                if end is not None:
                    self._connections.discard(end)
                    end.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    counter: _RequestCounter | None) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                if counter is not None:
                    counter.feed(data)
                writer.write(data)
                await writer.drain()


@contextmanager
def counting_table_proxy(connection_string: str) -> Iterator[CountingTableProxy]:
    """A ``CountingTableProxy`` in front of ``connection_string``'s Azurite, for the ``with`` block."""
    proxy = CountingTableProxy(connection_string)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()
