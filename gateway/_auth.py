"""Client authentication: the subscription key from the request, checked against the key store.

A key's answer is kept per instance. Known keys are re-checked in the background, never on the
request path, and keep being served while Table Storage cannot be reached (up to a limit); a key
the instance has not seen waits for its lookup at most a few seconds, then gets a 503.

A key's expiry (and the end of a rotated-out key's grace period) is compared with the wall clock on
every request, cached answer or not; its scope (the deployments it may call) is checked by
``check_scope`` once the request's deployment is known.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

from gateway._exceptions import Forbidden, KeyStoreUnavailable, Unauthorized
from usage import STORAGE_ERRORS, KeyRecord, hash_key

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


#: After a failed background refresh, the next one waits this long: a busy key is not retried per request.
REFRESH_RETRY_SECONDS = 5.0
#: ``Retry-After`` of a 503 when the key could not be checked.
RETRY_AFTER_SECONDS = 5.0


def _ended(record: KeyRecord, ends: datetime) -> str:
    moment = ends.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if record.replaced_until is not None and ends == record.replaced_until:
        return (f"Access denied: the subscription key expired at {moment}, the end of its grace period after "
                "it was rotated. Use the new key.")
    return f"Access denied: the subscription key expired at {moment}. Ask for a new key."


def check_scope(record: KeyRecord, deployment: str, *, response_id: str | None = None) -> None:
    """``Forbidden`` unless the key may call ``deployment`` (the name the gateway routes with, as it routes it).

    For a call on a stored response (``response_id``), ``deployment`` is the one that made it; a scoped key
    is refused one the gateway cannot tell (``"-"`` or empty): it may touch only what its deployments made.
    """
    if record.allows(deployment):
        return
    if response_id is not None and record.deployments is not None and deployment in ("", "-"):
        raise Forbidden(f"The deployment that made response '{response_id}' is not known to the gateway, and this "
                        "key may only use some deployments.", code="DeploymentNotAllowed")
    what = f"Response '{response_id}' was made with deployment" if response_id is not None else "Deployment"
    raise Forbidden(f"{what} '{deployment}', which this key is not allowed to use.", code="DeploymentNotAllowed")


class KeyLookup(Protocol):
    """Where keys are looked up: ``usage.KeyStore``, or a test's stand-in."""

    async def lookup_hash(self, digest: str) -> KeyRecord | None: ...


@dataclass(slots=True)
class _Entry:
    record: KeyRecord | None  # None: the store said the key does not exist
    checked: float  # clock time of the store's answer
    retry_at: float = -math.inf  # no background refresh before this (set when one fails)


#: how many "no such key" answers are remembered (each is a hash and a time: about 150 bytes)
MAX_UNKNOWN = 10_000


