"""Quotas shared by several gateway processes on one Table Storage: the bound, request-rate limits and their
headers, failing closed, and the Table operations a busy key costs."""

from __future__ import annotations

import io
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import openai
import pytest
from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import TableServiceClient

from gateway._budget import BUDGET_ROW, BUDGET_TABLE, window_end
from gateway._quota import RECHECK_SECONDS
from tests.fakes import CLOCK_START
from tests.harness import Gateway, eventually, http, running_gateway
from tests.storage_proxy import gateway_behind
from usage._keys import Limits
from usage._prices import parse_prices
from usage._tables import as_int

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
BACKEND_TOKENS, BACKEND_REQUESTS = "99000", "999"  # what the simulated regions say of themselves


@contextmanager
def two_gateways(storage: str, **overrides: Any) -> Iterator[tuple[Gateway, Gateway]]:
    with running_gateway(storage, **overrides) as first, running_gateway(storage, **overrides) as second:
        yield first, second


def client_for(gw: Gateway, key: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(azure_endpoint=gw.url, api_key=key, api_version="2024-10-21", max_retries=0,
                              timeout=15.0)


def own_headers(headers: Any) -> tuple[int, int]:
    """The key's x-ratelimit-remaining-tokens and -requests: once each, never the backend's."""
    tokens = headers.get_list("x-ratelimit-remaining-tokens")
    requests = headers.get_list("x-ratelimit-remaining-requests")
    assert len(tokens) == 1 and len(requests) == 1, (tokens, requests)
    assert tokens != [BACKEND_TOKENS] and requests != [BACKEND_REQUESTS]
    return int(tokens[0]), int(requests[0])


def at_a_minute_start(gw: Gateway) -> None:
    """Move the worker's clocks to just after a UTC minute begins, so that a test's requests share one minute."""
    wall = time.time() + (gw.clock() - CLOCK_START)
    gw.clock.advance(60 - wall % 60 + 0.5)


def budget_row(storage: str, name: str) -> dict[str, Any]:
    with TableServiceClient.from_connection_string(storage) as service:
        return dict(service.get_table_client(BUDGET_TABLE).get_entity(name, BUDGET_ROW))


def test_two_gateways_admit_one_quota_between_them(storage: str) -> None:
    """Two gateway processes sharing a key of 1,500 tokens a day admit at most 1,500 reserved tokens between them,
    and nearly all of it; every answer (stream, body, refusal) carries the key's own remaining figures."""
    with two_gateways(storage) as (east, west):
        name = f"team-{uuid.uuid4().hex[:8]}"
        key = east.create_key(name, Limits(tokens_per_day=1500, requests_per_minute=10_000))
        clients = [client_for(east, key), client_for(west, key)]
        admitted, refusals = 0, 0
        remaining: list[int] = []
        for n in range(80):
            client = clients[n % 2]
            try:
                if n % 4 < 2:
                    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES,
                                                                           max_tokens=20)
                    assert raw.parse().choices
                    headers = raw.headers
                else:
                    streamed = client.chat.completions.with_raw_response.create(
                        model="gpt-4o", messages=MESSAGES, max_tokens=20, stream=True)
                    assert list(streamed.parse())
                    headers = streamed.headers
                admitted += 1
                remaining.append(own_headers(headers)[0])
            except openai.RateLimitError as exc:
                refusals += 1
                tokens, _ = own_headers(exc.response.headers)
                assert tokens < 1500
                assert 0 < int(exc.response.headers["retry-after"]) <= 86400
                assert exc.response.json()["error"]["code"] == "429"
        reservation = 8 + 20  # the prompt estimate of MESSAGES plus max_tokens
        used = sum(r.total_tokens for gw in (east, west) for r in gw.sink.records if r.status == 200)
        # the region bills a longer prompt than the estimate: what it used beyond the reservations is taken too
        assert 1500 - 4 * reservation <= used <= 1500 * 1.05 + reservation, (used, admitted)
        assert refusals == 80 - admitted > 0
        assert remaining[-1] < 1500 // 2
        row = budget_row(storage, name)
        assert as_int(row["TokensDayGranted"]) <= 1500 * 1.05 + reservation


