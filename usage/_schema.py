"""Row layout of the ``usage`` table (documented in the README for readers without our code).

PartitionKey ``<YYYY-MM>|<key name>``: one key's month. RowKeys in it:

- ``month|<YYYY-MM>|<deployment>``, ``day|<YYYY-MM-DD>|<deployment>``,
  ``hour|<YYYY-MM-DDTHH>|<deployment>``, ``minute|<YYYY-MM-DDTHH:MM>|<deployment>``: counters
  (``Requests``, ``PromptTokens``, ``CompletionTokens``, ``TotalTokens``, ``CachedTokens``,
  ``ReasoningTokens``, ``EstimatedTokens``), cost (``CostNano``: nano-units, 10⁻⁹ of ``Currency``, of the
  requests priced by ``PRICES``; ``UnpricedRequests``: requests no price was in force for, left out of
  ``CostNano``; ``Currency``: empty until a priced request is counted) and, for people, ``Key``,
  ``Deployment``, ``Period``, ``Start``;
- ``ledger|<YYYY-MM-DDTHH:MM>|<uuid>``: ``Ids``, the comma-separated event ids counted by one
  transaction, for events of that minute. Written in the same transaction as the counters.
"""

from __future__ import annotations

from datetime import datetime

USAGE_TABLE = "usage"
REJECTS_TABLE = "usagerejects"
PERIODS = ("month", "day", "hour", "minute")
COUNTERS = ("Requests", "PromptTokens", "CompletionTokens", "TotalTokens", "CachedTokens", "ReasoningTokens",
            "EstimatedTokens")
COST_COUNTERS = ("CostNano", "UnpricedRequests")


def partition_key(key_name: str, when: datetime) -> str:
    return f"{when:%Y-%m}|{key_name}"


_PERIOD_LENGTH = {"month": 7, "day": 10, "hour": 13, "minute": 16}  # of "YYYY-MM-DDTHH:MM"


def period_start(period: str, when: datetime) -> str:
    """``when``'s period as the row keys spell it: ``2026-11``, ``2026-11-30``, ``2026-11-30T08``, ``…T08:15``."""
    return when.isoformat()[:_PERIOD_LENGTH[period]]


def month_partitions(month: str, key_name: str | None) -> tuple[str, dict[str, str]]:
    """A filter on ``month``'s partitions (``YYYY-MM``): ``key_name``'s one, or every key's; and its parameters."""
    if key_name is not None:
        return "PartitionKey eq @pk", {"pk": f"{month}|{key_name}"}
    return "PartitionKey ge @pk_lo and PartitionKey lt @pk_hi", {"pk_lo": f"{month}|", "pk_hi": f"{month}}}"}
    # '}' sorts right after '|': the range holds every "<month>|<key>"


def counter_row(period: str, when: datetime, deployment: str) -> str:
    return f"{period}|{period_start(period, when)}|{deployment}"


def ledger_prefix(when: datetime) -> str:
    return f"ledger|{period_start('minute', when)}|"
