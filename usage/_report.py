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

from usage._schema import COUNTERS, USAGE_TABLE
from usage._tables import as_int

FIELDS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens", "reasoning_tokens",
          "estimated_tokens")
GROUPS = ("key", "deployment", "day", "month")


@dataclass(frozen=True, slots=True)
class DayUsage:
    key: str
    deployment: str
    day: date
    counts: tuple[int, ...]


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
        if key is not None:
            where = "PartitionKey eq @pk"
            parameters["pk"] = f"{month}|{key}"
        else:
            where = "PartitionKey ge @pk_lo and PartitionKey lt @pk_hi"
            parameters.update(pk_lo=f"{month}|", pk_hi=f"{month}}}")  # '}' sorts right after '|'
        query = f"{where} and RowKey ge @lo and RowKey lt @hi"
        if deployment is not None:
            query += " and Deployment eq @deployment"
            parameters["deployment"] = deployment
        try:
            async for entity in table.query_entities(query, parameters=parameters):
                _, day, name = str(entity["RowKey"]).split("|", 2)
                rows.append(DayUsage(str(entity["PartitionKey"]).split("|", 1)[1], name, date.fromisoformat(day),
                                     tuple(as_int(entity.get(c)) for c in COUNTERS)))
        except ResourceNotFoundError:
            return []
    return rows


def group(rows: Iterable[DayUsage], by: str) -> list[dict[str, Any]]:
    """Rows summed by ``by`` (key, deployment, day or month), each with every token field."""
    label: Callable[[DayUsage], str] = {
        "key": lambda r: r.key,
        "deployment": lambda r: r.deployment,
        "day": lambda r: r.day.isoformat(),
        "month": lambda r: f"{r.day:%Y-%m}",
    }[by]
    sums: dict[str, list[int]] = {}
    for row in rows:
        current = sums.setdefault(label(row), [0] * len(FIELDS))
        for i, value in enumerate(row.counts):
            current[i] += value
    return [{by: name, **dict(zip(FIELDS, values, strict=True))} for name, values in sorted(sums.items())]


def render(rows: list[dict[str, Any]], by: str, form: str, *, width: int = 50) -> str:
    """``rows`` as a table, CSV, JSON, or a bar chart of total tokens."""
    if form == "json":
        return json.dumps(rows, indent=2)
    if form == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=[by, *FIELDS], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue().rstrip("\n")
    if not rows:
        return "no usage in this range"
    if form == "chart":
        top = max(r["total_tokens"] for r in rows) or 1
        name_width = max(len(str(r[by])) for r in rows)
        lines = [f"total tokens by {by}"]
        for row in rows:
            full, part = divmod(row["total_tokens"] * width * 8 // top, 8)
            bar = "█" * full + ("", "▏", "▎", "▍", "▌", "▋", "▊", "▉")[part]
            lines.append(f"{row[by]!s:<{name_width}} │{bar:<{width}} {row['total_tokens']:,}")
        return "\n".join(lines)
    headers = [by, *FIELDS]
    totals = {by: "TOTAL", **{f: sum(r[f] for r in rows) for f in FIELDS}}
    cells = [[f"{r[h]:,}" if isinstance(r[h], int) else str(r[h]) for h in headers] for r in [*rows, totals]]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    line = "  ".join(h.upper().ljust(w) if i == 0 else h.upper().rjust(w) for i, (h, w) in enumerate(zip(
        headers, widths, strict=True)))
    body = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
            for row in cells]
    rule = "-" * len(line)
    return "\n".join([line, rule, *body[:-1], rule, body[-1]])
