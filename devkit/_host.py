"""The local Functions host: starts a worker process around the real runtime library, indexes and loads the
function app through it, and serves its HTTP, Service Bus and timer triggers.

It plays only the .NET host's part and knows nothing of the app it serves: routes, triggers and their
settings come from the function metadata the runtime reports, ``host.json`` and the app settings.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from devkit._channel import WorkerChannel, WorkerGone
from devkit._config import HostJson
from devkit._http import HttpFront
from devkit._protos import protos
from devkit._routes import Route, RouteTable, make_route
from devkit._servicebus import QueueTrigger, TriggerRunner, UnresolvedSetting, queue_trigger
from devkit._timer import BadSchedule, TimerRunner, TimerTrigger, timer_trigger

log = logging.getLogger("devkit.host")
HOST_VERSION = "4.1040.100.0"
DEVKIT_ROOT = Path(__file__).resolve().parent.parent
WORKER_COMMAND = (sys.executable, "-m", "devkit.worker")


class FunctionLoadFailed(RuntimeError):
    """The runtime refused the function app; the message is the runtime's own."""


@dataclass(frozen=True, slots=True)
class IndexedFunction:
    """One function as the runtime reported it."""

    name: str
    function_id: str
    bindings: tuple[dict[str, Any], ...]

    @property
    def trigger(self) -> dict[str, Any]:
        return next((b for b in self.bindings if str(b.get("type", "")).endswith("Trigger")), {})


def _status_error(result: Any) -> str:
    return str(result.exception.message or protos.StatusResult.Status.Name(result.status))


