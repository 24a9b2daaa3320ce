"""Test servers: Azurite (real Table Storage), simulated AOAI regions, and the gateway's local host."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields, replace
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

from devkit._config import HostJson
from devkit._host import WORKER_COMMAND, FunctionsHost
from devkit._serve import front_options
from devkit.services import free_port, wait_for_port
from devkit.simulator import SimulatedRegion
from gateway import BackendConfig, Settings
from tests.fakes import CLOCK_START, RecordedUsage, SharedClock
from usage import KeyStore, StorageConfig, open_table_service
from usage._keys import Limits
from usage._prices import dump_prices

T = TypeVar("T")
PROJECT = Path(__file__).resolve().parent.parent
def eventually(predicate: Callable[[], object], *, timeout: float = 30.0,
               message: Callable[[], object] | None = None) -> None:
    """Wait until ``predicate()`` holds; else fail, saying ``message()``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g} s" + (f": {message()}" if message else ""))


class LoopThread:
    """An event loop in a thread, so sync SDK clients in the test can call servers running in it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


class FakeClock:
    """A monotonic clock the test moves by hand: cooling periods pass without sleeping."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


def http(method: str, url: str, *, headers: dict[str, str] | None = None, body: bytes | None = None,
         timeout: float = 10.0) -> RawResponse:
    """One plain HTTP request (stdlib only), for what an SDK would hide: raw bytes, odd inputs."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return RawResponse(response.status, {k.lower(): v for k, v in response.headers.items()}, response.read())
    except urllib.error.HTTPError as error:
        return RawResponse(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())


CLIENT_LOGGERS = ("openai", "httpx", "httpcore")


class CapturedLogs(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(CLIENT_LOGGERS):  # the test's own SDK clients, not the gateway
            self.lines.append(self.format(record))


@dataclass
class Gateway:
    """The local host serving function_app.py through the real runtime in a worker process, with its
    simulated regions, a valid key, the worker's shared clock and the usage it recorded.

    ``clock.advance(s)`` moves the worker's monotonic clock and its wall clock (real time plus the
    advances) alike: key expiry and grace periods, quota windows and the events' times move with it."""

    url: str
    key: str
    clock: SharedClock
    sink: RecordedUsage
    regions: list[SimulatedRegion]
    loop: LoopThread
    settings: Settings
    logs: CapturedLogs
    host: FunctionsHost

    def create_key(self, name: str, limits: Limits | None = None, *, log_content: bool = False,
                   deployments: frozenset[str] | None = None, expires_at: datetime | None = None) -> str:
        """A new subscription key (with quotas, content logging, a scope and an expiry when asked) in the
        gateway's key table."""

        async def create() -> str:
            async with open_table_service(self.settings.storage) as service:
                store = KeyStore(service, secret=self.settings.key_hash_secret)
                return await store.create(name, limits=limits or Limits(), log_content=log_content,
                                          deployments=deployments, expires_at=expires_at)

        return self.loop.run(create())

    @property
    def eastus(self) -> SimulatedRegion:
        return self.regions[0]

    @property
    def westus(self) -> SimulatedRegion:
        return self.regions[1]


def backend_key(region: SimulatedRegion) -> str:
    return f"backend-secret-{region.name}"


def _backend_json(backend: BackendConfig) -> dict[str, Any]:
    document: dict[str, Any] = {"name": backend.name, "endpoint": backend.endpoint, "priority": backend.priority,
                                "weight": backend.weight}
    if backend.api_key is not None:
        document["api_key"] = backend.api_key
    if backend.response_timeout is not None:
        document["response_timeout_seconds"] = backend.response_timeout
    if backend.deployments is not None:
        timeouts = backend.deployment_timeouts or {}
        document["deployments"] = {
            ours: {"name": theirs, "response_timeout_seconds": timeouts[ours]} if ours in timeouts else theirs
            for ours, theirs in backend.deployments.items()}
    return document


def _seconds(value: float) -> str:
    return repr(float(value))


