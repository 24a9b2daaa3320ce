"""``python -m usage``: manage subscription keys (and, later, read usage)."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from typing import TextIO

from azure.core.exceptions import AzureError
from azure.identity.aio import DefaultAzureCredential

from usage._config import SettingsError, load_storage_config, read_environment
from usage._keys import KeyError_, KeyStore
from usage._tables import open_table_service

log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m usage", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    keys = commands.add_parser("keys", help="manage subscription keys")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="create a key and print it once")
    create.add_argument("--name", required=True, help="the team or app the key is for")
    create.add_argument("--json", action="store_true", help="print one JSON object")
    listing = actions.add_parser("list", help="list keys (names and state, never the keys)")
    listing.add_argument("--json", action="store_true", help="print a JSON list")
    revoke = actions.add_parser("revoke", help="disable a key at once (gateways notice within the cache time)")
    revoke.add_argument("name")
    return parser


async def _run(args: argparse.Namespace, out: TextIO) -> int:
    env = read_environment()
    config = load_storage_config(env)
    credential = None
    if config.uses_identity:
        credential = DefaultAzureCredential()
    try:
        async with open_table_service(config, credential=credential) as service:
            store = KeyStore(service, secret=env.get("KEY_HASH_SECRET", "").encode())
            if args.action == "create":
                key = await store.create(args.name)
                if args.json:
                    print(json.dumps({"name": args.name, "key": key}), file=out)
                else:
                    print(f"Created key for {args.name} (shown once, store it now):\n{key}", file=out)
            elif args.action == "list":
                rows = await store.list()
                if args.json:
                    print(json.dumps([{"name": n, "enabled": r.enabled,
                                       "created_at": r.created_at.isoformat()} for n, r in rows]),
                          file=out)
                else:
                    print(f"{'NAME':<32} {'STATE':<8} CREATED", file=out)
                    for name, record in rows:
                        state = "enabled" if record.enabled else "revoked"
                        print(f"{name:<32} {state:<8} {record.created_at:%Y-%m-%d %H:%M:%SZ}", file=out)
            elif args.action == "revoke":
                await store.revoke(args.name)
                print(f"Revoked {args.name}", file=out)
    finally:
        if credential is not None:
            await credential.close()
    return 0


def main(argv: Sequence[str] | None = None, *, out: TextIO = sys.stdout) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = _parser().parse_args(argv)
    try:
        return asyncio.run(_run(args, out))
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyError_ as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except AzureError as exc:
        print(f"error: Table Storage: {type(exc).__name__}: {exc.message}", file=sys.stderr)
        return 1
