"""The teams' usage page: ``GET /usage`` (one self-contained HTML page), ``/usage/data`` and ``/usage/statement.csv``.

The page asks for the team's own subscription key, keeps it in the browser's session storage and sends it as
the ``api-key`` header, authenticated exactly as a proxied call (``KeyCache``). A key sees its own name's
usage only: the key's name is the usage table's partition, so no other key's row is ever read. Nothing here
is an AOAI call: no usage event, no quota. The page loads nothing from anywhere else (a strict
Content-Security-Policy says so to the browser too): its script and style are inline, its charts SVG.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import logging
import re
from collections.abc import Awaitable
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables import EntityProperty
from azure.data.tables.aio import TableServiceClient
from fastapi import Request
from fastapi.responses import StreamingResponse

from gateway._auth import key_from_headers
from gateway._exceptions import BadRequest, RequestError, SettingsError, retry_after_headers
from gateway._responses import buffered, error_response
from gateway._runtime import GatewayRuntime
from usage import STORAGE_ERRORS, KeyRecord
from usage._prices import format_cost
from usage._report import FIELDS, DayUsage, group, read_days
from usage._schema import USAGE_TABLE, partition_key, period_start
from usage._statement import render_statement, statement_rows

log = logging.getLogger(__name__)

#: the page's file, in this package
PAGE_RESOURCE = "static/usage.html"
#: a month as the query gives it; years outside [MIN_YEAR, this year + 1] are refused as absurd
MONTH = re.compile(r"([0-9]{4})-([0-9]{2})")
MIN_YEAR = 2000
#: how long the page's table reads may take before the answer is a 503
READ_TIMEOUT_SECONDS = 10.0
RETRY_AFTER_SECONDS = 5.0
#: the usage table column each kind of limit counts, by the limit's name (``<unit>_per_<window>``)
_USED_COLUMN = {"tokens": "TotalTokens", "requests": "Requests"}
#: the usage table's cost columns (written by the aggregator since PRICES)
COST_COLUMN, CURRENCY_COLUMN = "CostNano", "Currency"
_WINDOWS = ("minute", "day", "month")
_SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
}


def _hashes(html: str, tag: str) -> list[str]:
    """CSP source expressions for each inline ``<tag>`` element's text (the page has no other script or style)."""
    bodies = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    return [f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'" for body in bodies]


@dataclasses.dataclass(frozen=True, slots=True)
class _Page:
    body: bytes
    policy: str


def _load_page() -> _Page:
    html = resources.files("gateway").joinpath(PAGE_RESOURCE).read_text(encoding="utf-8")
    policy = "; ".join([
        "default-src 'none'",
        "script-src " + " ".join(_hashes(html, "script")),
        "style-src " + " ".join(_hashes(html, "style")),
        "connect-src 'self'",
        "img-src data:",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    ])
    return _Page(html.encode(), policy)


class UsagePage:
    """The page and its two data endpoints, over the gateway runtime's key cache and Table client.

    The page's file is read on its first request (never at import) and kept.
    """

    def __init__(self, runtime: GatewayRuntime) -> None:
        self._runtime = runtime
        self._page: _Page | None = None

    async def page(self, request: Request) -> StreamingResponse:
        """``GET /usage``: the HTML page, which touches no key or table until the team gives its key."""
        if self._page is None:
            self._page = _load_page()
        headers = {**_SECURITY_HEADERS, "content-type": "text/html; charset=utf-8",
                   "content-security-policy": self._page.policy}
        return buffered(200, self._page.body, headers)

    async def data(self, request: Request) -> StreamingResponse:
        """``GET /usage/data?month=YYYY-MM``: the key's name, its day rows per deployment and its limits' state."""
        return await _answered(self._data(request))

    async def statement(self, request: Request) -> StreamingResponse:
        """``GET /usage/statement.csv?month=YYYY-MM``: the key's statement for the month, as CSV."""
        return await _answered(self._statement(request))

    async def _data(self, request: Request) -> StreamingResponse:
        record, tables, now = await self._authenticate(request)
        month = requested_month(request, now)
        async with asyncio.timeout(READ_TIMEOUT_SECONDS):
            days, used = await asyncio.gather(read_days(tables, since=month, until=_month_end(month), key=record.name),
                                              _used_now(tables, record.name, now))
        quota, budget = _limits_state(record, used, now)
        document = {
            "key": record.name,
            "month": f"{month:%Y-%m}",
            "days": [_day_row(row) for row in sorted(days, key=lambda r: (r.day, r.deployment))],
            "deployments": group(days, "deployment"),
            "totals": _totals(days),
            "quota": quota,
            "budget": budget,
            "as_of": now.isoformat(timespec="seconds"),
        }
        body = json.dumps(document, default=str).encode()
        return buffered(200, body, {**_SECURITY_HEADERS, "content-type": "application/json"})

    async def _statement(self, request: Request) -> StreamingResponse:
        record, tables, now = await self._authenticate(request)
        month = requested_month(request, now)
        month_text = f"{month:%Y-%m}"
        async with asyncio.timeout(READ_TIMEOUT_SECONDS):
            rows = await statement_rows(tables, month=month_text, key=record.name)
        text = render_statement(rows, "csv", month_text)
        headers = {**_SECURITY_HEADERS, "content-type": "text/csv; charset=utf-8",
                   "content-disposition": f'attachment; filename="usage-{record.name}-{month_text}.csv"'}
        return buffered(200, (text + "\n").encode(), headers)

    async def _authenticate(self, request: Request) -> tuple[KeyRecord, TableServiceClient, datetime]:
        """The request key's record, the Table client and the time now; ``RequestError`` when the key is not good."""
        try:
            await self._runtime.proxy()
        except SettingsError as exc:
            raise RequestError(f"The gateway is misconfigured: {exc}", status=500,
                               code="GatewayMisconfigured") from exc
        keys, tables = self._runtime.keys, self._runtime.tables
        if keys is None or tables is None:  # closed meanwhile (shutting down)
            raise RequestError("The gateway is shutting down; please retry.", status=503, code="ServiceUnavailable",
                               headers=retry_after_headers(RETRY_AFTER_SECONDS))
        record = await keys.authenticate(key_from_headers(request.headers))
        return record, tables, datetime.fromtimestamp(self._runtime.wall_clock(), UTC)


async def _answered(answer: Awaitable[StreamingResponse]) -> StreamingResponse:
    """``answer``, or the AOAI-shaped error that stands for what went wrong (never a traceback)."""
    try:
        return await answer
    except RequestError as exc:
        return error_response(exc)
    except STORAGE_ERRORS as exc:
        log.warning("usage page: Table Storage failed: %s", type(exc).__name__)
        return error_response(RequestError(
            "Usage could not be read from Table Storage in time; please retry.", status=503,
            code="ServiceUnavailable", headers=retry_after_headers(RETRY_AFTER_SECONDS)))
    except Exception:  # a bug of ours: the client gets a plain 500, the log gets the traceback
        log.exception("usage page failed inside the gateway")
        return error_response(RequestError("The gateway failed to answer; it has been logged.", status=500,
                                           code="InternalServerError"))


def requested_month(request: Request, now: datetime) -> date:
    """The first day of the query's ``month`` (this UTC month when absent); ``BadRequest`` for anything else."""
    values = request.query_params.getlist("month")
    if not values:
        return now.date().replace(day=1)
    if len(values) > 1:
        raise BadRequest("Give the month once: month=YYYY-MM.", code="InvalidMonth")
    match = MONTH.fullmatch(values[0])
    if match is None:
        raise BadRequest("The month must be given as month=YYYY-MM, e.g. month=2026-11.", code="InvalidMonth")
    year, month = int(match.group(1)), int(match.group(2))
    if not 1 <= month <= 12:
        raise BadRequest("The month must be between 01 and 12.", code="InvalidMonth")
    if not MIN_YEAR <= year <= now.year + 1:
        raise BadRequest(f"The year must be between {MIN_YEAR} and {now.year + 1}.", code="InvalidMonth")
    return date(year, month, 1)


def _month_end(day: date) -> date:
    """The last day of ``day``'s month."""
    return (day.replace(day=1) + timedelta(days=32)).replace(day=1) - timedelta(days=1)


def _day_row(row: DayUsage) -> dict[str, Any]:
    """A day row as the report's JSON gives one: the token fields, ``cost`` (currency units), ``currency`` and
    ``unpriced_requests``."""
    return {"day": row.day.isoformat(), "deployment": row.deployment, **dict(zip(FIELDS, row.counts, strict=True)),
            "cost": format_cost(row.cost_nano), "currency": row.currency, "unpriced_requests": row.unpriced_requests}


def _totals(rows: list[DayUsage]) -> dict[str, Any]:
    """The month's token fields and ``unpriced_requests`` summed, and ``costs``: one ``{"currency", "cost"}`` per
    currency (costs in two currencies are never added); ``cost`` and ``currency`` too when there is one."""
    sums = [0] * len(FIELDS)
    costs: dict[str, int] = {}
    for row in rows:
        for i, value in enumerate(row.counts):
            sums[i] += value
        if row.currency is not None:
            costs[row.currency] = costs.get(row.currency, 0) + row.cost_nano
    totals: dict[str, Any] = dict(zip(FIELDS, sums, strict=True))
    totals["unpriced_requests"] = sum(row.unpriced_requests for row in rows)
    totals["costs"] = [{"currency": c, "cost": format_cost(n)} for c, n in sorted(costs.items())]
    if len(costs) == 1:
        [(totals["currency"], nano)] = costs.items()
        totals["cost"] = format_cost(nano)
    else:
        totals["cost"] = totals["currency"] = None
    return totals


@dataclasses.dataclass(slots=True)
class _Used:
    """The key's counters over all deployments in this minute, day and month (UTC), as aggregated, and the
    currencies its costs this month are in."""

    windows: dict[str, dict[str, int]]
    currencies: set[str]


async def _used_now(tables: TableServiceClient, name: str, now: datetime) -> _Used:
    terms, parameters = [], {"pk": partition_key(name, now)}
    for window in _WINDOWS:
        parameters[f"{window}_lo"] = f"{window}|{period_start(window, now)}|"
        parameters[f"{window}_hi"] = f"{window}|{period_start(window, now)}|~"
        terms.append(f"( RowKey ge @{window}_lo and RowKey lt @{window}_hi )")  # the SDK needs the spaces
    used = _Used({window: {} for window in _WINDOWS}, set())
    table = tables.get_table_client(USAGE_TABLE)
    try:
        async for entity in table.query_entities(f"PartitionKey eq @pk and ( {' or '.join(terms)} )",
                                                 parameters=parameters):
            sums = used.windows[str(entity["RowKey"]).split("|", 1)[0]]
            for column, value in entity.items():
                number = value.value if isinstance(value, EntityProperty) else value
                if isinstance(number, int) and not isinstance(number, bool):
                    sums[column] = sums.get(column, 0) + number
            if entity.get(CURRENCY_COLUMN):
                used.currencies.add(str(entity[CURRENCY_COLUMN]))
    except ResourceNotFoundError:  # no usage table yet: nothing used
        pass
    return used


def _limits_state(record: KeyRecord, used: _Used, now: datetime) -> tuple[dict[str, Any], dict[str, Any]]:
    """The quotas and the money budgets: every field of the key's ``Limits``, whatever they are.

    Each gets ``limit`` (``None``: not set) and ``window``; a ``<unit>_per_<window>`` limit whose unit the usage
    table counts also gets ``used`` in the current window and when that ``resets``. A money limit
    (``<name>_nano_per_<window>``, in nano-units) is a budget: shown as ``<name>_per_<window>`` in currency units
    (decimal strings, as costs are) with the ``currency`` its costs are counted in.
    """
    quota: dict[str, Any] = {}
    budget: dict[str, Any] = {}
    for field in dataclasses.fields(record.limits):
        limit = getattr(record.limits, field.name)
        unit, _, window = field.name.partition("_per_")
        money = unit.endswith("_nano")
        column = COST_COLUMN if money else _USED_COLUMN.get(unit)
        entry: dict[str, Any] = {"limit": limit, "window": window or None}
        if window in used.windows and column is not None:
            entry["used"] = used.windows[window].get(column, 0)
            entry["resets"] = _window_end(window, now).isoformat(timespec="seconds")
        if money:
            entry.update({name: format_cost(entry[name]) for name in ("limit", "used")
                          if isinstance(entry.get(name), int)})
            entry["currency"] = next(iter(used.currencies)) if len(used.currencies) == 1 else None
            budget[f"{unit.removesuffix('_nano')}_per_{window}"] = entry
        else:
            quota[field.name] = entry
    return quota, budget


def _window_end(window: str, now: datetime) -> datetime:
    day = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if window == "minute":
        return now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    if window == "day":
        return day + timedelta(days=1)
    return (day.replace(day=1) + timedelta(days=32)).replace(day=1)