@dataclass
class FunctionsHost:
    """One worker process and the triggers it serves. ``start`` it in the loop that will serve it."""

    app_dir: Path
    settings: Mapping[str, str]
    worker_command: Sequence[str] = WORKER_COMMAND
    host_json: HostJson = field(default_factory=HostJson)
    shutdown_grace: float = 10.0
    functions: list[IndexedFunction] = field(default_factory=list)
    worker_url: str = ""
    _channel: WorkerChannel | None = None
    _process: asyncio.subprocess.Process | None = None
    _session: aiohttp.ClientSession | None = None
    _triggers: TriggerRunner | None = None
    #: the timer triggers' wall clock (epoch seconds) and sleep; a test injects its own
    timer_clock: Callable[[], float] = time.time
    timer_sleep: Callable[[float], Awaitable[object]] = asyncio.sleep
    _timers: TimerRunner | None = None

    async def start(self, *, start_timeout: float = 60.0) -> None:
        """Start the worker, index and load the app; raises ``FunctionLoadFailed`` with the runtime's message."""
        self._channel = WorkerChannel()
        port = await self._channel.listen()
        self._process = await asyncio.create_subprocess_exec(
            *self.worker_command, "--host", "127.0.0.1", "--port", str(port), "--workerId", str(uuid.uuid4()),
            "--requestId", str(uuid.uuid4()), cwd=self.app_dir, env=self._worker_env(), start_new_session=True)
        try:
            async with asyncio.timeout(start_timeout):
                await self._connect()
                await self._index()
        except TimeoutError as exc:
            await self.stop()
            raise FunctionLoadFailed(f"the worker did not start within {start_timeout:.0f} s") from exc
        except (FunctionLoadFailed, WorkerGone):
            await self.stop()
            raise
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False), auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None, sock_connect=10))
        self._start_triggers()

    @property
    def worker_pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def _worker_env(self) -> dict[str, str]:
        env = {**os.environ, **self.settings}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(DEVKIT_ROOT), env.get("PYTHONPATH", "")) if p)
        env.setdefault("FUNCTIONS_WORKER_RUNTIME", "python")
        return env

    async def _connect(self) -> None:
        assert self._channel is not None and self._process is not None
        connected = asyncio.ensure_future(self._channel.connected())
        exited = asyncio.ensure_future(self._process.wait())
        await asyncio.wait({connected, exited}, return_when=asyncio.FIRST_COMPLETED)
        if not connected.done():
            connected.cancel()
            raise FunctionLoadFailed(f"the worker process exited with code {self._process.returncode} before "
                                     "it connected")
        exited.cancel()
        connected.result()

    async def _index(self) -> None:
        assert self._channel is not None
        directory = str(self.app_dir)
        init = await self._channel.request("init", worker_init_request=protos.WorkerInitRequest(
            host_version=HOST_VERSION, function_app_directory=directory, worker_directory=directory,
            capabilities={"MultiStream": "true", "HandlesWorkerTerminateMessage": "true"}))
        if init.result.status != protos.StatusResult.Success:
            raise FunctionLoadFailed(_status_error(init.result))
        self.worker_url = init.capabilities.get("HttpUri", "")
        metadata = await self._channel.request("metadata", functions_metadata_request=protos.FunctionsMetadataRequest(
            function_app_directory=directory))
        if metadata.result.status != protos.StatusResult.Success:
            raise FunctionLoadFailed(_status_error(metadata.result))
        for found in metadata.function_metadata_results:
            loaded = await self._channel.request(f"load:{found.function_id}", function_load_request=(
                protos.FunctionLoadRequest(function_id=found.function_id, metadata=found)))
            if loaded.result.status != protos.StatusResult.Success:
                raise FunctionLoadFailed(f"function {found.name}: {_status_error(loaded.result)}")
            self.functions.append(IndexedFunction(found.name, found.function_id,
                                                  tuple(json.loads(raw) for raw in found.raw_bindings)))
        if any(f.trigger.get("type") == "httpTrigger" for f in self.functions) and not self.worker_url:
            raise FunctionLoadFailed("the app has HTTP functions but the runtime started no HTTP server (HttpUri)")
        if self.worker_url:
            await _wait_listening(self.worker_url)
        log.info("worker loaded %d function(s): %s", len(self.functions), ", ".join(f.name for f in self.functions))

    def enabled(self, function: IndexedFunction) -> bool:
        disabled = self.settings.get(f"AzureWebJobs.{function.name}.Disabled", "").strip().lower() in ("true", "1")
        if disabled:
            log.info("function %s is disabled by AzureWebJobs.%s.Disabled", function.name, function.name)
        return not disabled

    def routes(self) -> RouteTable:
        return RouteTable([make_route(f.name, f.function_id, f.trigger, self.host_json.route_prefix)
                           for f in self.functions if f.trigger.get("type") == "httpTrigger" and self.enabled(f)])

    def http_app(self) -> HttpFront:
        """The ASGI app serving the HTTP functions (after ``start``)."""
        assert self._session is not None
        return HttpFront(self.routes(), invoke=self._invoke_http, worker_url=self.worker_url, session=self._session)

    def _start_triggers(self) -> None:
        triggers: list[QueueTrigger] = []
        for function in self.functions:
            binding = function.trigger
            if binding.get("type") != "serviceBusTrigger" or "queueName" not in binding or not self.enabled(function):
                continue
            connection = str(binding.get("connection", ""))
            if not (self.settings.get(connection) or self.settings.get(f"{connection}__fullyQualifiedNamespace")):
                log.info("function %s is not run: its connection setting %s is not set", function.name, connection)
                continue
            try:
                triggers.append(queue_trigger(function.name, function.function_id, binding, self.settings))
            except UnresolvedSetting as exc:
                log.error("function %s is not run: %s", function.name, exc)
        self._triggers = TriggerRunner(triggers, self.settings, invoke=self._invoke_queue,
                                       max_batch=self.host_json.max_message_batch_size)
        self._triggers.start()
        self._start_timers()

    def _start_timers(self) -> None:
        timers: list[TimerTrigger] = []
        for function in self.functions:
            if function.trigger.get("type") != "timerTrigger" or not self.enabled(function):
                continue
            try:
                timers.append(timer_trigger(function.name, function.function_id, function.trigger, self.settings))
            except (UnresolvedSetting, BadSchedule) as exc:
                log.error("function %s is not run: %s", function.name, exc)
        self._timers = TimerRunner(timers, invoke=self._invoke_timer, clock=self.timer_clock, sleep=self.timer_sleep)
        self._timers.start()

    async def run_timer(self, function: str) -> bool:
        """Invoke a timer function now, as the host's admin API (``POST /admin/functions/{name}``) does;
        True if it succeeded. The function must be enabled and its schedule valid."""
        assert self._timers is not None
        return await self._timers.fire(function)

    def _invoke_http(self, route: Route, invocation_id: str, method: str, url: str,
                     params: dict[str, str]) -> asyncio.Future[Any]:
        assert self._channel is not None
        trigger = protos.ParameterBinding(name=route.arg_name, data=protos.TypedData(http=protos.RpcHttp(
            method=method, url=url, params=params)))
        return self._channel.request(f"invocation:{invocation_id}", invocation_request=protos.InvocationRequest(
            invocation_id=invocation_id, function_id=route.function_id, input_data=[trigger]))

    async def _invoke_queue(self, trigger: QueueTrigger, invocation_id: str, input_data: list[Any],
                            metadata: dict[str, Any]) -> Any:
        assert self._channel is not None
        return await self._channel.request(f"invocation:{invocation_id}", invocation_request=protos.InvocationRequest(
            invocation_id=invocation_id, function_id=trigger.function_id, input_data=input_data,
            trigger_metadata=metadata))

    async def _invoke_timer(self, trigger: TimerTrigger, invocation_id: str, input_data: list[Any]) -> Any:
        assert self._channel is not None
        return await self._channel.request(f"invocation:{invocation_id}", invocation_request=protos.InvocationRequest(
            invocation_id=invocation_id, function_id=trigger.function_id, input_data=input_data))

    async def stop(self) -> None:
        """Stop the triggers, then the worker: SIGTERM, up to ``shutdown_grace`` to exit, then SIGKILL."""
        if self._timers is not None:
            await self._timers.stop()
            self._timers = None
        if self._triggers is not None:
            await self._triggers.stop()
            self._triggers = None
        if self._process is not None and self._process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._process.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(self.shutdown_grace):
                    await self._process.wait()
            except TimeoutError:
                log.warning("the worker did not exit within %.0f s of SIGTERM; killing it", self.shutdown_grace)
                with contextlib.suppress(ProcessLookupError):
                    self._process.kill()
                await self._process.wait()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None


async def _wait_listening(url: str, *, attempts: int = 200) -> None:
    """The runtime starts its HTTP server as a task; the host waits until it accepts connections."""
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    for _ in range(attempts):
        try:
            _, writer = await asyncio.open_connection(host, int(port))
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return
    raise FunctionLoadFailed(f"the worker's HTTP server at {url} never accepted connections")
