"""Cost: priced by PRICES when aggregated, counted exactly once with the tokens, shown by report and statement."""

from __future__ import annotations

import json
import logging
import os
import random
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway import SettingsError, load_settings
from tests.harness import PROJECT, eventually, running_gateway
from usage import AggregatorRuntime, StorageConfig, open_table_service
from usage._aggregate import Aggregator
from usage._prices import parse_prices
from usage._report import read_days
from usage._schema import USAGE_TABLE
from usage._statement import statement_rows
from usage._tables import as_int

#: per million tokens; gpt-4o's price changes on the 15th, when its provisioned backend "ptu" costs nothing;
#: embed-eur has a price (in EUR) from the 10th only; o-unpriced has none
PRICES: dict[str, Any] = {
    "gpt-4o": [
        {"currency": "USD", "input": 2.5, "cached_input": 1.25, "output": 10},
        {"currency": "USD", "input": "2.75", "cached_input": "1.375", "output": "11", "effective_from": "2026-11-15",
         "backends": {"ptu": {"input": 0, "cached_input": 0, "output": 0}}},
    ],
    "gpt-4o-mini": {"currency": "USD", "input": "0.15", "cached_input": "0.075", "output": "0.6"},
    "embed-eur": {"currency": "EUR", "input": "0.018", "cached_input": "0.018", "output": 0,
                  "effective_from": "2026-11-10"},
}
DEPLOYMENTS = ("gpt-4o", "gpt-4o", "gpt-4o-mini", "o-unpriced", "embed-eur")
STATEMENT_FIELDS = {"key", "deployment", "requests", "prompt_tokens", "cached_tokens", "completion_tokens",
                    "reasoning_tokens", "total_tokens", "cost", "currency", "unpriced_requests"}


def reference_cost(document: dict[str, Any]) -> tuple[Decimal, str] | None:
    """The event's cost in currency units, worked out here from PRICES as written, with Decimal."""
    when = datetime.fromisoformat(document["time"]).date()
    deployment = document["deployment"]
    if deployment == "gpt-4o":
        entry: dict[str, Any] = PRICES["gpt-4o"][0] if when < date(2026, 11, 15) else PRICES["gpt-4o"][1]
        rates = entry.get("backends", {}).get(document["backend"], entry)
        currency = "USD"
    elif deployment == "gpt-4o-mini":
        rates, currency = PRICES["gpt-4o-mini"], "USD"
    elif deployment == "embed-eur" and when >= date(2026, 11, 10):
        rates, currency = PRICES["embed-eur"], "EUR"
    else:
        return None
    prompt, cached, completion = document["prompt_tokens"], document["cached_tokens"], document["completion_tokens"]
    cost = ((prompt - cached) * Decimal(str(rates["input"])) + cached * Decimal(str(rates["cached_input"]))
            + completion * Decimal(str(rates["output"]))) / 1_000_000
    return cost, currency


def month_events(key: str) -> list[dict[str, Any]]:
    """Five a day over November, on two backends, plus one on each side of the month."""
    documents = []
    times = [datetime(2026, 11, 1, 7, 5, tzinfo=UTC) + timedelta(hours=29 * n / 5) for n in range(5 * 30)]
    times += [datetime(2026, 10, 31, 23, 59, tzinfo=UTC), datetime(2026, 12, 1, 0, 0, tzinfo=UTC)]
    for n, when in enumerate(times):
        prompt, completion = 1000 + 37 * n, 200 + 13 * n
        refused = n % 25 == 23  # a 429 on the unpriced deployment: no tokens, so no unpriced usage
        if refused:
            prompt = completion = 0
        documents.append({
            "schema": 1, "event_id": f"{key}-{n:06d}", "time": when.isoformat(), "key_name": key,
            "deployment": DEPLOYMENTS[n % len(DEPLOYMENTS)], "model": "m", "backend": ("eastus", "ptu")[n // 5 % 2],
            "operation": "chat/completions", "streaming": True, "prompt_tokens": prompt,
            "completion_tokens": completion, "total_tokens": prompt + completion,
            "cached_tokens": 0 if refused else (n % 4) * 100, "reasoning_tokens": 0 if refused else (n % 3) * 50,
            "usage_source": "reported", "status": 429 if refused else 200,
        })
    return documents


@pytest.fixture
async def service(storage: str) -> AsyncIterator[Any]:
    async with open_table_service(StorageConfig(connection_string=storage)) as client:
        yield client


def cli(args: list[str], storage: str, **env: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "usage", *args], cwd=PROJECT, capture_output=True, text=True,
                          timeout=120, check=False, env={**os.environ, "UsageStorage": storage, **env})
    assert done.returncode == 0, done.stderr
    return done


