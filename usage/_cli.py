"""``python -m usage``: manage subscription keys and their quotas, report usage and cost, monthly statements,
read content records."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import re
import sys
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any, TextIO

from azure.core.exceptions import AzureError
from azure.data.tables.aio import TableServiceClient
from azure.identity.aio import DefaultAzureCredential

from usage import _replay
from usage._config import CONTENT_LOG_SETTING, SettingsError, load_blob_config, load_storage_config, read_environment
from usage._content import open_blob_service, read_records, render_records
from usage._keys import KeyRecord, KeyStore, KeyStoreError, Limits, checked_scope, iso_moment
from usage._prices import format_cost, load_prices
from usage._report import GROUPS, group, read_days, render
from usage._statement import is_month, render_statement, statement_rows
from usage._tables import open_table_service

log = logging.getLogger(__name__)
_LIMITS = (("tokens_per_minute", "--tokens-per-minute"), ("tokens_per_day", "--tokens-per-day"),
           ("tokens_per_month", "--tokens-per-month"), ("requests_per_minute", "--requests-per-minute"),
           ("budget_nano_per_month", "--budget-per-month"))
_NANO = 10**9
#: limits are stored as Table Storage Int64 (a budget in nano-units): larger ones are refused when parsed
_INT64_MAX = 2**63 - 1
_MAX_BUDGET = Decimal(_INT64_MAX) / _NANO  # exact: 9223372036.854775807
_NANO_UNIT = Decimal("1e-9")


def _limit(value: str) -> int | None:
    if value.lower() == "none":
        return None
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number (or 'none')") from None
    if number < 0:
        raise argparse.ArgumentTypeError("a quota cannot be negative")
    if number > _INT64_MAX:
        raise argparse.ArgumentTypeError(f"a quota must be at most {_INT64_MAX} (Table Storage's Int64)")
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
    if amount > _MAX_BUDGET:  # before scaling it: a huge exponent would overflow the decimal context
        raise argparse.ArgumentTypeError(f"a budget must be at most {_MAX_BUDGET} (Int64 nano-units)")
    whole = amount.quantize(_NANO_UNIT)  # exact for any amount up to the cap; a tiny one does not underflow to 0
    if whole != amount:
        raise argparse.ArgumentTypeError(f"{value!r} has more than 9 decimal places")
    return int(whole.scaleb(9))


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


#: a fraction (of the part before it): Python reads one after hours or minutes as seconds, and cuts finer ones
_FRACTION = re.compile(r"[.,](\d*)")
#: what a fraction may follow: seconds, in extended (18:00:00) or basic (T180000) form
_SECONDS = re.compile(r"(?:\d{2}:\d{2}:\d{2}|\D\d{6})$")


def _moment(value: str) -> datetime:
    """``--expires``: an ISO 8601 date (00:00 UTC that day) or date-time (UTC unless it gives an offset), in the
    forms ``datetime.fromisoformat`` reads, letters in either case; a fraction of a second to the microsecond."""
    text = value.strip().upper()  # 2026-12-31t18:00:00z is 2026-12-31T18:00:00Z
    for fraction in _FRACTION.finditer(text):
        if not _SECONDS.search(text, 0, fraction.start()):
            raise argparse.ArgumentTypeError(
                f"{value!r}: only seconds may have a fraction (write 18:30:00, not 18.5 or 18:29.5)")
        if len(fraction.group(1)) > 6:
            raise argparse.ArgumentTypeError(
                f"{value!r}: a fraction of a second may have at most 6 digits (microseconds)")
    moment: datetime | None
    try:
        moment = datetime.fromisoformat(text)
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (ValueError, OverflowError):
        moment = None
    if moment is None or moment.year < 1601:  # Table Storage's DateTime starts in 1601
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an ISO 8601 date or date-time like 2026-12-31 or 2026-12-31T18:00:00Z")
    return moment


def _expiry(value: str) -> datetime | None:
    return None if value.strip().lower() == "none" else _moment(value)


#: words a scope cannot name as deployments: ``all`` alone means every deployment; ``none`` would scope a key to
#: a deployment so named rather than to nothing, so it is refused
_SCOPE_WORDS = ("all", "none")


def _scope(value: str) -> frozenset[str] | None:
    """A scope (``create --deployments``, ``set-scope``): the deployment names, checked; ``all``: every one (None)."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if [name.lower() for name in names] == ["all"]:
        return None
    if any(name.lower() in _SCOPE_WORDS for name in names):
        raise argparse.ArgumentTypeError(
            f"{value.strip()!r} is not a scope: give deployment names (a,b), or 'all' alone for every deployment "
            "('all' and 'none' cannot be deployment names here; to stop a key, revoke it)")
    try:
        return checked_scope(names)
    except KeyStoreError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _hours(value: str) -> float:
    try:
        hours = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of hours") from None
    if not 0 <= hours <= MAX_GRACE_HOURS:  # NaN too
        raise argparse.ArgumentTypeError(f"the grace period must be 0 to {MAX_GRACE_HOURS:g} hours")
    return hours


