"""Test servers: Azurite (real Table Storage), simulated AOAI regions, and the gateway's local host."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import uvicorn

import function_app
from gateway import BackendConfig, LoggingSink, Settings, UsageRecord
from gateway._host import LocalHost
from gateway.simulator import SimulatedRegion
from usage import KeyStore, StorageConfig, open_table_service
from usage._keys import Limits

T = TypeVar("T")
PROJECT = Path(__file__).resolve().parent.parent
AZURITE_ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def azurite_main() -> Path:
    """Azurite's table server script, installed by scripts/setup.sh into .azurite/."""
    path = Path(os.environ.get("AZURITE_DIR", PROJECT / ".azurite")) / "node_modules/azurite/dist/src/table/main.js"
    if not path.is_file():
        raise RuntimeError(f"Azurite is not installed at {path}; run scripts/setup.sh")
    return path


@contextmanager
def azurite() -> Iterator[str]:
    """A fresh in-memory Azurite table server; yields its connection string."""
    port = free_port()
    node = shutil.which("node") or "node"
    process = subprocess.Popen(
        [node, str(azurite_main()), "--tableHost", "127.0.0.1", "--tablePort", str(port),
         "--inMemoryPersistence", "--disableTelemetry", "--skipApiVersionCheck"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_ACCOUNT_KEY};"
               f"TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")
    finally:
        process.terminate()
        process.wait(timeout=10)


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


@dataclass
class RecordingSink:
    records: list[UsageRecord] = field(default_factory=list)

    def emit(self, record: UsageRecord) -> None:
        self.records.append(record)
        LoggingSink().emit(record)  # and log it as the local run does, so log checks see it

    def wait(self, count: int = 1, timeout: float = 10.0) -> list[UsageRecord]:
        """The records once ``count`` have arrived (a stream's record lands as it closes)."""
        deadline = time.monotonic() + timeout
        while len(self.records) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(self.records) >= count, f"expected {count} usage record(s), got {self.records}"
        return self.records


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
    """A running local host serving function_app.py, with its regions and a valid key."""

    url: str
    key: str
    clock: FakeClock
    sink: RecordingSink
    regions: list[SimulatedRegion]
    loop: LoopThread
    settings: Settings
    logs: CapturedLogs

    def create_key(self, name: str, limits: Limits | None = None) -> str:
        """A new subscription key (with quotas) in the gateway's key table."""

        async def create() -> str:
            async with open_table_service(self.settings.storage) as service:
                store = KeyStore(service, secret=self.settings.key_hash_secret)
                return await store.create(name, limits=limits or Limits())

        return self.loop.run(create())

    @property
    def eastus(self) -> SimulatedRegion:
        return self.regions[0]

    @property
    def westus(self) -> SimulatedRegion:
        return self.regions[1]


def backend_key(region: SimulatedRegion) -> str:
    return f"backend-secret-{region.name}"


@contextmanager
def running_gateway(
    connection_string: str,
    *,
    backends: Callable[[tuple[BackendConfig, ...]], tuple[BackendConfig, ...]] | None = None,
    env: dict[str, str] | None = None,
    credential: Any = None,
    **overrides: Any,
) -> Iterator[Gateway]:
    """Two simulated regions (same priority, eastus chosen first), the gateway, and a fresh key.

    ``backends`` rewrites the two regions' backend list; ``overrides`` replace settings fields.
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
    clock = FakeClock()
    sink = RecordingSink()
    logs = CapturedLogs()
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(logs)
    root.setLevel(logging.DEBUG)
    for noisy in ("proton", "azure.servicebus._pyamqp"):  # frame-by-frame AMQP traces
        logging.getLogger(noisy).setLevel(logging.INFO)
    runtime, aggregator = function_app.runtime, function_app.aggregator

    async def startup() -> None:
        await runtime.start(settings, clock=clock, random=lambda: 0.0, sink=sink, credential=credential)
        await aggregator.aggregator({"UsageStorage": connection_string})  # what the queue trigger writes to

    async def shutdown() -> None:
        await runtime.close()
        await aggregator.close()

    host = LocalHost(function_app.app, startup=startup, shutdown=shutdown, env=env)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(host, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", access_log=False))
    serving = asyncio.run_coroutine_threadsafe(server.serve(), loop.loop)
    try:
        wait_for_port(port)
        yield Gateway(f"http://127.0.0.1:{port}", key, clock, sink, regions, loop, settings, logs)
    finally:
        server.should_exit = True
        serving.result(15)
        for region in regions:
            loop.run(region.stop())
        loop.close()
        root.removeHandler(logs)
        root.setLevel(previous_level)