def test_request_rate_limit_from_the_cli(storage: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """keys create --requests-per-minute R: two gateways admit at most R requests a minute between them, then 429
    with Retry-After and x-ratelimit-remaining-requests 0; set-quota none lifts it."""
    from usage._cli import main

    def cli(*argv: str) -> str:
        out = io.StringIO()
        assert main(list(argv), out=out) == 0
        return out.getvalue()

    monkeypatch.setenv("UsageStorage", storage)
    monkeypatch.setenv("KEY_HASH_SECRET", "test-secret")  # the harness's
    name = f"rate-{uuid.uuid4().hex[:8]}"
    created = json.loads(cli("keys", "create", "--name", name, "--tokens-per-minute", "100000",
                             "--requests-per-minute", "6", "--json"))
    assert created["requests_per_minute"] == 6 and created["tokens_per_minute"] == 100000
    listed = {row["name"]: row for row in json.loads(cli("keys", "list", "--json"))}
    assert listed[name]["requests_per_minute"] == 6
    assert "6 requests/min" in cli("keys", "list")
    with two_gateways(storage) as (east, west):
        clients = [client_for(east, created["key"]), client_for(west, created["key"])]
        refused: list[openai.RateLimitError] = []
        for n in range(16):
            try:
                clients[n % 2].chat.completions.create(model="gpt-4o", messages=MESSAGES)
            except openai.RateLimitError as exc:
                refused.append(exc)
        per_minute = Counter(r.time[:16] for gw in (east, west) for r in gw.sink.records if r.status == 200)
        assert per_minute and max(per_minute.values()) <= 6  # a minute may have begun during the test
        assert len(refused) >= 16 - 2 * 6
        headers = refused[-1].response.headers
        assert headers["x-ratelimit-remaining-requests"] == "0" and 0 < int(headers["retry-after"]) <= 60
        assert "requests per minute" in refused[-1].response.json()["error"]["message"]
        cli("keys", "set-quota", name, "--requests-per-minute", "none")
    assert {row["name"]: row for row in json.loads(cli("keys", "list", "--json"))}[name]["requests_per_minute"] \
        is None



@pytest.mark.parametrize("fault", ["hang", "refuse"])
def test_quota_fails_closed_when_asked(storage: str, fault: str) -> None:
    """QUOTA_FAIL_CLOSED=true: with Table Storage unreachable, a request the instance's slice cannot cover gets 503
    with Retry-After and an AOAI-shaped error (the slice already leased is still served)."""
    with gateway_behind(storage, quota_fail_closed=True) as (gw, proxy):
        client = client_for(gw, gw.create_key(f"team-{uuid.uuid4().hex[:8]}", Limits(tokens_per_day=100_000)))
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        getattr(proxy, fault)()
        served = 0
        with pytest.raises(openai.APIStatusError) as caught:
            for _ in range(40):
                client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
                served += 1
        assert caught.value.status_code == 503, caught.value.response.text
        assert caught.value.response.json()["error"]["code"] == "QuotaUnavailable"
        assert int(caught.value.response.headers["retry-after"]) >= 1
        assert served >= 1  # from the slice leased before


def test_a_busy_key_costs_few_table_operations(storage: str) -> None:
    """At 40 requests a second (the worker's clock), a key with quotas costs at most 0.2 Table operations per
    admitted request: budget leases and usage reads, counted at the storage proxy."""
    with gateway_behind(storage) as (gw, proxy):
        client = client_for(gw, gw.create_key(f"team-{uuid.uuid4().hex[:8]}",
                                              Limits(tokens_per_minute=10_000_000, tokens_per_day=100_000_000,
                                                     requests_per_minute=100_000)))
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=20)
        before = len(proxy.operations)
        for _ in range(200):
            gw.clock.advance(0.025)
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=20)
        quota_calls = [op.target for op in proxy.operations[before:] if op.table == BUDGET_TABLE
                       or (op.table == "usage" and op.method == "GET" and "select" in op.target)]
        assert len(quota_calls) / 200 <= 0.2, quota_calls


PRICES = parse_prices(json.dumps({"gpt-4o": {"currency": "USD", "input": 2.5, "cached_input": 1.25, "output": 10}}))


def next_month_in_seconds() -> float:
    now = datetime.now(UTC)
    return (window_end("month", now) - now).total_seconds()