#: how each ``Settings`` field is written as an app setting (the inverse of ``load_settings``)
SETTING_WRITERS: dict[str, Callable[[Any], dict[str, str]]] = {
    "backends": lambda v: {"AOAI_BACKENDS": json.dumps([_backend_json(b) for b in v])},
    "storage": lambda v: ({"UsageStorage": v.connection_string} if v.connection_string is not None
                          else {"UsageStorage__tableServiceUri": v.table_service_uri}),
    "key_hash_secret": lambda v: {"KEY_HASH_SECRET": v.decode()},
    "key_hash_previous_secret": lambda v: {"KEY_HASH_SECRET_PREVIOUS": v.decode()} if v else {},
    "key_cache_seconds": lambda v: {"KEY_CACHE_SECONDS": _seconds(v)},
    "key_lookup_timeout": lambda v: {"KEY_LOOKUP_TIMEOUT_SECONDS": _seconds(v)},
    "key_stale_seconds": lambda v: {"KEY_STALE_SECONDS": _seconds(v)},
    "quota_read_timeout": lambda v: {"QUOTA_READ_TIMEOUT_SECONDS": _seconds(v)},
    "connect_timeout": lambda v: {"CONNECT_TIMEOUT_SECONDS": _seconds(v)},
    "response_timeout": lambda v: {"RESPONSE_TIMEOUT_SECONDS": _seconds(v)},
    "stream_idle_timeout": lambda v: {"STREAM_IDLE_TIMEOUT_SECONDS": _seconds(v)},
    "request_deadline": lambda v: {"REQUEST_DEADLINE_SECONDS": _seconds(v)},
    "max_attempts": lambda v: {"MAX_ATTEMPTS": str(v)},
    "default_cooldown": lambda v: {"DEFAULT_COOLDOWN_SECONDS": _seconds(v)},
    "failure_cooldown": lambda v: {"FAILURE_COOLDOWN_SECONDS": _seconds(v)},
    "max_request_bytes": lambda v: {"MAX_REQUEST_BYTES": str(v)},
    "body_read_timeout": lambda v: {"BODY_READ_TIMEOUT_SECONDS": _seconds(v)},
    "service_bus": lambda v: {} if v is None else {
        "USAGE_QUEUE_NAME": v.queue,
        **({"ServiceBusConnection": v.connection_string} if v.connection_string is not None
           else {"ServiceBusConnection__fullyQualifiedNamespace": v.fully_qualified_namespace})},
    "usage_buffer_size": lambda v: {"USAGE_BUFFER_SIZE": str(v)},
    "quota_cache_seconds": lambda v: {"QUOTA_CACHE_SECONDS": _seconds(v)},
    "quota_fail_closed": lambda v: {"QUOTA_FAIL_CLOSED": "true" if v else "false"},
    "content_log": lambda v: {} if v is None else (
        {"CONTENT_LOG": v.connection_string} if v.connection_string is not None
        else {"CONTENT_LOG__blobServiceUri": v.blob_service_uri}),
    "content_log_max_bytes": lambda v: {"CONTENT_LOG_MAX_BYTES": str(v)},
    "content_log_redact": lambda v: {"CONTENT_LOG_REDACT": json.dumps(list(v))},
    "content_log_buffer_bytes": lambda v: {"CONTENT_LOG_BUFFER_BYTES": str(v)},
    "ledger_retention_days": lambda v: {"LEDGER_RETENTION_DAYS": _seconds(v)},
    "prices": lambda v: {"PRICES": dump_prices(v)} if v else {},
}
_UNWRITTEN = {f.name for f in fields(Settings)} - set(SETTING_WRITERS)
assert not _UNWRITTEN, f"tests/harness.py cannot write these Settings fields as app settings: {_UNWRITTEN}"


def settings_env(settings: Settings) -> dict[str, str]:
    """``settings`` as the app settings that ``load_settings`` reads back into the same object."""
    env: dict[str, str] = {}
    for name, write in SETTING_WRITERS.items():
        env.update(write(getattr(settings, name)))
    return env


#: settings of the developer's shell that must not leak into a test's worker
_HOST_ONLY = ("AzureWebJobs", "ServiceBusConnection", "UsageStorage", "USAGE_", "AOAI_", "KEY_", "QUOTA_",
              "CONTENT_LOG", "PRICES")


