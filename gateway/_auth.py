"""Client authentication: the subscription key from the request, checked against the key store.

A key's answer is kept per instance for ``KEY_CACHE_SECONDS`` and never used older than that while
Table Storage answers: a key in use is re-checked ahead, in the background, and an idle one on its
next request. Known keys keep being served while Table Storage cannot be reached (up to a limit);
a key the instance has not seen waits for its lookup at most a few seconds, then gets a 503.

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
from datetime import datetime
from functools import partial
from typing import Any, Protocol

from gateway._exceptions import Forbidden, KeyStoreUnavailable, Unauthorized
from usage import STORAGE_ERRORS, KeyRecord, hash_key
from usage._keys import iso_moment

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


#: After a failed refresh, the next one waits this long: a busy key is not retried per request.
REFRESH_RETRY_SECONDS = 5.0
#: A key used after this fraction of ``KEY_CACHE_SECONDS`` is re-checked in the background, ahead of its answer
#: becoming too old: a busy key never waits for the store.
REFRESH_AHEAD = 0.8
#: ``Retry-After`` of a 503 when the key could not be checked.
RETRY_AFTER_SECONDS = 5.0


def _ended(record: KeyRecord, ends: datetime) -> str:
    moment = iso_moment(ends)
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
    record: KeyRecord  # the store's answer for a key it holds
    checked: float  # clock time the lookup that gave this answer started
    #: set when a refresh failed: no refresh before this, and meanwhile the answer is served as it is, even
    #: older than ``ttl`` (the store is failing for this key: waiting again would only stall its requests)
    retry_at: float = -math.inf

    @property
    def refresh_failed(self) -> bool:
        return self.retry_at != -math.inf


#: how many "no such key" answers are remembered (each is a hash and a time: about 150 bytes)
MAX_UNKNOWN = 10_000


class KeyCache:
    """Looks keys up in the store and keeps the answers, keyed by the key's hash (no subscription
    key is kept in clear longer than the request that carried it).

    An answer younger than ``ttl`` is used as is; once ``REFRESH_AHEAD`` of ``ttl`` has passed, a request also
    starts one background refresh of it, so a key in use gets its fresh answer before the old one is too old and
    never waits for the store. An answer older than ``ttl`` is not used as is: the request waits (at most
    ``timeout`` seconds) for the refresh. Only if that refresh fails is a known key's answer younger than
    ``stale`` used: keys in use keep working through an outage of up to ``stale`` seconds. After a failed
    refresh, the key's requests are answered from memory without waiting, and refreshed in the background
    every ``REFRESH_RETRY_SECONDS``, until one refresh succeeds. Anything else (a key not seen, a "no such key"
    answer older than ``ttl``, an answer older than ``stale``) gets ``KeyStoreUnavailable`` (503) when its
    lookup fails or takes longer than ``timeout``. Lookups of one key share one task, bounded by ``timeout``
    too: a caller that gives up or goes away leaves it running for the others.
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
        record = await self._answer(digest)
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
        record = await self._answer(old)
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

    async def _answer(self, digest: str) -> KeyRecord | None:
        """The store's answer for ``digest`` (``None``: no such key), from memory when it is recent enough."""
        now = self._clock()
        entry = self._entries.get(digest)
        if entry is None:
            checked = self._unknown.get(digest)
            if checked is not None and now - checked < self._ttl:
                return None
            return await self._wait(digest)
        age = now - entry.checked
        if age < self._ttl or (entry.refresh_failed and age < self._stale):
            if age >= self._ttl * REFRESH_AHEAD and now >= entry.retry_at:
                self._lookup(digest)  # in the background: this request does not wait for it
            return entry.record
        if age >= self._stale:
            return await self._wait(digest)
        try:
            return await self._wait(digest)
        except KeyStoreUnavailable:  # the store failed or is slow: the known key is served from memory
            if self._entries.get(digest) is entry:
                entry.retry_at = max(entry.retry_at, self._clock() + REFRESH_RETRY_SECONDS)
            return entry.record

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
        now = self._clock()  # a change made while the lookup runs may be missed: its answer is as old as its start
        async with asyncio.timeout(self._timeout):
            record = await self._store.lookup_hash(digest)
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
