"""The worker process: what Azure's Python 3.13+ worker does around the runtime library it calls.

The host starts it as ``python -m devkit.worker --host H --port P --workerId W --requestId R`` in the
function app's folder. It opens the host's gRPC ``FunctionRpc.EventStream``, says ``StartStream``, and
turns each request into a call of the real ``azure_functions_runtime`` library (worker init, metadata,
function load, invocation), answering on the same stream. From then on its log records go to the host
as ``RpcLog`` messages, as the Azure worker's do. When the host closes the stream, the process ends.
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import logging
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import azure_functions_runtime as runtime
import grpc

from devkit._logs import rpc_level
from devkit._protos import protos

log = logging.getLogger("devkit.worker")
_invocation: contextvars.ContextVar[str | None] = contextvars.ContextVar("invocation", default=None)
_SYSTEM_LOGGERS = ("azure.functions", "azure_functions_runtime", "devkit")


@dataclass
class WorkerRequest:
    """The object the runtime library's handlers take (the Azure worker passes the same three fields)."""

    name: str
    request: Any
    properties: dict[str, Any] | None = None


class StreamLogHandler(logging.Handler):
    """Sends every log record to the host as an ``RpcLog`` (never blocks the caller)."""

    def __init__(self, outgoing: asyncio.Queue[Any], request_id: str) -> None:
        super().__init__(logging.DEBUG)
        self._outgoing = outgoing
        self._request_id = request_id

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + logging.Formatter().formatException(record.exc_info)
        system = record.name.startswith(_SYSTEM_LOGGERS)
        self._outgoing.put_nowait(protos.StreamingMessage(request_id=self._request_id, rpc_log=protos.RpcLog(
            invocation_id=_invocation.get() or "", category=record.name, level=rpc_level(record.levelno),
            message=message, log_category=protos.RpcLog.RpcLogCategory.Value("System" if system else "User"))))


class Worker:
    """Dispatches the host's requests to the runtime library and queues the answers."""

    def __init__(self, *, host: str, request_id: str) -> None:
        self._host = host
        self._request_id = request_id
        self.outgoing: asyncio.Queue[Any] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._handlers: dict[str, tuple[str, Callable[[Any], Awaitable[Any]], str]] = {
            "worker_init_request": ("WorkerInitRequest", self._init, "worker_init_response"),
            "functions_metadata_request": ("FunctionsMetadataRequest", runtime.functions_metadata_request,
                                           "function_metadata_response"),
            "function_load_request": ("FunctionLoadRequest", runtime.function_load_request,
                                      "function_load_response"),
            "invocation_request": ("InvocationRequest", runtime.invocation_request, "invocation_response"),
            "function_environment_reload_request": ("FunctionEnvironmentReloadRequest", self._reload,
                                                    "function_environment_reload_response"),
            "worker_status_request": ("WorkerStatusRequest", self._status, "worker_status_response"),
        }

    def dispatch(self, message: Any) -> None:
        kind = message.WhichOneof("content")
        if kind not in self._handlers:
            log.debug("ignoring %s from the host", kind)
            return
        task = asyncio.get_running_loop().create_task(self._handle(kind, message))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _handle(self, kind: str, message: Any) -> None:
        name, handler, answer = self._handlers[kind]
        if kind == "invocation_request":
            _invocation.set(message.invocation_request.invocation_id)
        request = WorkerRequest(name, message, {"protos": protos, "host": self._host})
        try:
            response = await handler(request)
        except Exception as exc:  # the runtime answers its own failures; anything else must not leave the host waiting
            log.exception("%s failed in the worker", name)
            response = _failure(answer, message, exc)
        self.outgoing.put_nowait(protos.StreamingMessage(request_id=self._request_id, **{answer: response}))

    async def _init(self, request: WorkerRequest) -> Any:
        directory = request.request.worker_init_request.function_app_directory
        if directory and directory not in sys.path:
            sys.path.insert(0, directory)  # as the Azure worker does: the app's modules import from there
        return await runtime.worker_init_request(request)

    async def _reload(self, request: WorkerRequest) -> Any:
        return await runtime.function_environment_reload_request(request)

    async def _status(self, request: WorkerRequest) -> Any:
        return protos.WorkerStatusResponse()


def _failure(answer: str, message: Any, exc: Exception) -> Any:
    """A failed answer of the right kind, naming the exception."""
    result = protos.StatusResult(status=protos.StatusResult.Failure,
                                 exception=protos.RpcException(message=f"{type(exc).__name__}: {exc}"))
    if answer == "invocation_response":
        return protos.InvocationResponse(invocation_id=message.invocation_request.invocation_id, result=result)
    if answer == "function_load_response":
        return protos.FunctionLoadResponse(function_id=message.function_load_request.function_id, result=result)
    if answer == "worker_status_response":
        return protos.WorkerStatusResponse()
    return getattr(protos, {"worker_init_response": "WorkerInitResponse",
                            "function_metadata_response": "FunctionMetadataResponse",
                            "function_environment_reload_response": "FunctionEnvironmentReloadResponse"}[answer])(
        result=result)


async def serve(host: str, port: int, worker_id: str, request_id: str, max_message_length: int) -> int:
    """Run until the host closes the stream."""
    options = [("grpc.max_receive_message_length", max_message_length),
               ("grpc.max_send_message_length", max_message_length)]
    worker = Worker(host=host, request_id=request_id)
    runtime.start_threadpool_executor()

    async def requests() -> AsyncIterator[Any]:
        yield protos.StreamingMessage(request_id=request_id, start_stream=protos.StartStream(worker_id=worker_id))
        while True:
            yield await worker.outgoing.get()

    handler = StreamLogHandler(worker.outgoing, request_id)
    root = logging.getLogger()
    async with grpc.aio.insecure_channel(f"{host}:{port}", options=options) as channel:
        stream = protos.FunctionRpcStub(channel).EventStream(requests())
        root.handlers[:] = [handler]  # from here on, logs go to the host, as under the Azure worker
        root.setLevel(logging.DEBUG if os.environ.get("PYTHON_ENABLE_DEBUG_LOGGING") == "1" else logging.INFO)
        try:
            async for message in stream:
                worker.dispatch(message)
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE):
                raise
        finally:
            root.removeHandler(handler)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devkit.worker", description="The Functions worker process.")
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workerId", dest="worker_id", required=True)
    parser.add_argument("--requestId", dest="request_id", required=True)
    parser.add_argument("--grpcMaxMessageLength", dest="max_message_length", type=int, default=2**31 - 1)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="worker %(levelname)s %(name)s: %(message)s")
    return asyncio.run(serve(args.host, args.port, args.worker_id, args.request_id, args.max_message_length))


if __name__ == "__main__":
    sys.exit(main())
