"""The teams' usage page: /usage in a real headless Chromium, and /usage/data and /usage/statement.csv over HTTP.

Usage is made through the ``openai`` SDK against the running gateway (counted in process into Azurite), and the
previous month's through the aggregator; a second team's usage is there too and must never show.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import openai
import pytest

from gateway._usage_page import READ_TIMEOUT_SECONDS
from tests.browser import Tab, chromium, decode_png
from tests.harness import Gateway, eventually, http, running_gateway
from tests.storage_proxy import storage_proxy
from usage import KeyStore, open_table_service
from usage._aggregate import Aggregator
from usage._keys import Limits
from usage._prices import format_cost, parse_prices

API_VERSION = "2024-10-21"
#: the page's first chart colour (its first deployment's bars), as RGB
CHART_BLUE = (0x25, 0x63, 0xEB)
#: set to a path to keep the browser test's screenshot there (the README's docs/usage-page.png is made so)
SCREENSHOT_SETTING = "USAGE_PAGE_SCREENSHOT"
#: per million tokens; "other-secret-model" has no price
PRICES: dict[str, Any] = {
    "gpt-4o": {"currency": "USD", "input": "2.5", "cached_input": "1.25", "output": "10"},
    "gpt-4o-mini": {"currency": "USD", "input": "0.15", "cached_input": "0.075", "output": "0.6"},
}
#: nano-units per token: (input, cached input, output)
NANO_PER_TOKEN = {"gpt-4o": (2500, 1250, 10_000), "gpt-4o-mini": (150, 75, 600)}


def cost_nano(deployment: str, prompt: int, cached: int, completion: int) -> int:
    """An event's cost as the issue defines it, in nano-units."""
    rate, cached_rate, output = NANO_PER_TOKEN[deployment]
    return (prompt - cached) * rate + cached * cached_rate + completion * output


@pytest.fixture
def gateway(storage: str) -> Iterator[Gateway]:
    """The running gateway, with PRICES for two of the three deployments the tests use."""
    with running_gateway(storage, prices=parse_prices(json.dumps(PRICES))) as running:
        yield running


def months(now: datetime) -> tuple[str, str]:
    """This UTC month and the one before, as YYYY-MM."""
    first = now.replace(day=1)
    return f"{first:%Y-%m}", f"{first - timedelta(days=1):%Y-%m}"


def event(key: str, deployment: str, when: datetime, prompt: int, completion: int) -> bytes:
    return json.dumps({
        "schema": 1, "event_id": uuid.uuid4().hex, "time": when.isoformat(), "key_name": key,
        "deployment": deployment, "model": "gpt-4o-2024-08-06", "backend": "eastus",
        "operation": "chat/completions", "streaming": False, "prompt_tokens": prompt, "completion_tokens": completion,
        "total_tokens": prompt + completion, "cached_tokens": 0, "reasoning_tokens": 0,
        "usage_source": "reported", "status": 200, "latency_ms": 100.0, "ttfb_ms": 10.0, "outcome": "complete",
    }).encode()


def aggregate(gateway: Gateway, bodies: list[bytes]) -> None:
    """Count ``bodies`` into the gateway's usage table, as the queue-triggered aggregator would."""

    async def run() -> None:
        async with open_table_service(gateway.settings.storage) as service:
            result = await Aggregator(service, prices=gateway.settings.prices).aggregate(bodies)
            assert result.counted == len(bodies)

    gateway.loop.run(run())


def data(gateway: Gateway, key: str | None, query: str = "") -> Any:
    headers = {} if key is None else {"api-key": key}
    return http("GET", f"{gateway.url}/usage/data{query}", headers=headers)


def chat(gateway: Gateway, key: str, deployment: str, text: str, *, stream: bool = False) -> None:
    client = openai.AzureOpenAI(azure_endpoint=gateway.url, api_key=key, api_version=API_VERSION, max_retries=0)
    if stream:
        chunks = list(client.chat.completions.create(model=deployment, stream=True,
                                                     messages=[{"role": "user", "content": text}]))
        assert chunks
    else:
        assert client.chat.completions.create(model=deployment, messages=[{"role": "user", "content": text}]).usage


