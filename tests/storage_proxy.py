"""A TCP proxy in front of Table Storage that a test can make hang (as a SIGSTOPped server) or refuse."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator
from contextlib import contextmanager

from devkit.services import free_port
from tests.harness import LoopThread

_ENDPOINT = re.compile(r"TableEndpoint=http://127\.0\.0\.1:(\d+)/")
_REQUEST_LINE = re.compile(rb"(?:^|\r\n)(?:GET|PUT|POST|MERGE|PATCH|DELETE) (/\S*) HTTP/1\.1\r\n")


class StorageProxy:
    """Relays to Azurite until told to ``hang`` (connections accepted, nothing answered, as under
    SIGSTOP; data resumes on ``restore`` as after SIGCONT) or to ``refuse`` (nothing listens, open
    connections are reset)."""

    def __init__(self, connection_string: str) -> None:
        match = _ENDPOINT.search(connection_string)
        assert match is not None, "an Azurite connection string with a TableEndpoint"
        self._target = int(match.group(1))
        self.port = free_port()
        self.connection_string = connection_string.replace(f":{self._target}/", f":{self.port}/")
        self._loop = LoopThread()
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        #: the path (and query) of every request relayed to storage, in order: Table operations to count
        self.requests: list[str] = []

    def start(self) -> None:
        self._loop.run(self._listen())

    def hang(self) -> None:
        """Keep accepting connections, but answer nothing until ``restore``."""
        self._loop.run(self._set_flowing(False))

    def refuse(self) -> None:
        """Stop listening (connections are refused) and reset the open ones."""
        self._loop.run(self._refuse())

    def restore(self) -> None:
        """Relay again; held data goes on, as after SIGCONT."""
        self._loop.run(self._listen())

    def close(self) -> None:
        self._loop.run(self._refuse())
        self._loop.close()

    async def _set_flowing(self, flowing: bool) -> None:
        if self._flowing is None:
            self._flowing = asyncio.Event()
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _listen(self) -> None:
        await self._set_flowing(True)
        if self._server is None:
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)

    async def _refuse(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._connections):
            writer.transport.abort()
        self._connections.clear()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        self._connections.add(writer)
        upstream: asyncio.StreamWriter | None = None
        try:
            await self._flowing.wait()
            with contextlib.suppress(OSError):  # Azurite gone: the client sees its connection closed
                up_reader, upstream = await asyncio.open_connection("127.0.0.1", self._target)
                self._connections.add(upstream)
                pipes = [asyncio.create_task(self._pipe(reader, upstream, count=True)),
                         asyncio.create_task(self._pipe(up_reader, writer))]
                _, pending = await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
        finally:
            for end in (writer, upstream):
                if end is not None:
                    self._connections.discard(end)
                    end.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, count: bool = False) -> None:
        assert self._flowing is not None
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                await self._flowing.wait()
                if count:
                    self.requests.extend(m.group(1).decode() for m in _REQUEST_LINE.finditer(data))
                writer.write(data)
                await writer.drain()


@contextmanager
def storage_proxy(connection_string: str) -> Iterator[StorageProxy]:
    """A relaying ``StorageProxy`` in front of ``connection_string``'s Azurite."""
    proxy = StorageProxy(connection_string)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()