def test_monthly_budget_in_money(storage: str) -> None:
    """keys set-quota --budget-per-month: two gateways admit requests priced at the deployment's output rate until the
    month's budget is spent (overshoot at most one request's cost per instance), then 429 until next month with a
    message saying so; warnings name the key and its budget at 80% and 100%."""
    with two_gateways(storage, prices=PRICES) as (east, west):
        name = f"team-{uuid.uuid4().hex[:8]}"
        key = east.create_key(name, Limits(budget_nano_per_month=2_000_000))  # 0.002 USD
        clients = [client_for(east, key), client_for(west, key)]
        refused: list[openai.RateLimitError] = []
        for n in range(40):
            try:
                clients[n % 2].chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=20)
            except openai.RateLimitError as exc:
                refused.append(exc)
        price = PRICES.lookup("gpt-4o", None, datetime.now(UTC))
        assert price is not None
        records = [r for gw in (east, west) for r in gw.sink.wait(20) if r.status == 200]
        spent = sum(price.cost_nano(r.prompt_tokens, r.cached_tokens, r.completion_tokens) for r in records)
        one_request = (8 + 20) * price.output  # a reservation: the prompt estimate and max_tokens at the output rate
        assert 2_000_000 - 2 * one_request <= spent <= 2_000_000 + 2 * one_request, (spent, len(records))
        assert len(refused) == 40 - len(records) > 0
        error = refused[-1].response
        assert "monthly budget" in error.json()["error"]["message"] and "spent" in error.json()["error"]["message"]
        assert abs(int(error.headers["retry-after"]) - next_month_in_seconds()) < 120
        # each instance knows its own spending at once and the other's once counted: 80% is logged, by what was
        # really spent (here past 100%), and 100% once an instance reads the month's cost with its next lease
        assert spent >= 2_000_000
        assert any(name in line and "budget" in line and "80%" in line for gw in (east, west) for line in gw.logs.lines)
        eventually(lambda: month_cost(storage, name) >= 2_000_000)
        for gw, client in zip((east, west), clients, strict=True):
            gw.clock.advance(RECHECK_SECONDS + 5)  # past the refused key's re-read and QUOTA_CACHE_SECONDS
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=20)
        eventually(lambda: sum(name in line and "budget" in line and "100%" in line
                               for gw in (east, west) for line in gw.logs.lines) >= 1)


def counted(storage: str, name: str, period: str, column: str) -> int:
    """The key's ``column`` summed over its ``period`` rows of this month in the usage table (0 before anything
    is counted)."""
    with TableServiceClient.from_connection_string(storage) as service:
        rows = service.get_table_client("usage").query_entities(
            "PartitionKey eq @pk", parameters={"pk": f"{datetime.now(UTC):%Y-%m}|{name}"})
        try:
            return sum(as_int(r.get(column)) for r in rows if str(r["RowKey"]).startswith(f"{period}|"))
        except ResourceNotFoundError:  # not aggregated yet: no usage table
            return 0


def month_cost(storage: str, name: str) -> int:
    """The key's cost this month as counted in the usage table."""
    return counted(storage, name, "month", "CostNano")


def test_money_spent_before_the_budget_counts(storage: str) -> None:
    """The month's cost counted in the usage table (CostNano) before a budget was set counts against it: with a budget
    below what was already spent, another instance refuses the key's first request."""
    with running_gateway(storage, prices=PRICES) as gw:
        name = f"team-{uuid.uuid4().hex[:8]}"
        key = gw.create_key(name)
        client = client_for(gw, key)
        for _ in range(4):
            client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=20)

        eventually(lambda: month_cost(storage, name) > 0)
        spent = month_cost(storage, name)

        async def lower_budget() -> None:
            from usage import KeyStore, open_table_service

            async with open_table_service(gw.settings.storage) as service:
                await KeyStore(service, secret=gw.settings.key_hash_secret).set_limits(
                    name, Limits(budget_nano_per_month=spent - 1))

        gw.loop.run(lower_budget())
        with running_gateway(storage, prices=PRICES) as other:  # a new instance: the budget row has no cost yet
            with pytest.raises(openai.RateLimitError) as caught:
                client_for(other, key).chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=20)
            assert "monthly budget" in caught.value.response.json()["error"]["message"]


def test_every_answer_of_a_key_with_limits_carries_its_own_remaining(gateway: Gateway) -> None:
    """Successes, refusals before admission (a bad body, a request too big for the quota) and the models list carry
    the key's own x-ratelimit-remaining-*; a key without limits keeps the backend's and costs no budget row."""
    name = f"team-{uuid.uuid4().hex[:8]}"
    key = gateway.create_key(name, Limits(tokens_per_minute=1000, requests_per_minute=100))
    client = client_for(gateway, key)
    at_a_minute_start(gateway)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, max_tokens=20)
    tokens, requests = own_headers(raw.headers)
    assert tokens <= 1000 - 28 and requests == 99
    chat = gateway.url + "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    headers = {"api-key": key, "content-type": "application/json"}
    bad = http("POST", chat, headers=headers, body=b"{not json")
    too_big = http("POST", chat, headers=headers, body=json.dumps({"messages": MESSAGES, "max_tokens": 5000}).encode())
    for refused in (bad, too_big):
        assert refused.status == 400, refused.text
        assert refused.headers["x-ratelimit-remaining-requests"] == "99"
        assert 0 < int(refused.headers["x-ratelimit-remaining-tokens"]) <= tokens  # settled since: 35 used
    assert too_big.json()["error"]["code"] == "QuotaTooSmall"
    models = http("GET", gateway.url + "/openai/v1/models", headers={"api-key": key})
    assert models.status == 200 and models.headers["x-ratelimit-remaining-requests"] == "99"
    free = client_for(gateway, gateway.key).chat.completions.with_raw_response.create(model="gpt-4o",
                                                                                      messages=MESSAGES)
    assert free.headers.get_list("x-ratelimit-remaining-tokens") == [BACKEND_TOKENS]
    free_name = next(r.key_name for r in gateway.sink.wait(4)
                     if r.request_id == free.headers["x-gateway-request-id"])
    with TableServiceClient.from_connection_string(gateway.settings.storage.connection_string or "") as service:
        rows = list(service.get_table_client(BUDGET_TABLE).query_entities(
            "PartitionKey eq @k", parameters={"k": free_name}))
    assert rows == []