_EXPIRES_HELP = ("when the key stops working: an ISO 8601 date (meaning 00:00 UTC that day) or date-time "
                 "(UTC unless it has an offset), e.g. 2026-12-31 or 2026-12-31T18:00:00+01:00")
DEFAULT_GRACE_HOURS = 24.0
MAX_GRACE_HOURS = 8760.0  # a year


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m usage", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    keys = commands.add_parser("keys", help="manage subscription keys and quotas")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True, help="the team or app the key is for")
    create.add_argument("--log-content", action="store_true",
                        help="record this key's prompts and completions (where CONTENT_LOG is set)")
    create.add_argument("--deployments", type=_scope, metavar="A,B|all",
                        help="the only deployments the key may call (exact names, comma-separated); default and "
                        "'all': every deployment")
    create.add_argument("--expires", type=_moment, metavar="WHEN", help=_EXPIRES_HELP)
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
    revoke = actions.add_parser("revoke", help="disable a key, and the one it replaced if still in its grace "
                                "period (gateways notice within KEY_CACHE_SECONDS)")
    revoke.add_argument("name")
    rotate = actions.add_parser("rotate", help="issue a new key for a name and print it once; the current key keeps "
                                "working for the grace period")
    rotate.add_argument("name")
    rotate.add_argument("--grace", type=_hours, default=DEFAULT_GRACE_HOURS, metavar="HOURS",
                        help=f"hours the current key keeps working (default {DEFAULT_GRACE_HOURS:g}; 0: it stops "
                        "as a revoked key does); a key replaced by an earlier rotation stops at once")
    rotate.add_argument("--json", action="store_true", help='print {"name", "key"}')
    scope = actions.add_parser("set-scope", help="change the deployments a key may call (gateways notice within "
                               "KEY_CACHE_SECONDS)")
    scope.add_argument("name")
    scope.add_argument("deployments", type=_scope, metavar="A,B|all")
    expiry = actions.add_parser("set-expiry", help="change when a key stops working ('none': never)")
    expiry.add_argument("name")
    expiry.add_argument("expires", type=_expiry, metavar="WHEN|none", help=_EXPIRES_HELP)
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


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else iso_moment(moment)


def _state(record: KeyRecord, now: datetime) -> str:
    if not record.enabled:
        return "revoked"
    return "expired" if record.expires_at is not None and record.expires_at <= now else "enabled"


def _previous_until(record: KeyRecord, now: datetime) -> datetime | None:
    """Until when the key a rotation replaced still works, while it does."""
    until = record.previous_until
    if until is None or until <= now or not record.enabled:
        return None
    return until if record.expires_at is None else min(until, record.expires_at)