class KeyCache:
    """Looks keys up in the store and keeps the answers, keyed by the key's hash (no subscription
    key is kept in clear longer than the request that carried it).

    An answer younger than ``ttl`` is used as is. A known key's answer older than that, but younger
    than ``stale``, is still used, while one background refresh re-checks it: keys in use never wait
    for the store, and keep working through an outage of up to ``stale`` seconds. Anything else (a
    key not seen, a "no such key" answer older than ``ttl``, an answer older than ``stale``) is looked
    up on the request path, waiting at most ``timeout`` seconds before ``KeyStoreUnavailable`` (503).
    Lookups of one key share one task, bounded by ``timeout`` too: a caller that gives up or goes
    away leaves it running for the others.
    """

    def __init__(
        self,
        store: KeyLookup,
        *,
        ttl: float,
        stale: float,
        timeout: float,
        clock: Callable[[], float],
        secret: bytes = b"",
        previous_secret: bytes = b"",
        rehash: Callable[[str, str], Coroutine[Any, Any, bool]] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._wall_clock = wall_clock  # a key's expiry is compared with it on every request, cached or not
        self._store = store
        self._previous = previous_secret
        self._rehash = rehash
        self._rehashing: dict[str, asyncio.Task[bool]] = {}
        self._ttl = ttl
        self._stale = stale
        self._timeout = timeout
        self._clock = clock
        self._secret = secret
        self._entries: dict[str, _Entry] = {}  # keys the store knows: as many as it holds
        #: "no such key" answers, oldest first, at most ``MAX_UNKNOWN``: random keys cannot crowd out known ones
        self._unknown: OrderedDict[str, float] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[KeyRecord | None]] = {}

    async def authenticate(self, key: str | None) -> KeyRecord:
        """The enabled key's record; ``Unauthorized`` for a missing, unknown, revoked or expired key,
        ``KeyStoreUnavailable`` when the store could not tell in time."""
        if not key:
            raise Unauthorized(
                "Access denied due to missing subscription key. Make sure to include the key "
                "in the api-key header (or Authorization: Bearer) when making requests."
            )
        digest = hash_key(key, self._secret)
        entry = self._cached(digest)
        record = entry.record if entry is not None else await self._wait(digest)
        if record is None and self._previous:
            record = await self._under_previous(key, digest)
        if record is None or not record.enabled:
            raise Unauthorized(
                "Access denied due to invalid subscription key. Make sure to provide a valid key "
                "for an active subscription."
            )
        ends = record.ends_at
        if ends is not None and self._wall_clock() >= ends.timestamp():
            raise Unauthorized(_ended(record, ends))
        return record

    async def _under_previous(self, key: str, digest: str) -> KeyRecord | None:
        """During a ``KEY_HASH_SECRET`` rotation: the key's record under the previous secret; an enabled key found
        there is moved to the current secret's hash in the background (once), and served meanwhile."""
        old = hash_key(key, self._previous)
        entry = self._cached(old)
        record = entry.record if entry is not None else await self._wait(old)
        if record is not None and record.enabled and self._rehash is not None and old not in self._rehashing:
            task = asyncio.create_task(self._rehash(old, digest), name="key rehash")
            self._rehashing[old] = task
            task.add_done_callback(partial(self._rehashed, old, digest, record))
        return record

    def _rehashed(self, old: str, digest: str, record: KeyRecord, task: asyncio.Task[bool]) -> None:
        del self._rehashing[old]
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.warning("moving a key to the current KEY_HASH_SECRET failed: %s", type(error).__name__)
        elif task.result():
            self._entries[digest] = _Entry(record, self._clock())  # found under the new hash from now on
            log.info("key %s moved to the current KEY_HASH_SECRET", record.name)

    def _cached(self, digest: str) -> _Entry | None:
        """The entry to answer from (refreshing it in the background when it is stale), if any."""
        entry = self._entries.get(digest)
        if entry is None:
            checked = self._unknown.get(digest)
            if checked is not None and self._clock() - checked < self._ttl:
                return _Entry(None, checked)
            return None
        now = self._clock()
        age = now - entry.checked
        if age < self._ttl:
            return entry
        if entry.record is None or age >= self._stale:
            return None
        if now >= entry.retry_at:
            self._lookup(digest)
        return entry

    async def _wait(self, digest: str) -> KeyRecord | None:
        """The store's answer, waiting at most ``timeout`` seconds for it."""
        try:
            async with asyncio.timeout(self._timeout):
                return await asyncio.shield(self._lookup(digest))
        except STORAGE_ERRORS as exc:
            raise KeyStoreUnavailable(retry_after=RETRY_AFTER_SECONDS) from exc

    def _lookup(self, digest: str) -> asyncio.Task[KeyRecord | None]:
        """The running lookup of ``digest``, started if there is none."""
        task = self._inflight.get(digest)
        if task is None:
            task = asyncio.create_task(self._fetch(digest), name="key lookup")
            self._inflight[digest] = task
            task.add_done_callback(partial(self._settled, digest))
        return task

    async def _fetch(self, digest: str) -> KeyRecord | None:
        async with asyncio.timeout(self._timeout):
            record = await self._store.lookup_hash(digest)
        now = self._clock()
        if record is None:
            self._entries.pop(digest, None)  # deleted from the store
            self._unknown[digest] = now
            self._unknown.move_to_end(digest)
            while len(self._unknown) > MAX_UNKNOWN:
                self._unknown.popitem(last=False)
        else:
            self._unknown.pop(digest, None)
            self._entries[digest] = _Entry(record, now)
        return record

    def _settled(self, digest: str, task: asyncio.Task[KeyRecord | None]) -> None:
        del self._inflight[digest]
        if task.cancelled():
            return
        error = task.exception()  # marks it retrieved: a background refresh may have no waiter
        if error is None:
            return
        entry = self._entries.get(digest)
        if entry is not None:
            entry.retry_at = self._clock() + REFRESH_RETRY_SECONDS
        if isinstance(error, STORAGE_ERRORS):
            log.warning("key lookup failed: %s", type(error).__name__)
        else:
            log.error("key lookup failed inside the gateway", exc_info=error)

    async def close(self) -> None:
        """Cancel the lookups still running (at shutdown)."""
        tasks = [*self._inflight.values(), *self._rehashing.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
