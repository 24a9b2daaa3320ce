"""Usage, keys and quotas in Azure Table Storage."""

from usage._aggregate import Aggregator, BatchResult
from usage._config import BlobStorageConfig, StorageConfig, load_blob_config, load_storage_config, read_environment
from usage._content import CONTAINER as CONTENT_CONTAINER
from usage._content import hour_prefix, open_blob_service, read_records
from usage._events import MAX_TOKENS, MalformedEvent, UsageEvent, decode_event
from usage._functions import AggregatorRuntime, QueueMessage, aggregate_messages, clean_ledger
from usage._housekeeping import CleanupResult, delete_old_ledgers
from usage._keys import KeyRecord, KeyStore, Limits, hash_key
from usage._metrics import use_meter_provider
from usage._tables import STORAGE_ERRORS, bounded, open_table_service

__all__ = [
    "CONTENT_CONTAINER",
    "MAX_TOKENS",
    "STORAGE_ERRORS",
    "Aggregator",
    "AggregatorRuntime",
    "BatchResult",
    "BlobStorageConfig",
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
    "hour_prefix",
    "load_blob_config",
    "load_storage_config",
    "open_blob_service",
    "open_table_service",
    "read_environment",
    "read_records",
    "use_meter_provider",
]