@contextmanager
def running_host(loop: LoopThread, app_dir: Path, app_settings: dict[str, str], *,
                 worker_command: tuple[str, ...] | None = None) -> Iterator[tuple[str, FunctionsHost]]:
    """The local Functions host serving ``app_dir`` (its worker a process of its own); yields its URL."""
    host = FunctionsHost(app_dir, app_settings, host_json=HostJson.read(app_dir), shutdown_grace=10.0,
                         worker_command=worker_command or WORKER_COMMAND)
    loop.run(host.start(), timeout=90)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(host.http_app(), **front_options(), host="127.0.0.1", port=port))
    serving = asyncio.run_coroutine_threadsafe(server.serve(), loop.loop)
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}", host
    finally:
        server.should_exit = True
        serving.result(15)
        loop.run(host.stop(), timeout=30)


@contextmanager
def running_gateway(
    connection_string: str,
    *,
    backends: Callable[[tuple[BackendConfig, ...]], tuple[BackendConfig, ...]] | None = None,
    env: dict[str, str] | None = None,
    entra: bool = False,
    **overrides: Any,
) -> Iterator[Gateway]:
    """Two simulated regions (same priority, eastus chosen first), the gateway, and a fresh key.

    ``backends`` rewrites the two regions' backend list; ``overrides`` replace settings fields; ``env``
    adds app settings; ``entra`` gives the worker a credential issuing numbered Entra ID tokens.
    """
    loop = LoopThread()
    regions = [SimulatedRegion(name="eastus", chunk_delay=0.0), SimulatedRegion(name="westus", chunk_delay=0.0)]
    for region in regions:
        region.api_key = backend_key(region)
        loop.run(region.start())
    storage = StorageConfig(connection_string=connection_string)
    settings = Settings(
        backends=tuple(BackendConfig(name=r.name, endpoint=r.url, api_key=backend_key(r)) for r in regions),
        storage=storage,
        key_hash_secret=b"test-secret",
        connect_timeout=2.0,
        response_timeout=5.0,
        stream_idle_timeout=5.0,
    )
    if backends is not None:
        overrides["backends"] = backends(settings.backends)
    settings = replace(settings, **overrides)

    async def create_key() -> str:
        async with open_table_service(storage) as service:
            return await KeyStore(service, secret=settings.key_hash_secret).create(f"team-{uuid.uuid4().hex[:12]}")

    key = loop.run(create_key())
    scratch = Path(tempfile.mkdtemp(prefix="gateway-test-"))
    clock = SharedClock(scratch / "clock", start=CLOCK_START)
    app_settings = {k: v for k, v in os.environ.items() if not k.startswith(_HOST_ONLY)}
    # the queue trigger runs only where a test turns it on (it would take the events tests look for)
    app_settings.update({"FUNCTIONS_WORKER_RUNTIME": "python", "USAGE_QUEUE_NAME": "usage-events",
                         "AzureWebJobs.aggregate_usage.Disabled": "true",
                         "TEST_CLOCK_FILE": str(scratch / "clock"), "TEST_USAGE_FILE": str(scratch / "usage.jsonl"),
                         "TEST_ENTRA_CREDENTIAL": "1" if entra else "0"})
    app_settings.update(settings_env(settings))
    app_settings.update(env or {})
    logs = CapturedLogs()
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(logs)
    root.setLevel(logging.DEBUG)
    for noisy in ("proton", "azure.servicebus._pyamqp", "grpc"):  # frame-by-frame traces
        logging.getLogger(noisy).setLevel(logging.INFO)
    try:
        with running_host(loop, PROJECT, app_settings,
                          worker_command=(sys.executable, "-m", "tests.worker_entry")) as (url, host):
            yield Gateway(url, key, clock, RecordedUsage(scratch / "usage.jsonl"), regions, loop, settings, logs, host)
    finally:
        for region in regions:
            loop.run(region.stop())
        loop.close()
        clock.close()
        shutil.rmtree(scratch, ignore_errors=True)
        root.removeHandler(logs)
        root.setLevel(previous_level)
