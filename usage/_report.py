"""Usage reports for teams, read from the ``usage`` table's day rows."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables.aio import TableServiceClient

from usage._prices import format_cost, parse_amount
from usage._schema import COUNTERS, USAGE_TABLE, month_partitions
from usage._tables import as_int

FIELDS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens",
          "estimated_tokens")
#: after FIELDS in every report row: the cost in currency units (a decimal string), its currency, and the
#: requests no price was in force for (left out of the cost)
COST_FIELDS = ("cost", "currency", "unpriced_requests")
GROUPS = ("key", "deployment", "day", "month")


@dataclass(frozen=True, slots=True)
class DayUsage:
    """One day row: a key's usage of a deployment on a day (UTC)."""

    key: str
    deployment: str
    day: date
    counts: tuple[int, ...]  # FIELDS, in order
    cost_nano: int = 0  # nano-units (10⁻⁹) of ``currency``, of the requests that had a price
    currency: str | None = None  # ``None``: no request of the row had a price
    unpriced_requests: int = 0


def _months(since: date, until: date) -> list[str]:
    months = []
    current = since.replace(day=1)
    while current <= until:
        months.append(f"{current:%Y-%m}")
        current = (current + timedelta(days=32)).replace(day=1)
    return months


async def read_days(
    service: TableServiceClient,
    *,
    since: date,
    until: date,
    key: str | None = None,
    deployment: str | None = None,
    progress: Callable[[str], None] = lambda _: None,
) -> list[DayUsage]:
    """Every day row in ``[since, until]``: one partition per month for a key, a range of them for all keys."""
    table = service.get_table_client(USAGE_TABLE)
    rows: list[DayUsage] = []
    months = _months(since, until)
    for index, month in enumerate(months, 1):
        progress(f"reading {month} ({index}/{len(months)}), {len(rows)} day rows so far")
        parameters: dict[str, Any] = {"lo": f"day|{since:%Y-%m-%d}", "hi": f"day|{until:%Y-%m-%d}|~"}
        where, partitions = month_partitions(month, key)
        parameters.update(partitions)
        query = f"{where} and RowKey ge @lo and RowKey lt @hi"
        if deployment is not None:
            query += " and Deployment eq @deployment"
            parameters["deployment"] = deployment
        try:
            async for entity in table.query_entities(query, parameters=parameters):
                _, day, name = str(entity["RowKey"]).split("|", 2)
                rows.append(DayUsage(str(entity["PartitionKey"]).split("|", 1)[1], name, date.fromisoformat(day),
                                     tuple(as_int(entity.get(c)) for c in COUNTERS),
                                     cost_nano=as_int(entity.get("CostNano")),
                                     currency=str(entity.get("Currency") or "") or None,
                                     unpriced_requests=as_int(entity.get("UnpricedRequests"))))
        except ResourceNotFoundError:
            return []
    return rows


def group(rows: Iterable[DayUsage], by: str) -> list[dict[str, Any]]:
    """Rows summed by ``by`` (key, deployment, day or month), each with every token field and the cost.

    Costs in different currencies are never summed: a group with two gets a row per currency (and its
    usage that had no price, a row with currency ``None``); a group with one gets one row.
    """
    label: Callable[[DayUsage], str] = {
        "key": lambda r: r.key,
        "deployment": lambda r: r.deployment,
        "day": lambda r: r.day.isoformat(),
        "month": lambda r: f"{r.day:%Y-%m}",
    }[by]
    sums: dict[str, dict[str | None, list[int]]] = {}
    for row in rows:
        current = sums.setdefault(label(row), {}).setdefault(row.currency, [0] * (len(FIELDS) + 2))
        for i, value in enumerate((*row.counts, row.cost_nano, row.unpriced_requests)):
            current[i] += value
    out: list[dict[str, Any]] = []
    for name, by_currency in sorted(sums.items()):
        priced = [c for c in by_currency if c is not None]
        if len(priced) == 1 and None in by_currency:  # the unpriced usage joins the one currency's row
            unpriced = by_currency.pop(None)
            by_currency[priced[0]] = [a + b for a, b in zip(by_currency[priced[0]], unpriced, strict=True)]
        for currency, values in sorted(by_currency.items(), key=lambda item: item[0] or ""):
            out.append({by: name, **dict(zip(FIELDS, values, strict=False)), "cost": format_cost(values[-2]),
                        "currency": currency, "unpriced_requests": values[-1]})
    return out