async def test_cost_equals_tokens_times_price_over_a_mixed_month(service: Any, storage: str) -> None:
    """A month with a mid-month price change, a backend at 0, a deployment priced from the 10th, one priced in
    EUR and one not at all, delivered in shuffled batches and then all over again: the month rows, the
    statement and the report all give exactly Σ tokens × price, and the unpriced requests apart."""
    key = f"cost-{uuid.uuid4().hex[:8]}"
    documents = month_events(key)
    bodies = [json.dumps(d).encode() for d in documents]
    order = list(range(len(bodies)))
    random.Random(7).shuffle(order)
    batches = [[bodies[i] for i in order[start:start + 25]] for start in range(0, len(order), 25)]
    aggregator = Aggregator(service, prices=parse_prices(json.dumps(PRICES)))
    counted = [(await aggregator.aggregate(batch)).counted for batch in batches]
    again = [(await aggregator.aggregate(batch)) for batch in reversed(batches)]  # redelivered: nothing changes
    overlap = await Aggregator(service, prices=parse_prices(json.dumps(PRICES))).aggregate(bodies[40:90])
    assert sum(counted) == len(bodies)
    assert sum(r.counted for r in again) == 0 and sum(r.duplicates for r in again) == len(bodies)
    assert (overlap.counted, overlap.duplicates) == (0, 50)

    november = [d for d in documents if d["time"].startswith("2026-11")]
    wanted: dict[str, dict[str, Any]] = {}
    for document in november:
        row = wanted.setdefault(document["deployment"], {
            "key": key, "deployment": document["deployment"], "requests": 0, "prompt_tokens": 0,
            "cached_tokens": 0, "completion_tokens": 0, "reasoning_tokens": 0, "total_tokens": 0,
            "cost": Decimal(0), "currency": None, "unpriced_requests": 0})
        for name in ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "total_tokens"):
            row[name] += document[name]
        row["requests"] += 1
        priced = reference_cost(document)
        if priced is None:
            row["unpriced_requests"] += document["status"] < 400
        else:
            row["cost"] += priced[0]
            row["currency"] = priced[1]
    # the mix is what the test says it is: a change mid-month, a free backend, unpriced usage in two forms
    assert 0 < wanted["o-unpriced"]["unpriced_requests"] < wanted["o-unpriced"]["requests"]  # refusals aside
    assert 0 < wanted["embed-eur"]["unpriced_requests"] < wanted["embed-eur"]["requests"]
    assert any(d["backend"] == "ptu" and d["deployment"] == "gpt-4o" and d["time"] >= "2026-11-15" for d in november)
    assert all(r["cost"] * 10**9 == int(r["cost"] * 10**9) for r in wanted.values())  # nano-units are exact

    table = service.get_table_client(USAGE_TABLE)
    for deployment, row in wanted.items():
        month = await table.get_entity(f"2026-11|{key}", f"month|2026-11|{deployment}")
        assert as_int(month["CostNano"]) == row["cost"] * 10**9, deployment
        assert as_int(month["UnpricedRequests"]) == row["unpriced_requests"], deployment
        assert (month["Currency"] or None) == row["currency"], deployment

    statement = json.loads(cli(["statement", "--month", "2026-11", "--key", key, "--format", "json"], storage).stdout)
    assert [set(r) for r in statement] == [STATEMENT_FIELDS] * len(wanted)
    assert [r["deployment"] for r in statement] == sorted(wanted)
    for row in statement:
        assert {**row, "cost": Decimal(row["cost"])} == wanted[row["deployment"]]

    # the report over the same span, by key: a row per currency (never summed across) and one for the usage of
    # the deployment without a price, its totals equal to the statement's
    report = json.loads(cli(["report", "--key", key, "--since", "2026-11-01", "--until", "2026-11-30",
                             "--format", "json"], storage).stdout)
    assert [r["currency"] for r in report] == [None, "EUR", "USD"]
    for row in report:
        same = [r for r in statement if r["currency"] == row["currency"]]
        assert Decimal(row["cost"]) == sum(Decimal(r["cost"]) for r in same)
        assert row["unpriced_requests"] == sum(r["unpriced_requests"] for r in same)
        assert row["total_tokens"] == sum(r["total_tokens"] for r in same)
    by_day = json.loads(cli(["report", "--key", key, "--since", "2026-11-01", "--until", "2026-11-30", "--by", "day",
                             "--format", "json"], storage).stdout)
    for currency in ("EUR", "USD"):
        assert (sum(Decimal(r["cost"]) for r in by_day if r["currency"] == currency)
                == sum(Decimal(r["cost"]) for r in statement if r["currency"] == currency))
    assert (sum(r["unpriced_requests"] for r in by_day) == sum(r["unpriced_requests"] for r in statement)
            == sum(reference_cost(d) is None and d["status"] < 400 for d in november))

    # what the usage page reads: day rows and one key's statement, in nano-units
    days = await read_days(service, since=date(2026, 11, 1), until=date(2026, 11, 30), key=key)
    rows = await statement_rows(service, month="2026-11", key=key)
    assert sum(d.cost_nano for d in days) == sum(r.cost_nano for r in rows) == sum(
        r["cost"] * 10**9 for r in wanted.values())
    assert [r.as_json() for r in rows] == statement

    text = cli(["statement", "--month", "2026-11", "--key", key], storage).stdout
    assert "TOTAL" in text and "EUR" in text and "USD" in text
    eur = wanted["embed-eur"]["cost"]
    assert f"{eur:.9f}".rstrip("0") in text
    csv_lines = cli(["statement", "--month", "2026-11", "--key", key, "--format", "csv"], storage).stdout.splitlines()
    assert csv_lines[0] == ("key,deployment,requests,prompt_tokens,cached_tokens,completion_tokens,"
                            "reasoning_tokens,total_tokens,cost,currency,unpriced_requests")
    assert len(csv_lines) == 1 + len(wanted)
    chart = cli(["report", "--key", key, "--since", "2026-11-01", "--until", "2026-11-30", "--by", "deployment",
                 "--format", "chart"], storage).stdout
    assert "█" in chart and "no price" in chart and "EUR" in chart
    assert json.loads(cli(["statement", "--month", "2026-10", "--key", key, "--format", "json"],
                          storage).stdout)[0]["requests"] == 1


