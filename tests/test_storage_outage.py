"""Table Storage hung or refusing: keys and quotas answer within bounds, through the openai SDK."""

from __future__ import annotations

import time
import uuid
from typing import Any

import openai
import pytest

from tests.harness import Gateway
from tests.storage_proxy import gateway_behind
from usage._keys import Limits

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]
FAULTS = ["hang", "refuse"]



def client_for(gw: Gateway, key: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(azure_endpoint=gw.url, api_key=key, api_version="2024-10-21", max_retries=0,
                              timeout=15.0)


def timed_chat(client: openai.AzureOpenAI) -> tuple[float, dict[str, str]]:
    """Seconds one chat completion took, and its response headers."""
    started = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert raw.parse().choices
    return time.monotonic() - started, dict(raw.headers)


def timed_refusal(client: openai.AzureOpenAI) -> tuple[float, openai.APIStatusError]:
    """Seconds until the gateway refused a chat completion, and the error."""
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    return time.monotonic() - started, caught.value


def assert_key_store_unavailable(error: openai.APIStatusError) -> None:
    assert error.status_code == 503
    assert error.response.json()["error"]["code"] == "KeyStoreUnavailable"
    assert error.response.json()["error"]["message"]
    assert int(error.response.headers["retry-after"]) >= 1


@pytest.mark.parametrize("fault", FAULTS)
def test_new_key_gets_503_with_retry_after_while_storage_is_down(storage: str, fault: str) -> None:
    """A key the gateway has not seen gets 503 KeyStoreUnavailable within KEY_LOOKUP_TIMEOUT_SECONDS."""
    with gateway_behind(storage) as (gw, proxy):
        known = client_for(gw, gw.key)
        timed_chat(known)
        new_key = gw.create_key(f"team-{uuid.uuid4().hex[:8]}")
        getattr(proxy, fault)()
        elapsed, error = timed_refusal(client_for(gw, new_key))
        assert_key_store_unavailable(error)
        assert elapsed < gw.settings.key_lookup_timeout + 1.0
        assert timed_chat(known)[0] < 1.0  # and the gateway goes on serving the keys it knows
        proxy.restore()
        assert timed_chat(client_for(gw, new_key))[0] < 1.0


@pytest.mark.parametrize("fault", FAULTS)
def test_known_key_is_served_from_cache_while_storage_is_down(storage: str, fault: str) -> None:
    """Past KEY_CACHE_SECONDS a known key still works: its first request waits for the failing re-check at most
    KEY_LOOKUP_TIMEOUT_SECONDS, the next ones not at all; past KEY_STALE_SECONDS it gets 503."""
    with gateway_behind(storage, key_lookup_timeout=1.0) as (gw, proxy):
        client = client_for(gw, gw.key)
        timed_chat(client)
        getattr(proxy, fault)()
        gw.clock.advance(gw.settings.key_cache_seconds + 1)
        assert timed_chat(client)[0] < gw.settings.key_lookup_timeout + 0.5
        assert max(timed_chat(client)[0] for _ in range(5)) < 0.5
        gw.clock.advance(gw.settings.key_stale_seconds)
        elapsed, error = timed_refusal(client)
        assert_key_store_unavailable(error)
        assert elapsed < gw.settings.key_lookup_timeout + 1.0
        proxy.restore()
        assert timed_chat(client)[0] < 1.0


@pytest.mark.parametrize("fault", FAULTS)
def test_quota_key_does_not_stall_while_storage_is_down(storage: str, fault: str) -> None:
    """Requests of a key with a quota wait at most QUOTA_READ_TIMEOUT_SECONDS; this instance's own
    admissions still count, so the key is refused once they pass its quota."""
    with gateway_behind(storage) as (gw, proxy):
        client = client_for(gw, gw.create_key(f"team-{uuid.uuid4().hex[:8]}", Limits(tokens_per_day=150)))
        timed_chat(client)
        getattr(proxy, fault)()
        waits: list[float] = []
        remaining: list[int] = []
        with pytest.raises(openai.RateLimitError):
            for _ in range(10):
                gw.clock.advance(2.0)  # the usage read from the table expires during the loop
                elapsed, headers = timed_chat(client)
                waits.append(elapsed)
                remaining.append(int(headers["x-ratelimit-remaining-tokens"]))
        assert len(waits) >= 3 and max(waits) < gw.settings.quota_read_timeout + 0.5
        assert sum(wait > gw.settings.quota_read_timeout / 2 for wait in waits) <= 1  # the others did not wait
        assert remaining == sorted(remaining, reverse=True)
