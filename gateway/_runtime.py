"""The process's long-lived clients, made inside the running loop and closed at shutdown."""

from __future__ import annotations

import asyncio
import logging
import os
import random as _random
import signal
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
from azure.core.credentials_async import AsyncTokenCredential
from azure.data.tables.aio import TableServiceClient
from azure.identity.aio import DefaultAzureCredential
from azure.servicebus.aio import ServiceBusClient
from azure.storage.blob.aio import ExponentialRetry

from gateway import _tokens
from gateway._affinity import AffinityMap
from gateway._auth import KeyCache
from gateway._backends import BackendPool
from gateway._budget import TableBudgets
from gateway._contentlog import ContentLog, content_publisher
from gateway._credentials import TokenProvider
from gateway._proxy import Proxy
from gateway._publish import EventTransport, InProcessTransport, ServiceBusTransport, UsagePublisher
from gateway._quota import QuotaGuard, TableUsage
from gateway._records import LoggingSink, TeeSink, UsageSink
from gateway._settings import Settings, load_settings, unknown_price_backends
from gateway._telemetry import Telemetry, flush_telemetry
from gateway._timing import Timer
from usage import open_blob_service
from usage._aggregate import Aggregator
from usage._config import CONTENT_LOG_SETTING, STORAGE_SETTING, SettingsError
from usage._keys import KeyStore
from usage._tables import open_table_service

log = logging.getLogger(__name__)


#: how long the publisher gathers events before one send: to Service Bus, or (the local run) straight into
#: the tables, where a report a second later must already show the request
SERVICE_BUS_LINGER = 0.5
IN_PROCESS_LINGER = 0.5
#: how long the content log gathers records before it writes their blobs (one per key and hour)
CONTENT_LOG_LINGER = 1.0
#: on SIGTERM, how long the buffered usage events may take to go out before the process ends
SIGTERM_FLUSH_SECONDS = 5.0


