"""Usage from request to table, and quotas enforced on it, through the openai SDK."""

from __future__ import annotations

import time
import uuid
from typing import Any

import openai
import pytest
from azure.core.exceptions import ResourceNotFoundError

from tests.harness import Gateway
from usage import open_table_service
from usage._keys import Limits
from usage._schema import USAGE_TABLE
from usage._tables import as_int

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]


def month_row(gw: Gateway, key_name: str, deployment: str = "gpt-4o") -> dict[str, int] | None:
    async def read() -> dict[str, int] | None:
        async with open_table_service(gw.settings.storage) as service:
            table = service.get_table_client(USAGE_TABLE)
            month = time.strftime("%Y-%m", time.gmtime())
            try:
                entities = [e async for e in table.query_entities(
                    "PartitionKey eq @pk and RowKey eq @rk",
                    parameters={"pk": f"{month}|{key_name}", "rk": f"month|{month}|{deployment}"})]
            except ResourceNotFoundError:  # no usage table yet
                return None
            if not entities:
                return None
            return {name: as_int(entities[0][name]) for name in ("Requests", "TotalTokens", "EstimatedTokens")}

    return gw.loop.run(read())


def wait_for_row(gw: Gateway, key_name: str, requests: int, timeout: float = 15.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = month_row(gw, key_name)
        if row is not None and row["Requests"] >= requests:
            return row
        time.sleep(0.1)
    raise AssertionError(f"usage of {key_name} did not reach {requests} request(s): {month_row(gw, key_name)}")


def test_requests_land_in_the_usage_table_exactly(gateway: Gateway) -> None:
    """What the backend reported is what the tables hold, for streamed and plain requests."""
    name = f"team-{uuid.uuid4().hex[:8]}"
    key = gateway.create_key(name)
    client = openai.AzureOpenAI(azure_endpoint=gateway.url, api_key=key, api_version="2024-10-21")
    list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    records = gateway.sink.wait(2)
    row = wait_for_row(gateway, name, 2)
    assert row["TotalTokens"] == sum(r.total_tokens for r in records)
    assert row["EstimatedTokens"] == 0


def test_key_over_its_quota_gets_rate_limit_error(gateway: Gateway) -> None:
    """A key over its daily quota gets openai.RateLimitError with Retry-After; others are unaffected."""
    name = f"team-{uuid.uuid4().hex[:8]}"
    key = gateway.create_key(name, Limits(tokens_per_day=100))
    client = openai.AzureOpenAI(azure_endpoint=gateway.url, api_key=key, api_version="2024-10-21", max_retries=0)
    remaining: list[int] = []
    with pytest.raises(openai.RateLimitError) as caught:
        for _ in range(10):
            raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
            remaining.append(int(raw.headers["x-ratelimit-remaining-tokens"]))
    used = sum(r.total_tokens for r in gateway.sink.records if r.status == 200)
    assert 1 <= len(remaining) <= 3 and remaining == sorted(remaining, reverse=True)
    assert used <= 100 + gateway.sink.records[0].total_tokens  # overshoot at most one request's worth
    headers = caught.value.response.headers
    assert 0 < int(headers["retry-after"]) <= 86400 and int(headers["retry-after-ms"]) > 0
    assert int(headers["x-ratelimit-remaining-tokens"]) < 100
    assert caught.value.response.json()["error"]["code"] == "429"
    assert len(gateway.eastus.received) == len(remaining)  # the refused request never left the gateway
    other = openai.AzureOpenAI(azure_endpoint=gateway.url, api_key=gateway.key, api_version="2024-10-21")
    assert other.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices


def test_max_tokens_is_reserved_at_admission(gateway: Gateway) -> None:
    """max_tokens counts at admission: what cannot fit now is 429, what can never fit is 400."""
    key = gateway.create_key(f"team-{uuid.uuid4().hex[:8]}", Limits(tokens_per_minute=500))
    client = openai.AzureOpenAI(azure_endpoint=gateway.url, api_key=key, api_version="2024-10-21", max_retries=0)
    assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=100).choices
    used = gateway.sink.wait(1)[0].total_tokens
    with pytest.raises(openai.RateLimitError):  # what it used plus this reservation passes 500
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=500 - used)
    assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=400 - used).choices
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=1000)
    assert caught.value.response.json()["error"]["code"] == "QuotaTooSmall"
    assert len(gateway.eastus.received) == 2
