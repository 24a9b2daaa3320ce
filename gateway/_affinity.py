"""Where each stored response lives: the map from response id to the backend and deployment that made it.

A Responses API response exists only in the AOAI resource that produced it, so a call naming one
(by id, or as ``previous_response_id``) must go there. Every instance shares the map through Table
Storage and keeps what it has read or written in memory (ids never move, so nothing goes stale
before the entry expires with AOAI's retention).

Table ``responseaffinity``: PartitionKey = the response id, RowKey ``""``; ``Backend``,
``Deployment``, ``KeyName`` (who made it), ``CreatedAt``, ``ExpiresAt`` (30 days later). An entry
past ``ExpiresAt`` counts as absent; such rows can be deleted at any time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.data.tables.aio import TableClient, TableServiceClient

from usage import STORAGE_ERRORS, bounded

log = logging.getLogger(__name__)

AFFINITY_TABLE = "responseaffinity"
#: AOAI keeps a stored response for 30 days.
RETENTION_SECONDS = 30 * 24 * 3600.0
#: Entries kept in memory per instance (about 200 bytes each), the least recently used dropped first.
CACHE_ENTRIES = 100_000


@dataclass(frozen=True, slots=True)
class Affinity:
    """Where one stored response lives, who made it, and until when it can be used."""

    backend: str
    deployment: str
    key_name: str
    expires: float  # wall-clock seconds


class AffinityMap:
    """The shared map, cached in this process; its failures are logged and read as "not known"."""

    def __init__(
        self, service: TableServiceClient, *, timeout: float, wall_clock: Callable[[], float],
        capacity: int = CACHE_ENTRIES,
    ) -> None:
        self._service = service
        self._table: TableClient = service.get_table_client(AFFINITY_TABLE)
        self._timeout = timeout
        self._options = bounded(timeout)
        self._wall_clock = wall_clock
        self._capacity = capacity
        self._cache: OrderedDict[str, Affinity] = OrderedDict()

    def _keep(self, response_id: str, affinity: Affinity) -> None:
        self._cache[response_id] = affinity
        self._cache.move_to_end(response_id)
        while len(self._cache) > self._capacity:
            self._cache.popitem(last=False)

    def cached(self, response_id: str) -> Affinity | None:
        """The entry this instance knows, unexpired; no table read."""
        found = self._cache.get(response_id)
        if found is not None and found.expires <= self._wall_clock():
            del self._cache[response_id]
            return None
        return found

    async def record(self, response_id: str, *, backend: str, deployment: str, key_name: str,
                     created: float | None = None) -> bool:
        """Remember where ``response_id`` lives, in memory and in the table (within the time-out);
        whether the table has it. ``created``: the response's own creation time, else now."""
        start = self._wall_clock() if created is None else created
        affinity = Affinity(backend, deployment, key_name, expires=start + RETENTION_SECONDS)
        if self.cached(response_id) == affinity:
            return True
        self._keep(response_id, affinity)
        entity = {
            "PartitionKey": response_id, "RowKey": "", "Backend": backend, "Deployment": deployment,
            "KeyName": key_name, "CreatedAt": datetime.fromtimestamp(start, UTC),
            "ExpiresAt": datetime.fromtimestamp(affinity.expires, UTC),
        }
        try:
            async with asyncio.timeout(self._timeout):
                try:
                    await self._table.upsert_entity(entity, **self._options)
                except ResourceNotFoundError:  # the first response ever: make the table
                    with contextlib.suppress(ResourceExistsError):
                        await self._service.create_table(AFFINITY_TABLE, **self._options)
                    await self._table.upsert_entity(entity, **self._options)
        except STORAGE_ERRORS as exc:
            log.warning("could not record where response %s lives (%s); other instances will look for it",
                        response_id, type(exc).__name__)
            return False
        return True

    async def find(self, response_id: str) -> Affinity | None:
        """Where ``response_id`` lives, from memory or the table; ``None`` when unknown, expired or unreadable."""
        found = self.cached(response_id)
        if found is not None:
            return found
        try:
            async with asyncio.timeout(self._timeout):
                entity = await self._table.get_entity(response_id, "", **self._options)
        except ResourceNotFoundError:
            return None
        except STORAGE_ERRORS as exc:
            log.warning("could not read where response %s lives (%s)", response_id, type(exc).__name__)
            return None
        expires = entity.get("ExpiresAt")
        affinity = Affinity(
            backend=str(entity.get("Backend", "")), deployment=str(entity.get("Deployment", "")),
            key_name=str(entity.get("KeyName", "")),
            expires=expires.timestamp() if isinstance(expires, datetime) else 0.0,
        )
        if not affinity.backend or affinity.expires <= self._wall_clock():
            return None
        self._keep(response_id, affinity)
        return affinity