def test_budget_flags_of_the_keys_cli(storage: str, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    """--budget-per-month on create and set-quota (an amount in currency units, 'none' removes it), shown by list;
    a bad amount is refused by the parser, naming the problem."""
    from usage._cli import main

    monkeypatch.setenv("UsageStorage", storage)
    name = f"money-{uuid.uuid4().hex[:8]}"
    out = io.StringIO()
    assert main(["keys", "create", "--name", name, "--budget-per-month", "250.5", "--json"], out=out) == 0
    assert json.loads(out.getvalue())["budget_per_month"] == "250.50"

    def listed() -> dict[str, Any]:
        out = io.StringIO()
        assert main(["keys", "list", "--json"], out=out) == 0
        rows: dict[str, dict[str, Any]] = {row["name"]: row for row in json.loads(out.getvalue())}
        return rows[name]

    assert main(["keys", "set-quota", name, "--budget-per-month", "0.000000001"], out=io.StringIO()) == 0
    assert listed()["budget_per_month"] == "0.000000001"
    text = io.StringIO()
    assert main(["keys", "list"], out=text) == 0
    assert "budget 0.000000001/month" in text.getvalue()
    assert main(["keys", "set-quota", name, "--budget-per-month", "none"], out=io.StringIO()) == 0
    assert listed()["budget_per_month"] is None
    for bad in ("-1", "1.0000000001", "ten"):
        with pytest.raises(SystemExit) as exited:
            main(["keys", "set-quota", name, "--budget-per-month", bad], out=io.StringIO())
        assert exited.value.code == 2
        assert "--budget-per-month" in capsys.readouterr().err


def test_money_reservations_hold_whatever_the_rates(storage: str) -> None:
    """A reservation is priced at the highest rate that can apply, so a budget holds for a deployment whose output
    costs 0 (embeddings: only input is billed) and for a backend override above the deployment's base rates, even
    with requests arriving together: spending passes the budget by at most one request."""
    prices = parse_prices(json.dumps({
        "embed": {"currency": "USD", "input": "100000", "cached_input": "0", "output": "0"},
        "gpt-4o": {"currency": "USD", "input": 1, "cached_input": 1, "output": 1,
                   "backends": {"eastus": {"input": 1, "cached_input": 1, "output": 100000},
                                "westus": {"input": 1, "cached_input": 1, "output": 100000}}},
    }))
    with running_gateway(storage, prices=prices) as gw:
        embedder = client_for(gw, gw.create_key(f"embed-{uuid.uuid4().hex[:8]}",
                                                Limits(budget_nano_per_month=300_000_000)))  # 0.30 USD
        served, refused = 0, []
        for _ in range(12):
            try:
                assert embedder.embeddings.create(model="embed", input="abc").data
                served += 1
            except openai.RateLimitError as exc:
                refused.append(exc)
        one_embedding = 8 * 100_000_000  # the region bills 8 prompt tokens: 0.80 USD
        assert served == 1 and len(refused) == 11  # 0.30 was not spent before the first; 0.80 was after it
        assert "monthly budget" in refused[-1].response.json()["error"]["message"]
        assert served * one_embedding <= 300_000_000 + one_embedding

        name = f"ptu-{uuid.uuid4().hex[:8]}"
        chat = client_for(gw, gw.create_key(name, Limits(budget_nano_per_month=3_000_000_000)))  # 3 USD

        def ask() -> bool:
            try:
                chat.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=20)
                return True
            except openai.RateLimitError:
                return False

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: ask(), range(8)))
        records = [r for r in gw.sink.wait(20) if r.key_name == name and r.status == 200]
        assert len(records) == sum(answers) >= 1
        spent = sum(r.prompt_tokens * 1000 + r.completion_tokens * 100_000_000 for r in records)
        one_request = max(r.prompt_tokens * 1000 + r.completion_tokens * 100_000_000 for r in records)
        assert spent <= 3_000_000_000 + one_request, (spent, len(records))


