"""Usage, keys and quotas in Azure Table Storage."""

from usage._config import StorageConfig, load_storage_config, read_environment
from usage._keys import KeyRecord, KeyStore, hash_key
from usage._tables import open_table_service

__all__ = [
    "KeyRecord",
    "KeyStore",
    "StorageConfig",
    "hash_key",
    "load_storage_config",
    "open_table_service",
    "read_environment",
]