class Teams:
    """Two teams with usage this month (through the SDK) and last month (aggregated), as the page's tests see it."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        suffix = uuid.uuid4().hex[:8]
        self.name, self.other_name = f"page-team-{suffix}", f"page-other-{suffix}"
        self.key = gateway.create_key(self.name, Limits(tokens_per_minute=100_000, tokens_per_month=5_000_000,
                                                        requests_per_minute=600, budget_nano_per_month=2 * 10**9))
        self.other_key = gateway.create_key(self.other_name)
        now = datetime.now(UTC)
        self.month, self.previous = months(now)
        chat(gateway, self.key, "gpt-4o", "Summarise the quarterly numbers, please.")
        chat(gateway, self.key, "gpt-4o", "And the outlook?", stream=True)
        chat(gateway, self.key, "gpt-4o-mini", "Translate 'hello' into French.")
        chat(gateway, self.other_key, "other-secret-model", "Nothing of this may show on the first team's page.")
        records = gateway.sink.wait(4)
        mine = [r for r in records if r.key_name == self.name]
        self.tokens = {d: sum(r.total_tokens for r in mine if r.deployment == d) for d in ("gpt-4o", "gpt-4o-mini")}
        assert all(self.tokens.values())
        self.cost = {d: sum(cost_nano(d, r.prompt_tokens, r.cached_tokens, r.completion_tokens)
                            for r in mine if r.deployment == d) for d in self.tokens}
        assert all(self.cost.values())
        # last month: working days of gpt-4o, every third day some gpt-4o-mini, one day row each
        first = datetime.strptime(self.previous, "%Y-%m").replace(hour=9, tzinfo=UTC)
        self.previous_days = [(d, "gpt-4o", 2400 + 370 * (d % 5) + 45 * d, 900 + 160 * (d % 3))
                              for d in range(1, 29) if d % 7 not in (0, 6)]
        self.previous_days += [(d, "gpt-4o-mini", 5000 + 300 * (d % 4), 1500) for d in range(3, 29, 3)]
        aggregate(gateway, [event(self.name, deployment, first + timedelta(days=d - 1), prompt, completion)
                            for d, deployment, prompt, completion in self.previous_days]
                  + [event(self.other_name, "other-secret-model", first, 9000, 9000)])
        self.previous_tokens = {d: sum(p + c for _, name, p, c in self.previous_days if name == d)
                                for d in ("gpt-4o", "gpt-4o-mini")}
        self.previous_cost = {d: sum(cost_nano(d, p, 0, c) for _, name, p, c in self.previous_days if name == d)
                              for d in ("gpt-4o", "gpt-4o-mini")}
        # the local run counts in process after a short linger: wait until this month's usage is in the table
        eventually(lambda: data(gateway, self.key).json()["totals"]["requests"] == 3,
                   message=lambda: data(gateway, self.key).text)


@pytest.fixture
def teams(gateway: Gateway) -> Teams:
    return Teams(gateway)


def test_data_is_the_keys_own_usage_by_day_and_deployment(gateway: Gateway, teams: Teams) -> None:
    """/usage/data answers the key's name (never the key), this month's day rows per deployment, and its quota state;
    the other team's usage is in the same table and never shows. Reading it is no AOAI call: no usage event."""
    events_before = len(gateway.sink.records)
    answer = data(gateway, teams.key)
    assert answer.status == 200 and answer.headers["content-type"] == "application/json"
    assert teams.key not in answer.text and teams.other_name not in answer.text
    assert "other-secret-model" not in answer.text
    document = answer.json()
    assert document["key"] == teams.name and document["month"] == teams.month
    today = datetime.now(UTC).date().isoformat()
    by_deployment = {row["deployment"]: row for row in document["days"]}
    assert set(by_deployment) == {"gpt-4o", "gpt-4o-mini"}
    assert {d: row["total_tokens"] for d, row in by_deployment.items()} == teams.tokens
    assert {row["day"] for row in document["days"]} == {today}
    assert by_deployment["gpt-4o"]["requests"] == 2
    assert document["totals"]["total_tokens"] == sum(teams.tokens.values())
    assert {d: (row["cost"], row["currency"], row["unpriced_requests"]) for d, row in by_deployment.items()} == {
        d: (format_cost(nano), "USD", 0) for d, nano in teams.cost.items()}
    assert (document["totals"]["cost"], document["totals"]["currency"]) == (format_cost(sum(teams.cost.values())),
                                                                            "USD")
    quota = document["quota"]
    assert quota["tokens_per_minute"]["limit"] == 100_000
    next_month = (datetime.now(UTC).replace(day=1) + timedelta(days=32)).replace(day=1)
    assert quota["tokens_per_month"] == {"limit": 5_000_000, "window": "month", "used": sum(teams.tokens.values()),
                                         "resets": f"{next_month:%Y-%m}-01T00:00:00+00:00"}
    assert quota["tokens_per_day"]["limit"] is None
    assert quota["requests_per_minute"]["limit"] == 600
    assert document["budget"] == {"budget_per_month": {
        "limit": "2.00", "window": "month", "used": format_cost(sum(teams.cost.values())), "currency": "USD",
        "resets": f"{next_month:%Y-%m}-01T00:00:00+00:00"}}

    previous = data(gateway, teams.key, f"?month={teams.previous}").json()
    assert previous["month"] == teams.previous and previous["key"] == teams.name
    assert {row["deployment"]: row["total_tokens"] for row in previous["deployments"]} == teams.previous_tokens
    assert sorted((row["day"][8:], row["deployment"]) for row in previous["days"]) == sorted(
        (f"{d:02d}", name) for d, name, _, _ in teams.previous_days)

    other = data(gateway, teams.other_key, f"?month={teams.previous}").json()
    assert other["key"] == teams.other_name
    assert [(row["deployment"], row["currency"], row["unpriced_requests"]) for row in other["deployments"]] == [
        ("other-secret-model", None, 1)]  # no price: counted as unpriced, not as 0
    assert other["totals"]["costs"] == [] and other["totals"]["unpriced_requests"] == 1
    assert len(gateway.sink.records) == events_before  # no usage event for the page's calls


