"""``python -m usage``: manage subscription keys and their quotas, report usage and cost, monthly statements,
read content records."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any, TextIO

from azure.core.exceptions import AzureError
from azure.data.tables.aio import TableServiceClient
from azure.identity.aio import DefaultAzureCredential

from usage import _replay
from usage._config import CONTENT_LOG_SETTING, SettingsError, load_blob_config, load_storage_config, read_environment
from usage._content import open_blob_service, read_records, render_records
from usage._keys import KeyRecord, KeyStore, KeyStoreError, Limits
from usage._prices import format_cost, load_prices
from usage._report import GROUPS, group, read_days, render
from usage._statement import is_month, render_statement, statement_rows
from usage._tables import open_table_service

log = logging.getLogger(__name__)
_LIMITS = (("tokens_per_minute", "--tokens-per-minute"), ("tokens_per_day", "--tokens-per-day"),
           ("tokens_per_month", "--tokens-per-month"), ("requests_per_minute", "--requests-per-minute"),
           ("budget_nano_per_month", "--budget-per-month"))
_NANO = 10**9


def _limit(value: str) -> int | None:
    if value.lower() == "none":
        return None
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number (or 'none')") from None
    if number < 0:
        raise argparse.ArgumentTypeError("a quota cannot be negative")
    return number


def _money(value: str) -> int | None:
    """An amount of currency (``12.50``, at most 9 decimals) as nano-units; ``none`` for no budget."""
    if value.lower() == "none":
        return None
    try:
        amount = Decimal(value)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"{value!r} is not an amount like 250 or 12.50 (or 'none')") from None
    if not amount.is_finite() or amount < 0:
        raise argparse.ArgumentTypeError("a budget is an amount of at least 0")
    nano = amount * _NANO
    if nano != nano.to_integral_value():
        raise argparse.ArgumentTypeError(f"{value!r} has more than 9 decimal places")
    return int(nano)


def _amount(nano: int) -> str:
    """Nano-units as a decimal string in currency units (``12.50``)."""
    return format_cost(nano)


def _day(value: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a date like 2026-11-29") from None


def _month(value: str) -> str:
    if not is_month(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a month like 2026-11")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m usage", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    keys = commands.add_parser("keys", help="manage subscription keys and quotas")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True, help="the team or app the key is for")
    create.add_argument("--log-content", action="store_true",
                        help="record this key's prompts and completions (where CONTENT_LOG is set)")
    set_quota = actions.add_parser("set-quota", help="change a key's quotas and budget ('none' removes one)")
    set_quota.add_argument("name")
    for command in (create, set_quota):
        for dest, flag in _LIMITS:
            if dest == "budget_nano_per_month":
                command.add_argument(flag, dest=dest, type=_money, default=argparse.SUPPRESS, metavar="AMOUNT",
                                     help="money per UTC month, in the currency of PRICES (e.g. 250 or 12.50)")
            else:
                command.add_argument(flag, dest=dest, type=_limit, default=argparse.SUPPRESS, metavar="N",
                                     help=f"{flag[2:].replace('-', ' ')} (UTC windows)")
        command.add_argument("--json", action="store_true", help="print one JSON object")
    listing = actions.add_parser("list", help="list keys: names, state, quotas (never the keys)")
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    revoke = actions.add_parser("revoke", help="disable a key (gateways notice within KEY_CACHE_SECONDS)")
    revoke.add_argument("name")
    logging_ = actions.add_parser("set-logging", help="turn content logging of a key on or off "
                                  "(gateways notice within KEY_CACHE_SECONDS)")
    logging_.add_argument("name")
    logging_.add_argument("state", choices=("on", "off"))
    report = commands.add_parser("report", help="usage over a date range, grouped, as table/csv/json/chart")
    report.add_argument("--key", help="only this key (team)")
    report.add_argument("--deployment", help="only this deployment")
    today = datetime.now(UTC).date()
    report.add_argument("--since", type=_day, default=today.replace(day=1), metavar="YYYY-MM-DD",
                        help="first day (UTC, default: the 1st of this month)")
    report.add_argument("--until", type=_day, default=today, metavar="YYYY-MM-DD",
                        help="last day, included (UTC, default: today)")
    report.add_argument("--by", choices=GROUPS, default="key")
    report.add_argument("--format", choices=("table", "csv", "json", "chart"), default="table",
                        help="chart: bars of total tokens, e.g. with --by day for usage over time")
    statement = commands.add_parser("statement", help="a month's tokens and cost per key and deployment "
                                    "(for chargeback), as table/csv/json")
    statement.add_argument("--month", type=_month, default=f"{today:%Y-%m}", metavar="YYYY-MM",
                           help="the month (UTC, default: this month)")
    statement.add_argument("--key", help="only this key (team)")
    statement.add_argument("--format", choices=("table", "csv", "json"), default="table")
    content = commands.add_parser("content", help="a key's recorded prompts and completions (CONTENT_LOG)")
    content.add_argument("--key", required=True, help="the key (team) whose records to read")
    content.add_argument("--since", type=_day, default=today, metavar="YYYY-MM-DD",
                         help="first day of arrival (UTC, default: today)")
    content.add_argument("--until", type=_day, default=today, metavar="YYYY-MM-DD",
                         help="last day, included (UTC, default: today)")
    content.add_argument("--request-id", help="only this request (its x-gateway-request-id)")
    content.add_argument("--format", choices=("jsonl", "table"), default="jsonl")
    _replay.add_commands(commands)
    return parser


def _limits_json(limits: Limits) -> dict[str, Any]:
    budget = limits.budget_nano_per_month
    return {"tokens_per_minute": limits.tokens_per_minute, "tokens_per_day": limits.tokens_per_day,
            "tokens_per_month": limits.tokens_per_month, "requests_per_minute": limits.requests_per_minute,
            "budget_per_month": None if budget is None else _amount(budget)}


def _describe(record: KeyRecord) -> dict[str, Any]:
    return {"name": record.name, "enabled": record.enabled, "created_at": record.created_at.isoformat(),
            **_limits_json(record.limits), "log_content": record.log_content}


def _quota_text(limits: Limits) -> str:
    parts = [f"{value}/{unit}" for value, unit in ((limits.tokens_per_minute, "min"), (limits.tokens_per_day, "day"),
                                                   (limits.tokens_per_month, "month")) if value is not None]
    if limits.requests_per_minute is not None:
        parts.append(f"{limits.requests_per_minute} requests/min")
    if limits.budget_nano_per_month is not None:
        parts.append(f"budget {_amount(limits.budget_nano_per_month)}/month")
    return ", ".join(parts) or "unlimited"


async def _keys(store: KeyStore, args: argparse.Namespace, out: TextIO) -> None:
    if args.action == "create":
        limits = Limits(**{dest: getattr(args, dest) for dest, _ in _LIMITS if hasattr(args, dest)})
        key = await store.create(args.name, limits=limits, log_content=args.log_content)
        if args.json:
            print(json.dumps({"name": args.name, "key": key, **_limits_json(limits),
                              "log_content": args.log_content}), file=out)
        else:
            logged = ", content logged" if args.log_content else ""
            print(f"Created key for {args.name} ({_quota_text(limits)}{logged}). It is shown once; store it now:\n"
                  f"{key}", file=out)
    elif args.action == "set-quota":
        current = (await store.get(args.name)).limits
        changes = {dest: getattr(args, dest) for dest, _ in _LIMITS if hasattr(args, dest)}
        limits = Limits(**{dest: changes.get(dest, getattr(current, dest)) for dest, _ in _LIMITS})
        await store.set_limits(args.name, limits)
        if args.json:
            print(json.dumps(_describe(await store.get(args.name))), file=out)
        else:
            print(f"Quotas of {args.name}: {_quota_text(limits)}", file=out)
    elif args.action == "list":
        records = await store.list()
        if args.json:
            print(json.dumps([_describe(r) for r in records]), file=out)
        else:
            print(f"{'NAME':<32} {'STATE':<8} {'CREATED':<20} {'CONTENT':<8} QUOTAS", file=out)
            for record in records:
                state = "enabled" if record.enabled else "revoked"
                logged = "logged" if record.log_content else "-"
                print(f"{record.name:<32} {state:<8} {record.created_at:%Y-%m-%d %H:%M:%SZ} {logged:<8} "
                      f"{_quota_text(record.limits)}", file=out)
    elif args.action == "revoke":
        await store.revoke(args.name)
        print(f"Revoked {args.name}", file=out)
    elif args.action == "set-logging":
        await store.set_logging(args.name, on=args.state == "on")
        print(f"Content logging of {args.name}: {args.state}", file=out)


def _progress(message: str) -> None:  # on stderr, so stdout stays clean for csv and json
    print(f"  .. {message}", file=sys.stderr, flush=True)


async def _report(service: TableServiceClient, args: argparse.Namespace, out: TextIO) -> None:
    days = await read_days(service, since=args.since, until=args.until, key=args.key, deployment=args.deployment,
                           progress=_progress)
    print(render(group(days, args.by), args.by, args.format), file=out)


async def _statement(service: TableServiceClient, args: argparse.Namespace, out: TextIO) -> None:
    rows = await statement_rows(service, month=args.month, key=args.key)
    print(render_statement(rows, args.format, args.month), file=out)


async def _content(env: dict[str, str], args: argparse.Namespace, out: TextIO) -> int:
    config = load_blob_config(env)
    if config is None:
        raise SettingsError(CONTENT_LOG_SETTING, f"is not set (give a connection string, or "
                            f"{CONTENT_LOG_SETTING}__blobServiceUri)")
    credential = DefaultAzureCredential() if config.uses_identity else None
    try:
        async with open_blob_service(config, credential=credential) as service:
            records = await read_records(service, key=args.key, since=args.since, until=args.until,
                                         request_id=args.request_id, progress=_progress)
    finally:
        if credential is not None:
            await credential.close()
    _progress(f"{len(records)} record(s)")
    if records or args.format == "table":
        print(render_records(records, args.format), file=out)
    return 0


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    env = read_environment()
    if args.command == "content":
        return await _content(env, args, out)
    config = load_storage_config(env)
    credential = DefaultAzureCredential() if config.uses_identity else None
    try:
        async with open_table_service(config, credential=credential) as service:
            if args.command == "rejects":
                return await _replay.run(service, args, out, prices=load_prices(env))
            if args.command == "report":
                await _report(service, args, out)
            elif args.command == "statement":
                await _statement(service, args, out)
            else:
                await _keys(KeyStore(service, secret=env.get("KEY_HASH_SECRET", "").encode()), args, out)
    finally:
        if credential is not None:
            await credential.close()
    return 0


def main(argv: Sequence[str] | None = None, *, out: TextIO = sys.stdout) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command in ("report", "content") and args.since > args.until:
        parser.error(f"--since {args.since} is after --until {args.until}")
    try:
        return asyncio.run(_run(args, out))
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except _replay.RejectsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyStoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except AzureError as exc:
        where = "Blob Storage" if args.command == "content" else "Table Storage"
        print(f"error: {where}: {type(exc).__name__}: {exc.message}", file=sys.stderr)
        return 1
