"""Opening Table Storage from a ``StorageConfig``, with the process's one session and credential."""

from __future__ import annotations

from typing import TYPE_CHECKING

from azure.core.pipeline.transport import AioHttpTransport
from azure.data.tables.aio import TableServiceClient

from usage._config import StorageConfig

if TYPE_CHECKING:
    import aiohttp
    from azure.core.credentials_async import AsyncTokenCredential

KEYS_TABLE = "gatewaykeys"


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
