"""Usage, keys and quotas in Azure Table Storage."""

from usage._aggregate import Aggregator, BatchResult
from usage._config import StorageConfig, load_storage_config, read_environment
from usage._events import MAX_TOKENS, MalformedEvent, UsageEvent, decode_event
from usage._functions import AggregatorRuntime, QueueMessage, aggregate_messages, clean_ledger
from usage._housekeeping import CleanupResult, delete_old_ledgers
from usage._keys import KeyRecord, KeyStore, Limits, hash_key
from usage._metrics import use_meter_provider
from usage._tables import STORAGE_ERRORS, bounded, open_table_service

__all__ = [
    "MAX_TOKENS",
    "STORAGE_ERRORS",
    "Aggregator",
    "AggregatorRuntime",
    "BatchResult",
    "CleanupResult",
    "KeyRecord",
    "KeyStore",
    "Limits",
    "MalformedEvent",
    "QueueMessage",
    "StorageConfig",
    "UsageEvent",
    "aggregate_messages",
    "bounded",
    "clean_ledger",
    "decode_event",
    "delete_old_ledgers",
    "hash_key",
    "load_storage_config",
    "open_table_service",
    "read_environment",
    "use_meter_provider",
]