def test_statement_csv_is_an_attachment_of_the_keys_own_month(gateway: Gateway, teams: Teams) -> None:
    answer = http("GET", f"{gateway.url}/usage/statement.csv?month={teams.previous}", headers={"api-key": teams.key})
    assert answer.status == 200
    assert answer.headers["content-type"].startswith("text/csv")
    assert answer.headers["content-disposition"].startswith("attachment;")
    assert teams.key not in answer.text and "other-secret-model" not in answer.text
    rows = list(csv.DictReader(io.StringIO(answer.text)))
    assert {row["key"] for row in rows} == {teams.name}
    assert {row["deployment"]: (int(row["total_tokens"]), row["cost"], row["currency"]) for row in rows} == {
        d: (tokens, format_cost(teams.previous_cost[d]), "USD") for d, tokens in teams.previous_tokens.items()}
    current = http("GET", f"{gateway.url}/usage/statement.csv", headers={"api-key": teams.key})
    assert {row["deployment"]: (int(row["total_tokens"]), row["cost"])
            for row in csv.DictReader(io.StringIO(current.text))} == {
        d: (tokens, format_cost(teams.cost[d])) for d, tokens in teams.tokens.items()}


def test_a_missing_wrong_or_revoked_key_gets_401(gateway: Gateway) -> None:
    """No key, an unknown one, or a revoked one: 401, AOAI-shaped, on both endpoints; a good key's answer is 200."""
    name = f"page-revoked-{uuid.uuid4().hex[:8]}"
    revoked = gateway.create_key(name)

    async def revoke() -> None:
        async with open_table_service(gateway.settings.storage) as service:
            await KeyStore(service, secret=gateway.settings.key_hash_secret).revoke(name)

    gateway.loop.run(revoke())
    for path in ("/usage/data", "/usage/statement.csv"):
        assert http("GET", gateway.url + path, headers={"authorization": f"Bearer {gateway.key}"}).status == 200
        for headers in ({}, {"api-key": "gw-not-a-key"}, {"authorization": "Bearer nope"}, {"api-key": revoked}):
            answer = http("GET", gateway.url + path, headers=headers)
            assert answer.status == 401, (path, headers, answer.text)
            assert set(answer.json()["error"]) == {"code", "message"}


def test_an_expired_key_gets_401(gateway: Gateway) -> None:
    """A key past its expiry is refused by the page's endpoints as by an AOAI call, even once cached."""
    name = f"page-expiring-{uuid.uuid4().hex[:8]}"
    key = gateway.create_key(name, expires_at=datetime.now(UTC) + timedelta(hours=1))
    assert data(gateway, key).json()["key"] == name
    gateway.clock.advance(2 * 3600)  # the worker's wall clock moves with it
    for path in ("/usage/data", "/usage/statement.csv"):
        answer = http("GET", gateway.url + path, headers={"api-key": key})
        assert answer.status == 401, answer.text
        assert set(answer.json()["error"]) == {"code", "message"}


