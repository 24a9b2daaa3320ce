"""Deleting ledger rows past the queue's redelivery horizon (``LEDGER_RETENTION_DAYS``).

A ledger row (``ledger|<minute>|<uuid>`` in a key's month partition) only matters while a message
holding one of its events can still be delivered: after that nothing can count those events twice.
So rows whose minute is older than the horizon are deleted, partition by partition, in entity-group
transactions of up to 100. Only partitions of months up to the cut-off's are read (the filter keeps the
query to ledger rows), and only their keys are fetched. Counter rows are never touched.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime, timedelta

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import TransactionOperation
from azure.data.tables.aio import TableServiceClient

from usage._schema import USAGE_TABLE, period_start

log = logging.getLogger(__name__)
_BATCH = 100  # Table Storage's limit per entity-group transaction


@dataclass(frozen=True, slots=True)
class CleanupResult:
    deleted: int
    partitions: int
    cutoff: str  # the first minute kept


async def delete_old_ledgers(service: TableServiceClient, *, retention_days: float, now: datetime) -> CleanupResult:
    """Delete every ledger row of a minute before ``now - retention_days``."""
    cutoff = now - timedelta(days=retention_days)
    first_kept = period_start("minute", cutoff)
    table = service.get_table_client(USAGE_TABLE)
    rows: dict[str, list[str]] = defaultdict(list)
    query = table.query_entities(
        "PartitionKey lt @pk and RowKey ge @lo and RowKey lt @hi",
        parameters={"pk": f"{period_start('month', cutoff)}}}", "lo": "ledger|", "hi": f"ledger|{first_kept}"},
        select=["PartitionKey", "RowKey"])
    try:
        async for entity in query:
            rows[str(entity["PartitionKey"])].append(str(entity["RowKey"]))
    except ResourceNotFoundError:  # no usage table yet: nothing was ever counted
        return CleanupResult(0, 0, first_kept)
    deleted = 0
    for pk, keys in rows.items():
        for first in range(0, len(keys), _BATCH):
            chunk = keys[first:first + _BATCH]
            await table.submit_transaction([(TransactionOperation.DELETE, {"PartitionKey": pk, "RowKey": key})
                                            for key in chunk])
            deleted += len(chunk)
    log.info("ledger clean-up: %d row(s) of %d partition(s) before %s deleted", deleted, len(rows), first_kept)
    return CleanupResult(deleted, len(rows), first_kept)