async def test_currency_changed_within_a_month_is_counted_unpriced(
        service: Any, caplog: pytest.LogCaptureFixture) -> None:
    """If PRICES moves a deployment to another currency mid-month, its month row never sums the two: the later
    events are counted, as unpriced, with a warning."""
    key = f"cur-{uuid.uuid4().hex[:8]}"
    documents = month_events(key)[:1]
    later = {**documents[0], "event_id": f"{key}-later", "time": "2026-11-20T10:00:00+00:00"}
    usd = parse_prices('{"gpt-4o": {"currency": "USD", "input": 1, "cached_input": 1, "output": 1}}')
    eur = parse_prices('{"gpt-4o": {"currency": "EUR", "input": 1, "cached_input": 1, "output": 1}}')
    assert (await Aggregator(service, prices=usd).aggregate([json.dumps(documents[0])])).counted == 1
    with caplog.at_level(logging.WARNING, logger="usage._aggregate"):
        assert (await Aggregator(service, prices=eur).aggregate([json.dumps(later)])).counted == 1
    assert "unpriced" in caplog.text and "USD" in caplog.text and "EUR" in caplog.text
    [row] = await statement_rows(service, month="2026-11", key=key)
    tokens = documents[0]["prompt_tokens"] + documents[0]["completion_tokens"]
    assert (row.requests, row.currency, row.unpriced_requests, row.cost_nano) == (2, "USD", 1, tokens * 1000)