def test_a_rotated_name_shows_both_keys_usage(gateway: Gateway) -> None:
    """After `keys rotate`, the new key and the old one (in its grace period) see the same name's usage: the
    requests made with either."""
    name = f"page-rotating-{uuid.uuid4().hex[:8]}"
    old = gateway.create_key(name)
    chat(gateway, old, "gpt-4o", "Before the rotation.")

    async def rotate() -> str:
        async with open_table_service(gateway.settings.storage) as service:
            return await KeyStore(service, secret=gateway.settings.key_hash_secret).rotate(
                name, grace=timedelta(hours=1))

    new = gateway.loop.run(rotate())
    chat(gateway, new, "gpt-4o", "After the rotation.")
    eventually(lambda: data(gateway, new).json()["totals"]["requests"] == 2,
               message=lambda: data(gateway, new).text)
    seen = [data(gateway, key).json() for key in (old, new)]
    assert [d["key"] for d in seen] == [name, name]
    assert seen[0]["days"] == seen[1]["days"]


BAD_MONTHS = (
    "?month=2026-13", "?month=2026-00", "?month=26-11", "?month=2026-1", "?month=202611", "?month=",
    "?month=1999-12", "?month=0000-01", "?month=9999-01", "?month=2026-11-01",
    "?month=" + quote("2026-11' or PartitionKey ne '"), "?month=" + quote("2026-11|other"),
    "?month=" + quote("2026-11\n"), "?month=%EF%BC%92026-11", "?month=2026-11&month=2026-10",
)


def test_a_bad_month_gets_400(gateway: Gateway) -> None:
    """Not YYYY-MM, an absurd year, an injection attempt or a month given twice: a 400 that says so."""
    for query in BAD_MONTHS:
        for path in ("/usage/data", "/usage/statement.csv"):
            answer = http("GET", gateway.url + path + query, headers={"api-key": gateway.key})
            assert answer.status == 400, (query, answer.text)
            assert answer.json()["error"]["code"] == "InvalidMonth"
            assert answer.json()["error"]["message"]


def test_the_page_is_self_contained(gateway: Gateway) -> None:
    """One HTML document: a key input and a button, inline script and style only allowed by a strict CSP;
    the page's paths take GET only (405), and the catch-all still answers 404 next to them."""
    answer = http("GET", gateway.url + "/usage")
    assert answer.status == 200 and answer.headers["content-type"].startswith("text/html")
    policy = answer.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
    assert '<input id="api-key" name="api-key"' in answer.text and "<button" in answer.text
    assert "http://" not in answer.text.replace("http://www.w3.org/2000/svg", "") and "https://" not in answer.text
    for path in ("/usage", "/usage/data", "/usage/statement.csv"):
        assert http("POST", gateway.url + path, body=b"{}").status == 405
    assert http("GET", gateway.url + "/usage/other").status == 404


