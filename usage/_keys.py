"""Subscription keys in Table Storage, stored only as a keyed hash.

Table ``gatewaykeys``, one partition ``keys`` so a key's two rows change in one transaction:

- ``RowKey = "hash-<hmac hex>"``: ``Name``, ``Enabled``, ``CreatedAt`` (the lookup a request makes);
- ``RowKey = "name-<name>"``: ``Hash``, ``Enabled``, ``CreatedAt`` (list, revoke, unique names).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.data.tables import TableTransactionError, TransactionOperation, UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient

from usage._tables import KEYS_TABLE

PARTITION = "keys"
KEY_PREFIX = "gw-"
KEY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: Used when ``KEY_HASH_SECRET`` is unset; keys are 256-bit random, so the hash stays one-way.
_DEFAULT_SECRET = b"aoai-gateway/subscription-key/v1"


class KeyError_(Exception):
    """A key operation the caller asked for cannot be done (unknown name, name taken)."""


@dataclass(frozen=True, slots=True)
class KeyRecord:
    name: str
    enabled: bool
    created_at: datetime


def hash_key(key: str, secret: bytes = b"") -> str:
    """The keyed hash (HMAC-SHA256) under which a subscription key is stored."""
    return hmac.new(secret or _DEFAULT_SECRET, key.encode(), hashlib.sha256).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _created(entity: dict[str, object]) -> datetime:
    value = entity.get("CreatedAt")
    return value if isinstance(value, datetime) else datetime.fromtimestamp(0, UTC)


class KeyStore:
    """Creates, lists, revokes and looks up subscription keys (the table must exist for writes)."""

    def __init__(self, service: TableServiceClient, *, secret: bytes = b"") -> None:
        self._table: TableClient = service.get_table_client(KEYS_TABLE)
        self._service = service
        self._secret = secret

    async def ensure_table(self) -> None:
        with contextlib.suppress(ResourceExistsError):
            await self._service.create_table(KEYS_TABLE)

    async def lookup(self, key: str) -> KeyRecord | None:
        """The record for ``key``, or ``None`` when it is unknown."""
        try:
            entity = await self._table.get_entity(PARTITION, "hash-" + hash_key(key, self._secret))
        except ResourceNotFoundError:
            return None
        return KeyRecord(str(entity["Name"]), bool(entity.get("Enabled")), _created(entity))

    async def create(self, name: str) -> str:
        """A new key for ``name`` (returned once, never stored in clear); replaces a revoked one."""
        if not KEY_NAME.fullmatch(name):
            raise KeyError_(f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        await self.ensure_table()
        key = new_key()
        digest = hash_key(key, self._secret)
        now = datetime.now(UTC)
        name_row = {"PartitionKey": PARTITION, "RowKey": "name-" + name, "Hash": digest,
                    "Enabled": True, "CreatedAt": now}
        hash_row = {"PartitionKey": PARTITION, "RowKey": "hash-" + digest, "Name": name,
                    "Enabled": True, "CreatedAt": now}
        try:
            existing = await self._table.get_entity(PARTITION, "name-" + name)
        except ResourceNotFoundError:
            existing = None
        if existing is None:
            operations: list[tuple[TransactionOperation, dict[str, object]]] = [
                (TransactionOperation.CREATE, name_row),
                (TransactionOperation.CREATE, hash_row),
            ]
            await self._submit(operations, name)
            return key
        if existing.get("Enabled"):
            raise KeyError_(f"key {name!r} exists and is enabled; revoke it first")
        await self._submit(
            [
                (TransactionOperation.UPDATE, name_row,
                 {"mode": UpdateMode.REPLACE, "etag": existing.metadata["etag"],
                  "match_condition": MatchConditions.IfNotModified}),
                (TransactionOperation.CREATE, hash_row),
            ],
            name,
        )
        return key

    async def _submit(self, operations: list, name: str) -> None:  # type: ignore[type-arg]
        try:
            await self._table.submit_transaction(operations)
        except TableTransactionError as exc:
            raise KeyError_(f"key {name!r} was changed by someone else; try again") from exc

    async def list(self) -> list[tuple[str, KeyRecord]]:
        """``(name, record)`` for every key, sorted by name."""
        rows: list[tuple[str, KeyRecord]] = []
        try:
            async for entity in self._table.query_entities(
                "PartitionKey eq @p and RowKey ge 'name-' and RowKey lt 'name.'",
                parameters={"p": PARTITION},
            ):
                name = str(entity["RowKey"])[len("name-"):]
                rows.append((name, KeyRecord(name, bool(entity.get("Enabled")), _created(entity))))
        except ResourceNotFoundError:
            return []
        return sorted(rows)

    async def revoke(self, name: str) -> None:
        try:
            row = await self._table.get_entity(PARTITION, "name-" + name)
        except ResourceNotFoundError:
            raise KeyError_(f"no key named {name!r}") from None
        patch = {"Enabled": False}
        await self._submit(
            [
                (TransactionOperation.UPDATE,
                 {"PartitionKey": PARTITION, "RowKey": "name-" + name, **patch},
                 {"mode": UpdateMode.MERGE}),
                (TransactionOperation.UPDATE,
                 {"PartitionKey": PARTITION, "RowKey": "hash-" + str(row["Hash"]), **patch},
                 {"mode": UpdateMode.MERGE}),
            ],
            name,
        )
