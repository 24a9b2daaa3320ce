"""The host's end of the worker protocol: a gRPC ``FunctionRpc.EventStream`` server for one worker.

Requests are queued to the worker; each answer resolves the request that waits for it (init, metadata,
a function's load, an invocation). ``RpcLog`` messages are written to the host's log under the worker's
own logger names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc

from devkit._logs import python_level
from devkit._protos import protos

log = logging.getLogger("devkit.host")
_SERVICE = "AzureFunctionsRpcMessages.FunctionRpc"

def _answer_key(kind: str, message: Any) -> str:
    """Which request an answer belongs to: the key the host gave it in ``request``."""
    if kind == "function_load_response":
        return f"load:{message.function_load_response.function_id}"
    if kind == "invocation_response":
        return f"invocation:{message.invocation_response.invocation_id}"
    return _SINGLE_ANSWERS[kind]


_SINGLE_ANSWERS = {"worker_init_response": "init", "function_metadata_response": "metadata",
                   "function_environment_reload_response": "reload", "worker_status_response": "status"}
_ANSWERS = {"function_load_response", "invocation_response", *_SINGLE_ANSWERS}


class WorkerGone(Exception):
    """The worker's stream ended (the process exited or was killed)."""


class WorkerChannel:
    """Serves one worker's event stream and matches its answers to the host's requests."""

    def __init__(self, *, worker_logs: logging.Logger | None = None) -> None:
        self._outgoing: asyncio.Queue[Any] = asyncio.Queue()
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._connected: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._closed = False
        self._server: grpc.aio.Server | None = None
        self._worker_logs = worker_logs

    async def listen(self, host: str = "127.0.0.1") -> int:
        """Start the gRPC server; returns its port."""
        options = [("grpc.max_receive_message_length", 2**31 - 1), ("grpc.max_send_message_length", 2**31 - 1)]
        self._server = grpc.aio.server(options=options)
        handler = grpc.stream_stream_rpc_method_handler(
            self._event_stream, request_deserializer=protos.StreamingMessage.FromString,
            response_serializer=protos.StreamingMessage.SerializeToString)
        service = grpc.method_handlers_generic_handler(_SERVICE, {"EventStream": handler})
        self._server.add_generic_rpc_handlers((service,))
        port = int(self._server.add_insecure_port(f"{host}:0"))
        await self._server.start()
        return port

    async def connected(self) -> str:
        """The worker id, once the worker has opened its stream."""
        return await asyncio.shield(self._connected)

    async def _event_stream(self, requests: AsyncIterator[Any], context: Any) -> AsyncIterator[Any]:
        reader = asyncio.get_running_loop().create_task(self._read(requests))
        try:
            while True:
                message = await self._outgoing.get()
                if message is None:
                    return
                yield message
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(self, requests: AsyncIterator[Any]) -> None:
        try:
            async for message in requests:
                self._received(message)
        finally:
            self._fail_all(WorkerGone("the worker's stream ended"))

    def _received(self, message: Any) -> None:
        kind = message.WhichOneof("content")
        if kind == "start_stream":
            if not self._connected.done():
                self._connected.set_result(message.start_stream.worker_id)
        elif kind == "rpc_log":
            self._log(message.rpc_log)
        elif kind in _ANSWERS:
            future = self._pending.pop(_answer_key(kind, message), None)
            if future is not None and not future.done():
                future.set_result(getattr(message, kind))
        else:
            log.debug("unexpected %s from the worker", kind)

    def _log(self, record: Any) -> None:
        logger = self._worker_logs or logging.getLogger(record.category or "worker")
        logger.log(python_level(record.level), "%s", record.message)

    def request(self, key: str, **content: Any) -> asyncio.Future[Any]:
        """Send one request; the future resolves with the worker's answer to it."""
        if self._closed:
            raise WorkerGone("the worker has stopped")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        self._outgoing.put_nowait(protos.StreamingMessage(request_id=key, **content))
        return future

    def _fail_all(self, exc: Exception) -> None:
        self._closed = True
        if not self._connected.done():
            self._connected.set_exception(exc)
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(exc)

    async def close(self) -> None:
        self._outgoing.put_nowait(None)
        self._fail_all(WorkerGone("the host closed the stream"))
        if self._server is not None:
            await self._server.stop(grace=1.0)
            self._server = None
