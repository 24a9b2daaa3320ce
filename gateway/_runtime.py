"""The process's long-lived clients, made inside the running loop and closed at shutdown."""

from __future__ import annotations

import asyncio
import logging
import random as _random
import time
from collections.abc import Callable, Mapping

import aiohttp
from azure.core.credentials_async import AsyncTokenCredential
from azure.data.tables.aio import TableServiceClient
from azure.identity.aio import DefaultAzureCredential
from azure.servicebus.aio import ServiceBusClient

from gateway import _tokens
from gateway._auth import KeyCache
from gateway._backends import BackendPool
from gateway._credentials import TokenProvider
from gateway._proxy import Proxy
from gateway._publish import EventTransport, InProcessTransport, ServiceBusTransport, UsagePublisher
from gateway._quota import QuotaGuard
from gateway._records import LoggingSink, TeeSink, UsageSink
from gateway._settings import Settings, load_settings
from gateway._timing import Timer
from usage._aggregate import Aggregator
from usage._config import STORAGE_SETTING, SettingsError, read_environment
from usage._keys import KeyStore
from usage._tables import open_table_service

log = logging.getLogger(__name__)


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
        self.publisher: UsagePublisher | None = None

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
                settings = load_settings(read_environment() if env is None else env)
            try:
                self._proxy = self._build(settings, clock=clock, wall_clock=wall_clock, random=random,
                                          sink=sink, credential=credential)
            except BaseException:
                await self._release()  # nothing half-built stays open
                raise
            self._warming = asyncio.get_running_loop().run_in_executor(None, _tokens.warm)
            log.info("gateway started with %d backend(s): %s", len(settings.backends),
                     ", ".join(b.name for b in settings.backends))
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
        store = KeyStore(tables, secret=settings.key_hash_secret)
        # a Service Bus send costs milliseconds of CPU whatever its size: gather a second's events
        # first. In process (the local run) events are counted at once, so a report right after a
        # request already shows it.
        self.publisher = UsagePublisher(self._transport(settings, tables, credential),
                                        capacity=settings.usage_buffer_size,
                                        linger=0.0 if settings.service_bus is None else 1.0)
        self.publisher.start()
        self._closers.append(self.publisher.close)
        sinks: list[UsageSink] = [LoggingSink(), self.publisher]
        if sink is not None:
            sinks.append(sink)
        return Proxy(
            settings,
            session=session,
            keys=KeyCache(store, ttl=settings.key_cache_seconds, clock=clock,
                          secret=settings.key_hash_secret),
            pool=BackendPool(settings.backends, clock=clock, random=random),
            tokens=None if credential is None else TokenProvider(credential, wall_clock=wall_clock),
            quota=QuotaGuard(tables, cache_seconds=settings.quota_cache_seconds,
                             settle_seconds=settings.quota_settle_seconds, clock=clock, wall_clock=wall_clock),
            sink=TeeSink(*sinks),
            timer=Timer.on(clock),
            wall_clock=wall_clock,
        )

    @staticmethod
    def _transport(
        settings: Settings, tables: TableServiceClient, credential: AsyncTokenCredential | None
    ) -> EventTransport:
        config = settings.service_bus
        if config is None:
            log.info("no Service Bus configured: usage events go straight to the aggregator in this process")
            return InProcessTransport(Aggregator(tables))
        if config.connection_string is not None:
            try:
                client = ServiceBusClient.from_connection_string(config.connection_string)
            except ValueError as exc:
                raise SettingsError("ServiceBusConnection", "is not a usable Service Bus connection string") from exc
        else:
            assert config.fully_qualified_namespace is not None and credential is not None
            client = ServiceBusClient(config.fully_qualified_namespace, credential)
        return ServiceBusTransport(client, config.queue)

    async def _release(self) -> None:
        closers, self._closers = self._closers[::-1], []
        for close in closers:
            result = close()
            if asyncio.iscoroutine(result):
                await result

    async def proxy(self) -> Proxy:
        """The running proxy, started from the environment on first use."""
        return self._proxy if self._proxy is not None else await self.start()

    async def close(self) -> None:
        if self._lock is None:
            return
        async with self._lock:
            self._proxy = None
            await self._release()
            if self._warming is not None:
                await self._warming
                self._warming = None
        self._lock = None