def _describe(record: KeyRecord, now: datetime | None = None) -> dict[str, Any]:
    now = now or datetime.now(UTC)
    return {"name": record.name, "enabled": record.enabled, "created_at": record.created_at.isoformat(),
            **_limits_json(record.limits), "log_content": record.log_content,
            "state": _state(record, now),
            "deployments": None if record.deployments is None else sorted(record.deployments),
            "expires_at": _iso(record.expires_at),
            "previous_key_valid_until": _iso(_previous_until(record, now))}


def _access_text(record: KeyRecord, now: datetime) -> tuple[str, str, str]:
    """The scope, expiry and rotation columns of ``keys list``."""
    scope = "all" if record.deployments is None else ",".join(sorted(record.deployments))
    expires = _iso(record.expires_at) or "never"
    previous = _previous_until(record, now)
    return scope, expires, "-" if previous is None else f"previous key valid until {_iso(previous)}"


def _warn_past(expires: datetime | None) -> None:
    if expires is not None and expires <= datetime.now(UTC):
        print(f"warning: {_iso(expires)} is in the past: the key does not work", file=sys.stderr)


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
        key = await store.create(args.name, limits=limits, log_content=args.log_content,
                                 deployments=args.deployments, expires_at=args.expires)
        _warn_past(args.expires)
        if args.json:
            print(json.dumps({"name": args.name, "key": key, **_limits_json(limits),
                              "log_content": args.log_content,
                              "deployments": None if args.deployments is None else sorted(args.deployments),
                              "expires_at": _iso(args.expires)}), file=out)
        else:
            logged = ", content logged" if args.log_content else ""
            scope = "" if args.deployments is None else f", deployments {','.join(sorted(args.deployments))}"
            expires = "" if args.expires is None else f", expires {_iso(args.expires)}"
            print(f"Created key for {args.name} ({_quota_text(limits)}{logged}{scope}{expires}). It is shown once; "
                  f"store it now:\n{key}", file=out)
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
        now = datetime.now(UTC)
        if args.json:
            print(json.dumps([_describe(r, now) for r in records]), file=out)
        else:
            print(f"{'NAME':<32} {'STATE':<8} {'CREATED':<20} {'CONTENT':<8} {'QUOTAS':<24} {'DEPLOYMENTS':<24} "
                  f"{'EXPIRES':<20} ROTATION", file=out)
            for record in records:
                logged = "logged" if record.log_content else "-"
                scope, expires, rotation = _access_text(record, now)
                print(f"{record.name:<32} {_state(record, now):<8} {record.created_at:%Y-%m-%d %H:%M:%SZ} "
                      f"{logged:<8} {_quota_text(record.limits):<24} {scope:<24} {expires:<20} {rotation}", file=out)
    elif args.action == "revoke":
        await store.revoke(args.name)
        print(f"Revoked {args.name}", file=out)
    elif args.action == "rotate":
        key = await store.rotate(args.name, grace=timedelta(hours=args.grace))
        record = await store.get(args.name)
        _warn_past(record.expires_at)  # carried over from the replaced key: set-expiry changes it
        if args.json:
            print(json.dumps({"name": args.name, "key": key}), file=out)
        else:
            until = _previous_until(record, datetime.now(UTC))
            previous = "stops working now" if until is None else f"keeps working until {_iso(until)}"
            print(f"Rotated key of {args.name}; the previous key {previous}. The new key is shown once; "
                  f"store it now:\n{key}", file=out)
    elif args.action == "set-scope":
        await store.set_scope(args.name, args.deployments)
        scope = "all" if args.deployments is None else ",".join(sorted(args.deployments))
        print(f"Deployments of {args.name}: {scope}", file=out)
    elif args.action == "set-expiry":
        await store.set_expiry(args.name, args.expires)
        _warn_past(args.expires)
        print(f"Key {args.name} expires: {_iso(args.expires) or 'never'}", file=out)
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
    except BrokenPipeError:  # `... | head`: the reader has what it wanted; no traceback, no flush error at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
