"""The key cache on its own: fresh, stale and unknown answers, through a fake clock (the quota guard's own
unit tests are in test_budget_units.py)."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import UTC, datetime

import pytest
from azure.core.exceptions import AzureError, ServiceRequestError

from gateway import KeyStoreUnavailable, Unauthorized
from gateway._auth import REFRESH_RETRY_SECONDS, KeyCache
from tests.harness import FakeClock
from usage import KeyRecord, hash_key

SECRET = b"unit"
KEY = "gw-unit-test-key"
TTL, STALE = 30.0, 300.0
#: A real bound for what must not hang: a test fails instead of waiting forever.
NO_WAIT = 2.0


class FakeStore:
    """Answers lookups from ``records``; while ``held``, lookups wait; with ``error`` set they raise it."""

    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}
        self.calls = 0
        self.released = asyncio.Event()
        self.released.set()
        self.error: BaseException | None = None

    def add(self, key: str, *, enabled: bool = True) -> None:
        self.records[hash_key(key, SECRET)] = KeyRecord("team-unit", enabled, datetime(2026, 1, 1, tzinfo=UTC))

    def hold(self) -> None:
        self.released.clear()

    async def lookup_hash(self, digest: str) -> KeyRecord | None:
        self.calls += 1
        await self.released.wait()
        if self.error is not None:
            raise self.error
        return self.records.get(digest)


async def settle() -> None:
    """Let background tasks run as far as they can without time passing."""
    for _ in range(10):
        await asyncio.sleep(0)


def key_cache(store: FakeStore, clock: FakeClock, *, timeout: float = NO_WAIT) -> KeyCache:
    return KeyCache(store, ttl=TTL, stale=STALE, timeout=timeout, clock=clock, secret=SECRET)


async def authenticate(cache: KeyCache, key: str = KEY) -> KeyRecord:
    async with asyncio.timeout(NO_WAIT):
        return await cache.authenticate(key)


def assert_unavailable(error: KeyStoreUnavailable) -> None:
    assert error.status == 503 and int(error.headers["Retry-After"]) >= 1
    assert json.loads(error.body())["error"]["code"] == "KeyStoreUnavailable"


async def test_fresh_answer_is_served_without_asking_the_store() -> None:
    """Within KEY_CACHE_SECONDS a key is answered from memory."""
    store, clock = FakeStore(), FakeClock()
    store.add(KEY)
    cache = key_cache(store, clock)
    await authenticate(cache)
    clock.advance(TTL - 1)
    assert (await authenticate(cache)).name == "team-unit"
    assert store.calls == 1


async def test_stale_key_is_served_at_once_and_refreshed_in_the_background() -> None:
    """Past KEY_CACHE_SECONDS the request does not wait; the background refresh's answer is used next."""
    store, clock = FakeStore(), FakeClock()
    store.add(KEY)
    cache = key_cache(store, clock)
    await authenticate(cache)
    store.hold()
    store.add(KEY, enabled=False)  # revoked meanwhile
    clock.advance(TTL + 1)
    assert (await authenticate(cache)).enabled  # answered from memory while the store is held
    assert (await authenticate(cache)).enabled
    await settle()
    assert store.calls == 2  # one refresh for both
    store.released.set()
    await settle()
    with pytest.raises(Unauthorized):
        await authenticate(cache)


async def test_known_key_is_served_through_an_outage_until_key_stale_seconds() -> None:
    """With the store failing, a known key works until KEY_STALE_SECONDS, then gets 503 with its cause."""
    store, clock = FakeStore(), FakeClock()
    store.add(KEY)
    cache = key_cache(store, clock)
    await authenticate(cache)
    store.error = ServiceRequestError("connection refused")
    clock.advance(TTL + 1)
    await authenticate(cache)
    await settle()
    await authenticate(cache)
    assert store.calls == 2  # a failed refresh is not retried at every request
    clock.advance(REFRESH_RETRY_SECONDS)
    await authenticate(cache)
    await settle()
    assert store.calls == 3
    clock.advance(STALE - TTL - REFRESH_RETRY_SECONDS - 2)
    await authenticate(cache)
    clock.advance(2)
    with pytest.raises(KeyStoreUnavailable) as caught:
        await authenticate(cache)
    assert_unavailable(caught.value)
    assert isinstance(caught.value.__cause__, AzureError)


async def test_unknown_key_waits_at_most_the_lookup_timeout() -> None:
    """A key not seen before, with the store hung, gets 503 after the lookup time-out; waiters share one lookup."""
    store, clock = FakeStore(), FakeClock()
    store.hold()
    cache = key_cache(store, clock, timeout=0.05)
    started = time.monotonic()
    results = await asyncio.gather(authenticate(cache), authenticate(cache), return_exceptions=True)
    assert time.monotonic() - started < 1.0
    for result in results:
        assert isinstance(result, KeyStoreUnavailable)
        assert_unavailable(result)
    assert store.calls == 1


async def test_cancelled_caller_does_not_fail_the_others() -> None:
    """A caller that goes away while the lookup runs leaves it running; the other caller gets the key."""
    store, clock = FakeStore(), FakeClock()
    store.add(KEY)
    store.hold()
    cache = key_cache(store, clock)
    first = asyncio.create_task(authenticate(cache))
    second = asyncio.create_task(authenticate(cache))
    await settle()
    first.cancel()
    await settle()
    store.released.set()
    assert (await second).name == "team-unit"
    assert first.cancelled() and store.calls == 1


async def test_unknown_key_answer_is_kept_for_key_cache_seconds_only() -> None:
    """"No such key" is cached like any answer, and then looked up again on the request path."""
    store, clock = FakeStore(), FakeClock()
    cache = key_cache(store, clock)
    with pytest.raises(Unauthorized):
        await authenticate(cache)
    store.add(KEY)  # created after it was first tried
    clock.advance(TTL - 1)
    with pytest.raises(Unauthorized):
        await authenticate(cache)
    clock.advance(1)
    assert (await authenticate(cache)).enabled
    assert store.calls == 2


async def test_random_keys_cannot_evict_a_known_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of unknown keys leaves known keys cached: they still ride out a storage outage."""
    import gateway._auth

    monkeypatch.setattr(gateway._auth, "MAX_UNKNOWN", 50)
    store, clock = FakeStore(), FakeClock()
    store.add(KEY)
    cache = key_cache(store, clock)
    await authenticate(cache)
    for n in range(200):
        with pytest.raises(Unauthorized):
            await authenticate(cache, f"gw-random-{n}")
    store.error = ServiceRequestError("storage is down")
    with pytest.raises(Unauthorized):  # the newest unknown answers are still remembered
        await authenticate(cache, "gw-random-199")
    clock.advance(TTL + 10)
    assert (await authenticate(cache)).name == "team-unit"
