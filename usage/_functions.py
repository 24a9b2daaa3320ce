"""The plain async function behind the Service Bus queue trigger, and the clients it needs."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Protocol

from azure.data.tables.aio import TableServiceClient
from azure.identity.aio import DefaultAzureCredential

from usage._aggregate import Aggregator, BatchResult
from usage._config import load_ledger_retention, load_storage_config
from usage._housekeeping import CleanupResult, delete_old_ledgers
from usage._prices import load_prices
from usage._tables import open_table_service

log = logging.getLogger(__name__)


class QueueMessage(Protocol):
    """What the aggregator needs of a message (``azure.functions.ServiceBusMessage`` has it)."""

    @property
    def message_id(self) -> str | None: ...

    def get_body(self) -> bytes: ...


class AggregatorRuntime:
    """One table client and aggregator per process, made in the running loop on first use, from the app
    settings: ``UsageStorage`` and ``PRICES`` (read once; a changed setting restarts the Functions app)."""

    def __init__(self) -> None:
        self._aggregator: Aggregator | None = None
        self._service: TableServiceClient | None = None
        self._credential: DefaultAzureCredential | None = None
        self._lock: asyncio.Lock | None = None

    async def aggregator(self, env: Mapping[str, str] | None = None) -> Aggregator:
        if self._aggregator is not None:
            return self._aggregator
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if self._aggregator is None:
                settings = os.environ if env is None else env
                config = load_storage_config(settings)
                prices = load_prices(settings)  # before any client: a bad PRICES fails here, naming itself
                self._credential = DefaultAzureCredential() if config.uses_identity else None
                self._service = open_table_service(config, credential=self._credential)
                self._aggregator = Aggregator(self._service, prices=prices)
            return self._aggregator

    async def service(self, env: Mapping[str, str] | None = None) -> TableServiceClient:
        """The process's table client (made with the aggregator)."""
        await self.aggregator(env)
        assert self._service is not None
        return self._service

    async def close(self) -> None:
        if self._service is not None:
            await self._service.close()
        if self._credential is not None:
            await self._credential.close()
        self._aggregator = self._service = self._credential = None
        self._lock = None


async def aggregate_messages(runtime: AggregatorRuntime, messages: Sequence[QueueMessage]) -> BatchResult:
    """Count a batch of usage messages exactly once. Raises on storage errors, so the runtime retries."""
    aggregator = await runtime.aggregator()
    result = await aggregator.aggregate([m.get_body() for m in messages], message_ids=[m.message_id for m in messages])
    log.info("usage batch of %d: %d counted, %d duplicate(s), %d rejected, %d transaction(s)",
             len(messages), result.counted, result.duplicates, result.rejected, result.transactions)
    return result


async def clean_ledger(runtime: AggregatorRuntime, *, env: Mapping[str, str] | None = None,
                       now: datetime | None = None) -> CleanupResult:
    """Delete ledger rows older than ``LEDGER_RETENTION_DAYS`` (what the timer trigger calls)."""
    settings = os.environ if env is None else env
    retention = load_ledger_retention(settings)
    service = await runtime.service(settings)
    return await delete_old_ledgers(service, retention_days=retention, now=now or datetime.now(UTC))
