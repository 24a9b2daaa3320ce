"""``python -m usage rejects list|replay``: the messages the aggregator could not count, and counting them after
a fix.

``replay`` hands each chosen reject's body, with its message id, to the aggregator (the same code as the queue
trigger, exactly once per event id): an event counted now, or already counted, has its reject row removed; one
that is still malformed is rejected again (its row rewritten, so the conditional delete leaves it). Replay goes
straight to Table Storage rather than back through Service Bus: the command has the table access anyway, the
outcome is known at once, and the queue's duplicate detection would drop a re-sent message id within its window.
A reject whose stored body is not the whole message (cut at 16,384 characters, or with escaped bytes) cannot be
replayed; ``list`` says which.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TextIO

from azure.core import MatchConditions
from azure.core.exceptions import ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import TableEntity
from azure.data.tables.aio import TableServiceClient

from usage._aggregate import Aggregator
from usage._prices import Prices
from usage._schema import REJECTS_TABLE
from usage._tables import as_int

_PREFIX = 8  # the shortest row-key prefix replay accepts


class RejectsError(Exception):
    """The rejects to replay were not named, or a name matches none or several."""


@dataclass(frozen=True, slots=True)
class Reject:
    row_key: str
    partition_key: str
    message_id: str
    reason: str
    body: str
    body_bytes: int
    rejected_at: datetime | None
    etag: str
    body_sha256: str

    @property
    def replayable(self) -> bool:
        """The stored body is the whole message, byte for byte."""
        raw = self.body.encode("utf-8", "surrogatepass")
        return len(raw) == self.body_bytes and self.body_sha256 == hashlib.sha256(raw).hexdigest()


def _reject(entity: TableEntity) -> Reject:
    at = entity.get("RejectedAt")
    return Reject(
        row_key=str(entity["RowKey"]), partition_key=str(entity["PartitionKey"]),
        message_id=str(entity.get("MessageId") or ""), reason=str(entity.get("Reason") or ""),
        body=str(entity.get("Body") or ""), body_bytes=as_int(entity.get("BodyBytes")),
        rejected_at=at if isinstance(at, datetime) else None, etag=str(entity.metadata["etag"]),
        body_sha256=str(entity.get("BodySha256") or ""))


async def read_rejects(service: TableServiceClient) -> list[Reject]:
    """Every reject row, oldest first."""
    table = service.get_table_client(REJECTS_TABLE)
    try:
        rejects = [_reject(entity) async for entity in table.list_entities()]
    except ResourceNotFoundError:
        return []
    return sorted(rejects, key=lambda r: (r.rejected_at is None, r.rejected_at or datetime.min, r.row_key))


def _choose(rejects: list[Reject], ids: Sequence[str], everything: bool) -> list[Reject]:
    if everything:
        return rejects
    chosen: list[Reject] = []
    for wanted in ids:
        if len(wanted) < _PREFIX:
            raise RejectsError(f"reject id {wanted!r} is too short: give at least {_PREFIX} characters")
        found = [r for r in rejects if r.row_key.startswith(wanted.lower())]
        if len(found) != 1:
            raise RejectsError(f"reject id {wanted!r} matches {len(found)} rejects")
        chosen.extend(found)
    return chosen


@dataclass(frozen=True, slots=True)
class ReplayResult:
    replayed: int  # counted now or already counted: their rows are gone
    still_rejected: list[Reject]
    not_replayable: list[Reject]


async def replay_rejects(service: TableServiceClient, chosen: list[Reject], *,
                         prices: Prices | None = None) -> ReplayResult:
    """Count ``chosen`` through the aggregator (priced by ``prices``); remove the rows of those it no longer rejects."""
    replayable = [r for r in chosen if r.replayable]
    aggregator = Aggregator(service, prices=prices)
    if replayable:
        await aggregator.aggregate([r.body.encode("utf-8", "surrogatepass") for r in replayable],
                                   message_ids=[r.message_id or None for r in replayable])
    table = service.get_table_client(REJECTS_TABLE)
    still: list[Reject] = []
    for reject in replayable:
        try:  # a reject rejected again was rewritten: its ETag changed and the row stays
            await table.delete_entity(reject.partition_key, reject.row_key, etag=reject.etag,
                                      match_condition=MatchConditions.IfNotModified)
        except ResourceModifiedError:
            still.append(reject)
        except ResourceNotFoundError:
            pass  # someone else removed it
    return ReplayResult(len(replayable) - len(still), still, [r for r in chosen if not r.replayable])


def add_commands(commands: Any) -> None:
    """``rejects list`` and ``rejects replay`` under ``python -m usage``."""
    rejects = commands.add_parser("rejects", help="usage messages the aggregator could not count")
    actions = rejects.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the rejected messages, oldest first")
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    replay = actions.add_parser("replay", help="count rejected messages again (after a fix); removes those counted")
    replay.add_argument("ids", nargs="*", metavar="ID", help="reject ids (or unique prefixes of 8+) from list")
    replay.add_argument("--all", action="store_true", help="every reject")


def _describe(reject: Reject) -> dict[str, Any]:
    return {"id": reject.row_key, "message_id": reject.message_id, "reason": reject.reason,
            "rejected_at": None if reject.rejected_at is None else reject.rejected_at.isoformat(),
            "body_bytes": reject.body_bytes, "replayable": reject.replayable, "body": reject.body}


async def run(service: TableServiceClient, args: argparse.Namespace, out: TextIO, *,
              prices: Prices | None = None) -> int:
    rejects = await read_rejects(service)
    if args.action == "list":
        if args.json:
            print(json.dumps([_describe(r) for r in rejects]), file=out)
            return 0
        print(f"{'ID':<12} {'REJECTED':<20} {'MESSAGE':<34} {'BYTES':>7} REPLAYABLE REASON", file=out)
        for r in rejects:
            when = "" if r.rejected_at is None else f"{r.rejected_at:%Y-%m-%d %H:%M:%SZ}"
            print(f"{r.row_key[:12]:<12} {when:<20} {r.message_id[:34]:<34} {r.body_bytes:>7} "
                  f"{'yes' if r.replayable else 'no':<10} {r.reason[:120]}", file=out)
        print(f"{len(rejects)} reject(s)", file=out)
        return 0
    if not args.all and not args.ids:
        raise RejectsError("name the rejects to replay (ids from `rejects list`), or give --all")
    result = await replay_rejects(service, _choose(rejects, args.ids, args.all), prices=prices)
    print(f"replayed {result.replayed}: counted, or found already counted; their rejects are removed", file=out)
    for reject in result.still_rejected:
        print(f"still rejected {reject.row_key[:12]}: see `rejects list` for the reason", file=out)
    for reject in result.not_replayable:
        print(f"not replayable {reject.row_key[:12]}: the stored body is not the whole message", file=out)
    return 1 if result.still_rejected or result.not_replayable else 0
