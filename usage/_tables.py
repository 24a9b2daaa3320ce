"""Opening Table Storage from a ``StorageConfig``, with the process's one session and credential."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import aiohttp
from azure.core.exceptions import AzureError
from azure.core.pipeline.transport import AioHttpTransport
from azure.data.tables import EdmType, EntityProperty
from azure.data.tables.aio import TableServiceClient

from usage._config import StorageConfig

if TYPE_CHECKING:
    from azure.core.credentials_async import AsyncTokenCredential

KEYS_TABLE = "gatewaykeys"
#: What a Table call can raise when storage fails: the SDK's errors, the transport's, time-outs.
STORAGE_ERRORS: tuple[type[Exception], ...] = (AzureError, aiohttp.ClientError, OSError, TimeoutError)


def as_int(value: Any) -> int:
    """A number read from a table, whether the SDK returns it plain or as an ``EntityProperty``."""
    if isinstance(value, EntityProperty):
        value = value.value
    return int(value or 0)


def int64(value: int) -> EntityProperty:
    """``value`` typed Int64, so counters and quotas may pass 2**31 without changing type."""
    return EntityProperty(value, EdmType.INT64)


def bounded(seconds: float) -> dict[str, Any]:
    """Per-call SDK options for a Table request made on behalf of a client request: connect and read
    time-outs of ``seconds`` (the SDK's are 300 s) and one immediate retry, for a pooled connection the
    server had closed (the SDK's default is three, with 0.8 s exponential back-off). The caller still
    bounds the whole call (``asyncio.timeout``): the SDK counts its time-outs per attempt and per read.
    """
    return {"connection_timeout": seconds, "read_timeout": seconds, "retry_total": 1}


def open_table_service(
    config: StorageConfig,
    *,
    credential: AsyncTokenCredential | None = None,
    session: aiohttp.ClientSession | None = None,
) -> TableServiceClient:
    """A ``TableServiceClient`` that reuses ``session`` (not closing it) when one is given."""
    kwargs = {}
    if session is not None:
        kwargs["transport"] = AioHttpTransport(session=session, session_owner=False)
    if config.connection_string is not None:
        return TableServiceClient.from_connection_string(config.connection_string, **kwargs)
    if credential is None:
        raise ValueError("a managed-identity storage connection needs a credential")
    assert config.table_service_uri is not None
    return TableServiceClient(endpoint=config.table_service_uri, credential=credential, **kwargs)