async def test_queue_trigger_prices_with_the_app_setting(storage: str, service: Any) -> None:
    """The queue trigger's aggregator reads PRICES from the app settings, and refuses a bad one, naming it."""
    from azure.functions.servicebus import ServiceBusMessage

    from usage import aggregate_messages

    key = f"trig-{uuid.uuid4().hex[:8]}"
    document = month_events(key)[0]  # gpt-4o on eastus, 1 November: the first price
    runtime = AggregatorRuntime()
    await runtime.aggregator({"UsageStorage": storage, "PRICES": json.dumps(PRICES)})
    try:
        message = ServiceBusMessage(body=json.dumps(document).encode(), message_id=document["event_id"],
                                    application_properties={}, user_properties={})
        assert (await aggregate_messages(runtime, [message])).counted == 1
    finally:
        await runtime.close()
    [row] = await statement_rows(service, month="2026-11", key=key)
    priced = reference_cost(document)
    assert priced is not None and row.cost_nano == priced[0] * 10**9 and row.currency == "USD"
    with pytest.raises(SettingsError, match="PRICES"):
        await AggregatorRuntime().aggregator({"UsageStorage": storage, "PRICES": '{"gpt-4o": {"input": 1}}'})


def test_requests_through_the_gateway_are_priced(storage: str) -> None:
    """Through the openai SDK: a priced deployment's cost is its reported usage × price, to the nano-unit; a
    deployment without a price is counted in unpriced_requests, not as 0."""
    prices = parse_prices(json.dumps({"gpt-4o": {
        "currency": "USD", "input": "2.5", "cached_input": "1.25", "output": "10",
        "backends": {"westus": {"input": 0, "cached_input": 0, "output": 0},
                     "retired-ptu": {"input": 0, "cached_input": 0, "output": 0}}}}))
    with running_gateway(storage, prices=prices) as gateway:
        name = f"team-{uuid.uuid4().hex[:8]}"
        key = gateway.create_key(name)
        client = openai.AzureOpenAI(azure_endpoint=gateway.url, api_key=key, api_version="2024-10-21")
        messages: Any = [{"role": "user", "content": "What does it cost?"}]
        list(client.chat.completions.create(model="gpt-4o", messages=messages, stream=True))
        client.chat.completions.create(model="gpt-4o", messages=messages)
        client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        records = gateway.sink.wait(3)
        month = time.strftime("%Y-%m", time.gmtime())

        async def statement() -> dict[str, Any]:
            async with open_table_service(gateway.settings.storage) as service:
                return {r.deployment: r for r in await statement_rows(service, month=month, key=name)}

        eventually(lambda: sum(r.requests for r in gateway.loop.run(statement()).values()) == 3, timeout=20)
        rows = gateway.loop.run(statement())
        # an override of a backend AOAI_BACKENDS no longer has is allowed (its events may still come), and said
        assert any("PRICES" in line and "retired-ptu" in line for line in gateway.logs.lines)
    priced = [r for r in records if r.deployment == "gpt-4o"]
    assert all(r.backend == "eastus" and r.prompt_tokens > 0 and r.completion_tokens > 0 for r in priced)
    expected = sum(r.prompt_tokens * 2500 + r.completion_tokens * 10_000 for r in priced)
    assert (rows["gpt-4o"].cost_nano, rows["gpt-4o"].currency, rows["gpt-4o"].unpriced_requests) == (
        expected, "USD", 0)
    assert (rows["gpt-4o-mini"].cost_nano, rows["gpt-4o-mini"].currency, rows["gpt-4o-mini"].unpriced_requests) == (
        0, None, 1)
    assert rows["gpt-4o-mini"].as_json()["cost"] == "0.00"