class GatewayRuntime:
    """Holds one session, one credential, one table client and the ``Proxy`` built on them.

    Nothing happens at construction: ``start`` (or the first ``proxy()``) builds everything in
    the running event loop, ``close`` releases it. The Functions host calls ``proxy()`` lazily;
    the local host and tests call ``start`` with their own settings, clock and sink (and may pass
    a credential; otherwise ``DefaultAzureCredential`` is made when a setting needs one).
    """

    def __init__(self) -> None:
        self._proxy: Proxy | None = None
        self._closers: list[Callable[[], object]] = []
        self._lock: asyncio.Lock | None = None  # made in the loop that first starts the runtime
        self._warming: asyncio.Future[None] | None = None
        self._injected: dict[str, Any] = {}
        self._stopping: asyncio.Task[None] | None = None
        self.publisher: UsagePublisher | None = None
        self.content: ContentLog | None = None
        self.tables: TableServiceClient | None = None  # for the readiness check and the usage page
        self.keys: KeyCache | None = None  # for the usage page, which authenticates as the proxy does
        self.wall_clock: Callable[[], float] = time.time
        self.telemetry = Telemetry.off()

    def configure(
        self,
        *,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] | None = None,
        random: Callable[[], float] | None = None,
        sink: UsageSink | None = None,
        credential: AsyncTokenCredential | None = None,
    ) -> None:
        """Set what the lazy start (``proxy()``) injects instead of the real clock, randomness and credential.

        For a process that hosts the app, such as a test's worker; must come before the first start.
        """
        if self._proxy is not None:
            raise RuntimeError("configure() must come before the gateway starts")
        given = {"clock": clock, "wall_clock": wall_clock, "random": random, "sink": sink, "credential": credential}
        self._injected = {name: value for name, value in given.items() if value is not None}

    async def start(
        self,
        settings: Settings | None = None,
        *,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        random: Callable[[], float] = _random.random,
        sink: UsageSink | None = None,
        credential: AsyncTokenCredential | None = None,
    ) -> Proxy:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._proxy is not None:
                return self._proxy
            if settings is None:
                settings = load_settings(os.environ if env is None else env)
            try:
                self._proxy = self._build(settings, clock=clock, wall_clock=wall_clock, random=random,
                                          sink=sink, credential=credential)
            except BaseException:
                self.tables = self.keys = None
                await self._release()  # nothing half-built stays open
                raise
            self._warming = asyncio.get_running_loop().run_in_executor(None, _tokens.warm)
            self._flush_on_sigterm()
            log.info("gateway started with %d backend(s): %s", len(settings.backends),
                     ", ".join(b.name for b in settings.backends))
            for deployment, names in unknown_price_backends(settings).items():
                log.warning("PRICES overrides backend(s) %s for %s, which AOAI_BACKENDS does not have: a typo "
                            "prices their events at the deployment's own rates", names, deployment)
            return self._proxy

    def _build(
        self,
        settings: Settings,
        *,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        random: Callable[[], float],
        sink: UsageSink | None,
        credential: AsyncTokenCredential | None,
    ) -> Proxy:
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, enable_cleanup_closed=True),
            auto_decompress=False,
        )
        self._closers.append(session.close)
        if credential is None and settings.needs_credential:
            default = DefaultAzureCredential()
            self._closers.append(default.close)
            credential = default
        try:
            tables = open_table_service(settings.storage, credential=credential, session=session)
        except ValueError as exc:  # the SDK's word for a connection string it cannot use
            raise SettingsError(STORAGE_SETTING, "is not a usable storage connection string") from exc
        self._closers.append(tables.close)
        self.tables = tables
        # Table reads made for requests are bounded by the key lookup time-out, in the background too
        store = KeyStore(tables, secret=settings.key_hash_secret, lookup_timeout=settings.key_lookup_timeout)
        keys = KeyCache(store, ttl=settings.key_cache_seconds, stale=settings.key_stale_seconds,
                        timeout=settings.key_lookup_timeout, clock=clock, secret=settings.key_hash_secret,
                        previous_secret=settings.key_hash_previous_secret, rehash=store.rehash,
                        wall_clock=wall_clock)
        self._closers.append(keys.close)
        self.keys, self.wall_clock = keys, wall_clock
        self.telemetry = Telemetry.from_env(settings.backends)  # exporters from the environment, once per process
        quota = QuotaGuard(TableUsage(tables, timeout=settings.key_lookup_timeout),
                           TableBudgets(tables, timeout=settings.key_lookup_timeout),
                           cache_seconds=settings.quota_cache_seconds, read_timeout=settings.quota_read_timeout,
                           refresh_timeout=settings.key_lookup_timeout, fail_closed=settings.quota_fail_closed,
                           clock=clock, wall_clock=wall_clock, on_budget_warning=self.telemetry.budget_warning)
        self._closers.append(quota.close)
        # a Service Bus send, like an aggregation into the tables, costs milliseconds of CPU whatever its
        # size: gather events briefly first, so a burst of requests costs one send (see the constants)
        linger = IN_PROCESS_LINGER if settings.service_bus is None else SERVICE_BUS_LINGER
        self.publisher = UsagePublisher(self._transport(settings, tables, credential),
                                        capacity=settings.usage_buffer_size, linger=linger)
        self.publisher.start()  # closed first in close(), with its flush
        sinks: list[UsageSink] = [LoggingSink(), self.publisher]
        if sink is not None:
            sinks.append(sink)
        self.content = self._content_log(settings, session, credential)
        pool = BackendPool(settings.backends, clock=clock, random=random)
        self.telemetry.observe(pool=pool, publisher=self.publisher)
        return Proxy(
            settings,
            session=session,
            keys=keys,
            pool=pool,
            telemetry=self.telemetry,
            tokens=None if credential is None else TokenProvider(credential, wall_clock=wall_clock),
            quota=quota,
            sink=TeeSink(*sinks),
            timer=Timer.on(clock),
            wall_clock=wall_clock,
            content=self.content,
            affinity=AffinityMap(tables, timeout=settings.key_lookup_timeout, wall_clock=wall_clock),
        )

    @staticmethod
    def _content_log(
        settings: Settings, session: aiohttp.ClientSession, credential: AsyncTokenCredential | None
    ) -> ContentLog | None:
        """The content log's writer, when ``CONTENT_LOG`` is set (closed in ``close``, with its flush)."""
        if settings.content_log is None:
            return None
        try:
            # the writer backs off on its own: the SDK's retries (15 s, then 45 s) would hold a batch a minute
            service = open_blob_service(settings.content_log, credential=credential, session=session,
                                        retry_policy=ExponentialRetry(initial_backoff=1, increment_base=2,
                                                                      retry_total=2))
        except ValueError as exc:  # the SDK's word for a connection string it cannot use
            raise SettingsError(CONTENT_LOG_SETTING, "is not a usable storage connection string") from exc
        publisher = content_publisher(settings, service, linger=CONTENT_LOG_LINGER)
        publisher.start()
        return ContentLog(publisher)

    @staticmethod
    def _transport(
        settings: Settings, tables: TableServiceClient, credential: AsyncTokenCredential | None
    ) -> EventTransport:
        config = settings.service_bus
        if config is None:
            log.info("no Service Bus configured: usage events go straight to the aggregator in this process")
            return InProcessTransport(Aggregator(tables, prices=settings.prices))
        if config.connection_string is not None:
            try:
                client = ServiceBusClient.from_connection_string(config.connection_string)
            except ValueError as exc:
                raise SettingsError("ServiceBusConnection", "is not a usable Service Bus connection string") from exc
        else:
            assert config.fully_qualified_namespace is not None and credential is not None
            client = ServiceBusClient(config.fully_qualified_namespace, credential)
        return ServiceBusTransport(client, config.queue)

    def _flush_on_sigterm(self) -> None:
        """Azure (and the local host) stop a worker with SIGTERM: send what is buffered, then end as SIGTERM would."""
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers belong to the main thread's loop; the host stops others its own way
        loop = asyncio.get_running_loop()

        def stop() -> None:
            loop.remove_signal_handler(signal.SIGTERM)
            log.info("SIGTERM: flushing usage events and content records before the worker stops")
            self._stopping = loop.create_task(self._close_then_terminate())

        try:
            loop.add_signal_handler(signal.SIGTERM, stop)
        except (NotImplementedError, RuntimeError, ValueError):  # no signals here (another platform or loop)
            log.debug("no SIGTERM handler installed")

    async def _close_then_terminate(self) -> None:
        try:
            async with asyncio.timeout(SIGTERM_FLUSH_SECONDS + 1.0):
                await self.close(flush_seconds=SIGTERM_FLUSH_SECONDS)
        finally:
            signal.raise_signal(signal.SIGTERM)  # the handler is gone: the default action ends the process

    async def _release(self) -> None:
        closers, self._closers = self._closers[::-1], []
        for close in closers:
            result = close()
            if asyncio.iscoroutine(result):
                await result

    async def proxy(self) -> Proxy:
        """The running proxy, started from the environment (the app settings) on first use."""
        return self._proxy if self._proxy is not None else await self.start(**self._injected)

    async def close(self, *, flush_seconds: float = 10.0) -> None:
        if self._lock is None:
            return
        async with self._lock:
            self._proxy = self.tables = self.keys = None
            flushes = []  # both at once: SIGTERM gives them SIGTERM_FLUSH_SECONDS together
            if self.publisher is not None:
                publisher, self.publisher = self.publisher, None
                flushes.append(publisher.close(flush_seconds=flush_seconds))
            if self.content is not None:
                content, self.content = self.content, None
                flushes.append(content.close(flush_seconds=flush_seconds))
            await asyncio.gather(*flushes)
            await self._release()
            if self.telemetry.enabled:  # a worker ended by SIGTERM runs no atexit hook: export what is held now
                await asyncio.get_running_loop().run_in_executor(None, flush_telemetry)
            if self._warming is not None:
                await self._warming
                self._warming = None
        self._lock = None