def by_currency(rows: list[dict[str, Any]]) -> dict[str | None, list[dict[str, Any]]]:
    """``rows`` by their ``currency``; rows with none (unpriced usage only) join the one currency if there is one."""
    groups: dict[str | None, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["currency"], []).append(row)
    priced = [c for c in groups if c is not None]
    if len(priced) == 1 and None in groups:
        groups[priced[0]] += groups.pop(None)
    return dict(sorted(groups.items(), key=lambda item: item[0] or ""))


def totals(rows: list[dict[str, Any]], label: dict[str, str], counts: tuple[str, ...]) -> list[dict[str, Any]]:
    """A TOTAL row per currency of ``rows``: ``label``, the ``counts`` summed, the cost summed exactly."""
    out = []
    for currency, same in by_currency(rows).items():
        total: dict[str, Any] = {**label, **{f: sum(r[f] for r in same) for f in counts}}
        total.update(cost=format_cost(sum(parse_amount(r["cost"]) for r in same)), currency=currency,
                     unpriced_requests=sum(r["unpriced_requests"] for r in same))
        out.append(total)
    return out


def as_csv(rows: list[dict[str, Any]], headers: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=headers, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return out.getvalue().rstrip("\n")


def as_table(rows: list[dict[str, Any]], headers: list[str], footer: list[dict[str, Any]], *, labels: int = 1) -> str:
    """A plain-text table, the first ``labels`` columns left-aligned, ``footer`` (the totals) under a rule."""
    def cell(value: Any) -> str:
        if value is None:
            return "-"
        return f"{value:,}" if isinstance(value, int) else str(value)

    every = [*rows, *footer]
    cells = [[cell(r.get(h)) for h in headers] for r in every]
    if "cost" in headers:  # the same number of decimals down the column, so the points line up
        column = headers.index("cost")
        places = max(len(c[column].partition(".")[2]) for c in cells)
        for row, c in zip(every, cells, strict=True):
            whole, _, fraction = c[column].partition(".")
            priced = row.get("currency") is not None
            c[column] = f"{whole}.{fraction.ljust(places, '0')}" if priced else "-"  # no price: no cost, not 0
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]

    def line(values: list[str]) -> str:
        return "  ".join(v.ljust(w) if i < labels else v.rjust(w)
                         for i, (v, w) in enumerate(zip(values, widths, strict=True))).rstrip()

    head = line([h.upper() for h in headers])
    rule = "-" * len(head)
    body = [line(c) for c in cells]
    return "\n".join([head, rule, *body[:len(rows)], rule, *body[len(rows):]])


def render(rows: list[dict[str, Any]], by: str, form: str, *, width: int = 50) -> str:
    """``rows`` as a table, CSV, JSON, or a bar chart of total tokens (with each bar's cost)."""
    if form == "json":
        return json.dumps(rows, indent=2)
    headers = [by, *FIELDS, *COST_FIELDS]
    if form == "csv":
        return as_csv(rows, headers)
    if not rows:
        return "no usage in this range"
    if form == "chart":
        top = max(r["total_tokens"] for r in rows) or 1
        name_width = max(len(str(r[by])) for r in rows)
        token_width = max(len(f"{r['total_tokens']:,}") for r in rows)
        places = max(len(r["cost"].partition(".")[2]) for r in rows)
        costs = [f"{r['cost']:0<{len(r['cost'].partition('.')[0]) + 1 + places}}" for r in rows]
        cost_width = max(len(c) for c in costs)
        lines = [f"total tokens by {by}, and cost"]
        for row, cost in zip(rows, costs, strict=True):
            full, part = divmod(row["total_tokens"] * width * 8 // top, 8)
            bar = "█" * full + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[part]
            priced = f"{cost:>{cost_width}} {row['currency']}" if row["currency"] else "no price"
            if row["currency"] and row["unpriced_requests"]:
                priced += f" + {row['unpriced_requests']:,} unpriced request(s)"
            lines.append(f"{row[by]!s:<{name_width}} │{bar:<{width}} {row['total_tokens']:>{token_width},}  {priced}")
        return "\n".join(lines)
    return as_table(rows, headers, totals(rows, {by: "TOTAL"}, FIELDS))
