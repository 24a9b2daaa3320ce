"""Settings shared by the gateway and the usage tools: where they come from and Table Storage's."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

STORAGE_SETTING = "UsageStorage"
CONTENT_LOG_SETTING = "CONTENT_LOG"


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it (start-up fails on it)."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"setting {name}: {problem}")
        self.name = name
        self.problem = problem


def read_environment(
    *, directory: Path | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The process environment over ``local.settings.json``'s ``Values``, as ``func start`` does."""
    merged: dict[str, str] = {}
    path = (directory or Path.cwd()) / "local.settings.json"
    if path.is_file():
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise SettingsError(str(path), f"is not valid JSON ({exc})") from exc
        values = document.get("Values", {}) if isinstance(document, dict) else {}
        if not isinstance(values, dict):
            raise SettingsError(str(path), '"Values" must be an object')
        merged.update({str(k): str(v) for k, v in values.items()})
    merged.update(os.environ if environ is None else environ)
    return merged


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """Table Storage: a connection string, or an endpoint reached with managed identity."""

    connection_string: str | None = field(default=None, repr=False)
    table_service_uri: str | None = None

    @property
    def uses_identity(self) -> bool:
        return self.connection_string is None


_AZURITE = (
    "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;"
    "AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;"
    "TableEndpoint=http://127.0.0.1:10002/devstoreaccount1;"
)


def load_storage_config(env: Mapping[str, str], name: str = STORAGE_SETTING) -> StorageConfig:
    """``<name>`` as a connection string, else ``<name>__tableServiceUri`` (managed identity)."""
    connection = env.get(name, "").strip()
    uri = env.get(f"{name}__tableServiceUri", "").strip()
    if connection:
        if connection.lower().replace(" ", "") == "usedevelopmentstorage=true":
            connection = _AZURITE
        if "=" not in connection:
            raise SettingsError(name, "is not a storage connection string")
        return StorageConfig(connection_string=connection)
    if uri:
        if not uri.startswith(("https://", "http://")):
            raise SettingsError(f"{name}__tableServiceUri", "must be an http(s) URL")
        return StorageConfig(table_service_uri=uri.rstrip("/"))
    raise SettingsError(name, f"is not set (give a connection string, or {name}__tableServiceUri)")


@dataclass(frozen=True, slots=True)
class BlobStorageConfig:
    """Blob Storage: a connection string, or an endpoint reached with managed identity."""

    connection_string: str | None = field(default=None, repr=False)
    blob_service_uri: str | None = None

    @property
    def uses_identity(self) -> bool:
        return self.connection_string is None


def load_blob_config(env: Mapping[str, str], name: str = CONTENT_LOG_SETTING) -> BlobStorageConfig | None:
    """``<name>`` as a connection string (``UseDevelopmentStorage=true``: Azurite's blob service, which the
    SDK reads itself), else ``<name>__blobServiceUri`` (managed identity); ``None`` when neither is set."""
    connection = env.get(name, "").strip()
    uri = env.get(f"{name}__blobServiceUri", "").strip()
    if connection:
        if "=" not in connection:
            raise SettingsError(name, "is not a storage connection string")
        return BlobStorageConfig(connection_string=connection)
    if uri:
        if not uri.startswith(("https://", "http://")):
            raise SettingsError(f"{name}__blobServiceUri", "must be an http(s) URL")
        return BlobStorageConfig(blob_service_uri=uri.rstrip("/"))
    return None


LEDGER_RETENTION_SETTING = "LEDGER_RETENTION_DAYS"
DEFAULT_LEDGER_RETENTION_DAYS = 14.0


def load_ledger_retention(env: Mapping[str, str]) -> float:
    """``LEDGER_RETENTION_DAYS``: how long ledger rows are kept, the queue's redelivery horizon (default 14)."""
    raw = env.get(LEDGER_RETENTION_SETTING, "").strip()
    if not raw:
        return DEFAULT_LEDGER_RETENTION_DAYS
    try:
        days = float(raw)
    except ValueError:
        raise SettingsError(LEDGER_RETENTION_SETTING, f"must be a number of days, not {raw!r}") from None
    if not 1 <= days <= 3650:  # a day at least: the ledger is what makes redeliveries harmless
        raise SettingsError(LEDGER_RETENTION_SETTING, f"must be from 1 to 3650 days, not {raw!r}")
    return days