async def _look_at_the_page(tab: Tab, gateway: Gateway, teams: Teams, downloads: Path) -> bytes:
    await tab.goto(gateway.url + "/usage")
    assert await tab.evaluate("document.body.dataset.state || ''") == ""
    await tab.type_into('input[name="api-key"]', teams.key)
    await tab.click("button#show")
    state = await tab.wait_for("['ready', 'error'].includes(document.body.dataset.state)"
                               " && document.body.dataset.state")
    assert state == "ready", await tab.evaluate("document.getElementById('status').textContent")
    assert await tab.evaluate("sessionStorage.getItem('aoai-gateway-key')") == teams.key
    assert await tab.evaluate("document.getElementById('team').textContent") == teams.name
    text = await tab.evaluate("document.body.innerText")
    assert teams.other_name not in text and "other-secret-model" not in text
    for month, tokens, cost in ((teams.month, teams.tokens, teams.cost),
                                (teams.previous, teams.previous_tokens, teams.previous_cost)):
        section = f'section.month[data-month="{month}"]'
        assert await tab.evaluate(f"document.querySelector('{section} .total-tokens').textContent") == \
            f"{sum(tokens.values()):,}"
        assert await tab.evaluate(f"document.querySelector('{section} .total-cost').textContent") == \
            f"USD {format_cost(sum(cost.values()))}"
        shown = await tab.evaluate(
            f"[...document.querySelectorAll('{section} table.deployments tbody tr')]"
            ".map(r => [r.dataset.deployment, r.cells[4].textContent, r.cells[5].textContent])")
        assert shown == [[d, f"{t:,}", f"USD {format_cost(cost[d])}"] for d, t in sorted(tokens.items())]
        for kind in ("tokens", "cost"):
            bars = await tab.evaluate(f"document.querySelectorAll('{section} svg.chart[data-kind={kind}] rect').length")
            assert bars == (len(tokens) if month == teams.month else len(teams.previous_days)), (month, kind)
    limits = await tab.evaluate(
        "[...document.querySelectorAll('#limits-table tbody tr')].map(r => [r.dataset.limit, r.cells[2].textContent])")
    assert limits[0] == ["budget_per_month", "USD 2.00"]
    assert ["tokens_per_minute", "100,000"] in limits and ["tokens_per_day", "no limit"] in limits
    assert ["requests_per_minute", "600"] in limits

    # the statement downloads with the key in a header, never in a URL
    await tab.click(f'a.download[data-month="{teams.previous}"]')
    path = downloads / f"usage-{teams.name}-{teams.previous}.csv"
    await asyncio.to_thread(eventually, path.is_file, timeout=20)
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert {row["deployment"]: int(row["total_tokens"]) for row in rows} == teams.previous_tokens

    screenshot = await tab.screenshot()
    image = decode_png(screenshot)
    for month in (teams.month, teams.previous):
        for kind in ("tokens", "cost"):
            box = await tab.box(f'section.month[data-month="{month}"] svg.chart[data-kind={kind}]')
            blue = image.count(CHART_BLUE, box)
            assert blue > 200, f"the {month} {kind} chart shows {blue} pixels of its bars' colour"
    heading = await tab.box("header")
    assert image.count(CHART_BLUE, heading) > 0  # the button: the colour is not only in the charts
    return screenshot


def test_the_page_in_a_headless_browser(gateway: Gateway, teams: Teams, tmp_path: Path) -> None:
    """Chromium opens /usage, the team types its key and clicks: the charts of this and last month, the quota and
    the CSV download come from this gateway alone, and the screenshot shows the bars."""
    downloads = tmp_path / "downloads"
    downloads.mkdir()

    async def scenario() -> tuple[bytes, list[str], list[str]]:
        async with chromium() as browser:
            await browser.allow_downloads(downloads)
            tab = await browser.new_tab(width=1200, height=900)
            return await _look_at_the_page(tab, gateway, teams, downloads), tab.requests, tab.errors

    screenshot, requests, errors = asyncio.run(scenario())
    assert not errors  # no script error, no refusal by the Content-Security-Policy
    origin = urlsplit(gateway.url).netloc
    elsewhere = [url for url in requests if not url.startswith(("blob:", "data:")) and urlsplit(url).netloc != origin]
    assert not elsewhere, f"the page asked for {elsewhere}"
    assert all(teams.key not in url for url in requests)
    assert {urlsplit(url).path for url in requests if urlsplit(url).netloc == origin} == {
        "/usage", "/usage/data", "/usage/statement.csv"}
    kept = os.environ.get(SCREENSHOT_SETTING)
    (Path(kept) if kept else tmp_path / "usage-page.png").write_bytes(screenshot)


def test_storage_down_is_a_503_to_retry(storage: str) -> None:
    """Table Storage refusing connections once the key is known: an AOAI-shaped 503 with Retry-After, in bounded
    time, never a traceback; the page's figures come back with storage."""
    with storage_proxy(storage) as proxy, running_gateway(proxy.connection_string) as gateway:
        try:
            assert data(gateway, gateway.key).status == 200
            proxy.refuse()
            started = time.monotonic()
            for path in ("/usage/data", "/usage/statement.csv"):
                answer = http("GET", gateway.url + path, headers={"api-key": gateway.key}, timeout=30)
                assert answer.status == 503, answer.text
                assert answer.json()["error"]["code"] == "ServiceUnavailable"
                assert int(answer.headers["retry-after"]) >= 1
            assert time.monotonic() - started < 2 * (READ_TIMEOUT_SECONDS + 1)
        finally:
            proxy.restore()
        assert data(gateway, gateway.key).status == 200