@pytest.mark.parametrize("prices", [
    '{"gpt-4o": {"currency": "USD", "input": 2.5001, "cached_input": 1, "output": 10}}',
    '[{"gpt-4o": {"currency": "USD", "input": 2.5, "cached_input": 1, "output": 10}}]',
])
def test_serve_refuses_bad_prices_naming_the_setting(prices: str, tmp_path: Path) -> None:
    """python -m gateway serve exits 2 on a bad PRICES (too many decimals; not an object), naming it."""
    backends = json.dumps([{"name": "east", "endpoint": "https://east.example"}])
    env = {**os.environ, "AOAI_BACKENDS": backends, "UsageStorage": "UseDevelopmentStorage=true", "PRICES": prices}
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "1"], cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(PROJECT)}, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 2, done.stderr
    assert "PRICES" in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    assert caught.value.name == "PRICES"


async def test_cost_past_int64_is_rejected_not_lost(service: Any) -> None:
    """An event whose cost would take its counters past Int64 is kept in usagerejects with its reason, and the
    rows are left as they were: never wrapped, never dropped."""
    from usage._schema import REJECTS_TABLE

    key = f"big-{uuid.uuid4().hex[:8]}"
    prices = parse_prices('{"gpt-4o": {"currency": "USD", "input": 0, "cached_input": 0, "output": 100000}}')
    small, huge = month_events(key)[:2]
    huge = {**huge, "deployment": "gpt-4o", "completion_tokens": 10**12 - 10**4,
            "total_tokens": 10**12 - 10**4 + huge["prompt_tokens"]}  # each count within bounds; the cost 10^20
    result = await Aggregator(service, prices=prices).aggregate([json.dumps(small), json.dumps(huge)],
                                                                message_ids=["small", f"huge-{key}"])
    assert (result.counted, result.rejected) == (1, 1)
    [row] = await statement_rows(service, month="2026-11", key=key)
    assert (row.requests, row.cost_nano) == (1, small["completion_tokens"] * 10**8)
    rejects = service.get_table_client(REJECTS_TABLE)
    [reject] = [e async for e in rejects.query_entities("MessageId eq @m", parameters={"m": f"huge-{key}"})]
    assert "Int64" in reject["Reason"]


def test_serve_warns_of_a_price_override_for_a_backend_it_lacks(tmp_path: Path) -> None:
    """python -m gateway serve names, at start-up, a PRICES override of a backend AOAI_BACKENDS does not have."""
    backends = json.dumps([{"name": "east", "endpoint": "https://east.example"}])
    prices = json.dumps({"gpt-4o": {"currency": "USD", "input": 1, "cached_input": 1, "output": 2,
                                    "backends": {"eastt": {"input": 0, "cached_input": 0, "output": 0}}}})
    env = {**os.environ, "AOAI_BACKENDS": backends, "UsageStorage": "UseDevelopmentStorage=true", "PRICES": prices,
           "PYTHONPATH": str(PROJECT)}
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "1"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert "warning: PRICES overrides backend(s) eastt for gpt-4o" in done.stderr
    assert "no function_app.py" in done.stderr  # stopped after the settings: this folder has no app


def test_statement_refuses_a_month_in_other_digits(storage: str) -> None:
    """statement --month takes ASCII digits only: "２０２６-11" is refused (exit 2), not read as an empty month."""
    done = subprocess.run([sys.executable, "-m", "usage", "statement", "--month", "２０２６-11"], cwd=PROJECT,
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "UsageStorage": storage})
    assert done.returncode == 2 and "not a month" in done.stderr and "Traceback" not in done.stderr


def test_output_into_a_closed_pipe_is_no_traceback(storage: str) -> None:
    """`python -m usage statement ... | head` where the reader has gone: no traceback on stderr."""
    process = subprocess.Popen([sys.executable, "-m", "usage", "statement", "--month", "2026-11", "--format", "csv"],
                               cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, "UsageStorage": storage})
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # before the command writes anything
    stderr = process.stderr.read().decode()
    process.wait(timeout=120)
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
