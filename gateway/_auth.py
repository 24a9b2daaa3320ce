"""Client authentication: the subscription key from the request, checked against the key store."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from azure.core.exceptions import AzureError

from gateway._exceptions import Unauthorized, UpstreamFailed
from usage._keys import KeyRecord, KeyStore, hash_key

log = logging.getLogger(__name__)

#: Client headers that can carry a subscription key; none of them is ever sent upstream.
KEY_HEADERS = ("api-key", "authorization", "ocp-apim-subscription-key")


def key_from_headers(headers: Mapping[str, str]) -> str | None:
    """The subscription key from ``api-key``, ``Authorization: Bearer`` or ``Ocp-Apim-Subscription-Key``."""
    key = headers.get("api-key")
    if key:
        return key.strip()
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
    key = headers.get("ocp-apim-subscription-key")
    return key.strip() if key else None


@dataclass(slots=True)
class _Entry:
    record: KeyRecord | None
    expires: float


def _store_unavailable() -> UpstreamFailed:
    return UpstreamFailed(
        "The gateway could not check the subscription key; try again.",
        status=503, code="ServiceUnavailable",
    )


class KeyCache:
    """Looks keys up in the store, keeping answers (known or not) for ``ttl`` seconds.

    Entries are keyed by the key's hash, so no subscription key is kept in clear in memory
    longer than the request that carried it. Concurrent misses for one key share one lookup.
    """

    def __init__(self, store: KeyStore, *, ttl: float, clock: Callable[[], float], secret: bytes = b"") -> None:
        self._store = store
        self._ttl = ttl
        self._clock = clock
        self._secret = secret
        self._entries: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future[KeyRecord | None]] = {}

    async def authenticate(self, key: str | None) -> KeyRecord:
        """The enabled key's record; ``Unauthorized`` for a missing, unknown or revoked key."""
        if not key:
            raise Unauthorized(
                "Access denied due to missing subscription key. Make sure to include the key "
                "in the api-key header (or Authorization: Bearer) when making requests."
            )
        digest = hash_key(key, self._secret)
        entry = self._entries.get(digest)
        if entry is None or entry.expires <= self._clock():
            record = await self._lookup(key, digest)
        else:
            record = entry.record
        if record is None or not record.enabled:
            raise Unauthorized(
                "Access denied due to invalid subscription key. Make sure to provide a valid key "
                "for an active subscription."
            )
        return record

    async def _lookup(self, key: str, digest: str) -> KeyRecord | None:
        pending = self._inflight.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[KeyRecord | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            record = await self._store.lookup(key)
        except BaseException as exc:  # waiters must never hang: they get a 503 whatever happened here
            error = _store_unavailable()
            future.set_exception(error)
            future.exception()  # marked retrieved; each waiter raises it from its own await
            log.warning("key lookup failed: %s", type(exc).__name__)
            if isinstance(exc, AzureError):
                raise error from exc
            raise
        finally:
            del self._inflight[digest]
        future.set_result(record)
        if len(self._entries) > 100_000:
            self._entries.clear()
        self._entries[digest] = _Entry(record, self._clock() + self._ttl)
        return record
