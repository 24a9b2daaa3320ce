"""Table Storage behind a relay a test can make hang or refuse (``devkit.table_proxy``), and a gateway on it."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from devkit.table_proxy import CountingTableProxy as StorageProxy
from devkit.table_proxy import counting_table_proxy as storage_proxy
from tests.harness import Gateway, running_gateway

__all__ = ["StorageProxy", "gateway_behind", "storage_proxy"]


@contextmanager
def gateway_behind(storage: str, **overrides: Any) -> Iterator[tuple[Gateway, StorageProxy]]:
    """A gateway whose Table Storage goes through a ``StorageProxy``; storage is back before shutdown."""
    with storage_proxy(storage) as proxy, running_gateway(proxy.connection_string, **overrides) as gw:
        try:
            yield gw, proxy
        finally:
            proxy.restore()  # so shutdown flushes the usage events at once
