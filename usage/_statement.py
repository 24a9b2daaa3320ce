"""Monthly statements: one row per key and deployment for a month, with its cost, read from the month rows.

A month row is updated in the same transaction as its day rows, so a statement's totals equal the
report's (``read_days`` over the month's days) to the nano-unit.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from azure.data.tables.aio import TableServiceClient

from usage._prices import format_cost
from usage._report import as_csv, as_table, totals
from usage._schema import USAGE_TABLE, month_partitions
from usage._tables import as_int

#: a statement row's fields, in order (JSON objects, CSV columns, table columns)
STATEMENT_FIELDS = ("key", "deployment", "requests", "prompt_tokens", "cached_tokens", "completion_tokens",
                    "reasoning_tokens", "total_tokens", "cost", "currency", "unpriced_requests")
_MONTH = re.compile(r"([0-9]{4})-(0[1-9]|1[0-2])")  # ASCII digits only (\d takes "２０２６" too)
_COLUMNS = (("requests", "Requests"), ("prompt_tokens", "PromptTokens"), ("cached_tokens", "CachedTokens"),
            ("completion_tokens", "CompletionTokens"), ("reasoning_tokens", "ReasoningTokens"),
            ("total_tokens", "TotalTokens"))
_COUNTS = tuple(name for name, _ in _COLUMNS)


def is_month(text: str) -> bool:
    """``YYYY-MM``, a month from 2000 on (the years a usage event may have)."""
    match = _MONTH.fullmatch(text)
    return match is not None and 2000 <= int(match.group(1)) <= 2200


@dataclass(frozen=True, slots=True)
class StatementRow:
    """A key's usage of one deployment over one month (UTC)."""

    key: str  # the key's name
    deployment: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    total_tokens: int
    cost_nano: int  # nano-units (10⁻⁹) of ``currency``, of the requests that had a price
    currency: str | None  # ``None``: no request had a price
    unpriced_requests: int  # requests with no price in force, left out of the cost

    def as_json(self) -> dict[str, Any]:
        """The row as the statement's JSON gives it: ``cost`` a decimal string in currency units."""
        return {"key": self.key, "deployment": self.deployment, "requests": self.requests,
                "prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "completion_tokens": self.completion_tokens, "reasoning_tokens": self.reasoning_tokens,
                "total_tokens": self.total_tokens, "cost": format_cost(self.cost_nano), "currency": self.currency,
                "unpriced_requests": self.unpriced_requests}


async def statement_rows(service: TableServiceClient, *, month: str, key: str | None = None) -> list[StatementRow]:
    """The month's statement (``YYYY-MM``, UTC): every key's, or ``key``'s only; by key, then deployment."""
    if not is_month(month):
        raise ValueError(f"{month!r} is not a month like 2026-11")
    table = service.get_table_client(USAGE_TABLE)
    parameters: dict[str, Any] = {"lo": f"month|{month}|", "hi": f"month|{month}|~"}
    where, partitions = month_partitions(month, key)
    parameters.update(partitions)
    rows: list[StatementRow] = []
    try:
        async for entity in table.query_entities(f"{where} and RowKey ge @lo and RowKey lt @hi",
                                                 parameters=parameters):
            rows.append(StatementRow(
                key=str(entity["PartitionKey"]).split("|", 1)[1], deployment=str(entity["RowKey"]).split("|", 2)[2],
                **{name: as_int(entity.get(column)) for name, column in _COLUMNS},
                cost_nano=as_int(entity.get("CostNano")), currency=str(entity.get("Currency") or "") or None,
                unpriced_requests=as_int(entity.get("UnpricedRequests"))))
    except ResourceNotFoundError:
        return []
    return sorted(rows, key=lambda r: (r.key, r.deployment))


def render_statement(rows: list[StatementRow], form: str, month: str) -> str:
    """The statement as a table (with a TOTAL per currency), CSV or JSON (a list of rows)."""
    documents = [row.as_json() for row in rows]
    if form == "json":
        return json.dumps(documents, indent=2)
    if form == "csv":
        return as_csv(documents, list(STATEMENT_FIELDS))
    if not rows:
        return f"no usage in {month}"
    label = {"key": "TOTAL", "deployment": ""}
    table = as_table(documents, list(STATEMENT_FIELDS), totals(documents, label, _COUNTS), labels=2)
    return f"Statement for {month} (UTC)\n{table}"