@pytest.mark.parametrize("limits", [
    Limits(requests_per_minute=100), Limits(tokens_per_minute=1000), Limits(budget_nano_per_month=10**9)],
    ids=["requests only", "tokens only", "budget only"])
def test_a_key_limiting_one_meter_gets_both_headers_of_its_own(gateway: Gateway, limits: Limits) -> None:
    """A key with any limit gets x-ratelimit-remaining-tokens and -requests, its own (never the backend's), on every
    answer: a body, a stream, the gateway's refusals, the models list and a call on a stored response."""
    key = gateway.create_key(f"one-{uuid.uuid4().hex[:8]}", limits)
    client = client_for(gateway, key)
    at_a_minute_start(gateway)
    answers: list[Any] = [client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES,
                                                                           max_tokens=20)]
    answers.append(client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES, max_tokens=20,
                                                                    stream=True))
    v1 = openai.OpenAI(base_url=gateway.url + "/openai/v1", api_key=key, max_retries=0)
    created = v1.responses.create(model="gpt-4o", input="hi", max_output_tokens=20)
    answers.append(v1.responses.with_raw_response.retrieve(created.id))
    figures = [own_headers(answer.headers) for answer in answers]
    tokens, requests = figures[-1]
    assert tokens > 0 and requests > 0
    if limits.requests_per_minute is not None:
        assert [r for _, r in figures] == [99, 98, 97]  # the stored call uses no request
    if limits.tokens_per_minute is not None:
        assert tokens < 1000 - 2 * 28
    chat = gateway.url + "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    headers = {"api-key": key, "content-type": "application/json"}
    refusals = [http("POST", chat, headers=headers, body=b"{not json"),
                http("POST", chat, headers=headers, body=json.dumps({"messages": MESSAGES,
                                                                      "max_tokens": 5000}).encode())]
    assert refusals[0].status == 400
    assert refusals[1].status == (400 if limits.tokens_per_minute is not None else 200)  # QuotaTooSmall
    models = http("GET", gateway.url + "/openai/v1/models", headers={"api-key": key})
    assert models.status == 200
    for answer in (*refusals, models):
        tokens_left, requests_left = (answer.headers.get("x-ratelimit-remaining-tokens"),
                                      answer.headers.get("x-ratelimit-remaining-requests"))
        assert tokens_left is not None and requests_left is not None, (answer.status, answer.headers)
        assert tokens_left != BACKEND_TOKENS and requests_left != BACKEND_REQUESTS
        assert int(tokens_left) >= 0 and int(requests_left) >= 0


def test_a_request_larger_than_the_budget_left_is_served_while_it_is_not_spent(storage: str) -> None:
    """A budget of 1 USD with nothing spent serves a request whose reservation (100,000 tokens at 10 USD a million)
    is larger than all of it, and the next one too (it cost far less), without a warning of a spent budget."""
    with running_gateway(storage, prices=PRICES) as gw:
        name = f"big-{uuid.uuid4().hex[:8]}"
        client = client_for(gw, gw.create_key(name, Limits(budget_nano_per_month=1_000_000_000)))
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=100_000)
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=10)
        assert not any(name in line and "budget" in line for line in gw.logs.lines)


def minute_requests(storage: str, name: str) -> int:
    """The key's requests in its minute rows of the usage table, refusals included."""
    return counted(storage, name, "minute", "Requests")


def test_refused_requests_do_not_use_up_the_request_rate(gateway: Gateway) -> None:
    """Answers the gateway refuses before admitting (403 out of scope) are counted in the usage table, but not
    against requests_per_minute: once they are counted, the key still gets its R requests in that minute."""
    name = f"rate-{uuid.uuid4().hex[:8]}"
    client = client_for(gateway, gateway.create_key(name, Limits(requests_per_minute=3),
                                                    deployments=frozenset({"gpt-4o"})))
    at_a_minute_start(gateway)
    for _ in range(4):
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    eventually(lambda: minute_requests(storage_of(gateway), name) >= 4)
    for _ in range(3):
        assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices
    with pytest.raises(openai.RateLimitError):
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)


def storage_of(gw: Gateway) -> str:
    connection_string = gw.settings.storage.connection_string
    assert connection_string is not None
    return connection_string
