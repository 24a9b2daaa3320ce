"""Subscription keys in Table Storage, stored only as a keyed hash.

Table ``gatewaykeys``, one partition ``keys`` so a key's two rows change in one transaction:

- ``RowKey = "hash-<hmac hex>"``: ``Name``, ``Enabled``, ``CreatedAt`` (the lookup a request makes);
- ``RowKey = "name-<name>"``: ``Hash``, ``Enabled``, ``CreatedAt`` (list, revoke, unique names);

both with the quota columns (``TokensPerMinute``, ``TokensPerDay``, ``TokensPerMonth``, ``RequestsPerMinute``,
``BudgetNanoPerMonth``: Int64, absent = no limit), ``LogContent`` (the key's opt-in to content logging; absent = off),
``Deployments`` (the deployments the key may call, comma-separated; absent = all) and ``ExpiresAt``
(when the key stops working; absent = never).

Rotation (``rotate``) makes a new hash row for the same name, a copy of the current one, and in the
same transaction points the name row's ``Hash`` at it; the name row remembers the replaced key in
``PreviousHash`` and ``PreviousUntil``, and the replaced key's hash row stays, with ``ReplacedUntil``
(the end of its grace period). Rotating again drops the row of the key replaced before (so at most
two keys of a name work at once); ``revoke`` disables every row of the name. Changes of quotas,
logging and scope apply to the replaced key's row too while it is in its grace period.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.data.tables import (
    TableEntity,
    TableTransactionError,
    TransactionOperation,
    UpdateMode,
)
from azure.data.tables.aio import TableClient, TableServiceClient

from usage._tables import KEYS_TABLE, as_int, bounded, int64

PARTITION = "keys"
KEY_PREFIX = "gw-"
KEY_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: Used when ``KEY_HASH_SECRET`` is unset; keys are 256-bit random, so the hash stays one-way.
_DEFAULT_SECRET = b"aoai-gateway/subscription-key/v1"


class KeyStoreError(Exception):
    """A key operation the caller asked for cannot be done (unknown name, name taken)."""


@dataclass(frozen=True, slots=True)
class Limits:
    """A key's quotas; ``None`` is no limit. ``budget_nano_per_month`` is money, in nano-units (10^-9) of the
    prices' currency."""

    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    tokens_per_month: int | None = None
    requests_per_minute: int | None = None
    budget_nano_per_month: int | None = None

    def _values(self) -> tuple[int | None, ...]:
        return (self.tokens_per_minute, self.tokens_per_day, self.tokens_per_month, self.requests_per_minute,
                self.budget_nano_per_month)

    @property
    def any(self) -> bool:
        return any(v is not None for v in self._values())

    def properties(self) -> dict[str, Any]:
        """The limit columns and their values; ``None`` for a limit that is not set (no column)."""
        return dict(zip(_LIMIT_COLUMNS, self._values(), strict=True))

    @classmethod
    def from_entity(cls, entity: Mapping[str, Any]) -> Limits:
        values = [entity.get(column) for column in _LIMIT_COLUMNS]
        return cls(*(None if v is None else as_int(v) for v in values))


_LIMIT_COLUMNS = ("TokensPerMinute", "TokensPerDay", "TokensPerMonth", "RequestsPerMinute", "BudgetNanoPerMonth")
LOG_CONTENT = "LogContent"
DEPLOYMENTS = "Deployments"
EXPIRES_AT = "ExpiresAt"
REPLACED_UNTIL = "ReplacedUntil"
PREVIOUS_HASH = "PreviousHash"
PREVIOUS_UNTIL = "PreviousUntil"
#: A deployment name a scope may list: what the gateway routes (see ``gateway._settings.is_deployment_name``).
DEPLOYMENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    name: str
    enabled: bool
    created_at: datetime
    limits: Limits = Limits()
    log_content: bool = False  # the key's prompts and completions are recorded (when CONTENT_LOG is set)
    #: the deployments the key may call, compared exactly as the gateway routes them; ``None``: all
    deployments: frozenset[str] | None = None
    expires_at: datetime | None = None  # when the key stops working (``--expires``); ``None``: never
    #: a rotated-out key's record: when its grace period ends (it stops working then)
    replaced_until: datetime | None = None
    #: the name's record (``get``, ``list``): until when the key it replaced in a rotation still works
    previous_until: datetime | None = None

    def allows(self, deployment: str) -> bool:
        """Whether the key may call ``deployment``."""
        return self.deployments is None or deployment in self.deployments

    @property
    def ends_at(self) -> datetime | None:
        """When the key stops working: its expiry or the end of its grace period, whichever is first."""
        ends = [t for t in (self.expires_at, self.replaced_until) if t is not None]
        return min(ends, default=None)


def hash_key(key: str, secret: bytes = b"") -> str:
    """The keyed hash (HMAC-SHA256) under which a subscription key is stored."""
    return hmac.new(secret or _DEFAULT_SECRET, key.encode(), hashlib.sha256).hexdigest()


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def _created(entity: Mapping[str, Any]) -> datetime:
    value = entity.get("CreatedAt")
    return value if isinstance(value, datetime) else datetime.fromtimestamp(0, UTC)


def _moment(entity: Mapping[str, Any], column: str) -> datetime | None:
    value = entity.get(column)
    return value.astimezone(UTC) if isinstance(value, datetime) else None


def _deployments(entity: Mapping[str, Any]) -> frozenset[str] | None:
    value = entity.get(DEPLOYMENTS)
    if not isinstance(value, str):
        return None
    return frozenset(name for name in value.split(",") if name)


def _record(name: str, entity: Mapping[str, Any]) -> KeyRecord:
    return KeyRecord(name, bool(entity.get("Enabled")), _created(entity), Limits.from_entity(entity),
                     log_content=entity.get(LOG_CONTENT) is True, deployments=_deployments(entity),
                     expires_at=_moment(entity, EXPIRES_AT), replaced_until=_moment(entity, REPLACED_UNTIL),
                     previous_until=_moment(entity, PREVIOUS_UNTIL) if entity.get(PREVIOUS_HASH) else None)


def scope_text(deployments: frozenset[str] | None) -> str | None:
    """The ``Deployments`` column for a scope (sorted, comma-separated); ``None`` for all deployments."""
    return None if deployments is None else ",".join(sorted(deployments))


def checked_scope(names: Iterable[str]) -> frozenset[str]:
    """A scope from deployment names, each checked; ``KeyStoreError`` for a bad or empty one."""
    scope = frozenset(names)
    if not scope:
        raise KeyStoreError("a scope must name at least one deployment")
    for name in scope:
        if not DEPLOYMENT_NAME.fullmatch(name) or name in (".", ".."):
            raise KeyStoreError(f"deployment name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
    return scope


def _with_scope(entity: dict[str, Any], deployments: frozenset[str] | None,
                expires_at: datetime | None) -> dict[str, Any]:
    """``entity`` with its scope and expiry columns set (absent when ``None``)."""
    kept = {k: v for k, v in entity.items() if k not in (DEPLOYMENTS, EXPIRES_AT)}
    scope = scope_text(deployments)
    if scope is not None:
        kept[DEPLOYMENTS] = scope
    if expires_at is not None:
        kept[EXPIRES_AT] = expires_at.astimezone(UTC)
    return kept


def _with_limits(entity: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """``entity`` without limit columns, plus ``limits``' set ones as Int64."""
    kept = {k: v for k, v in entity.items() if k not in _LIMIT_COLUMNS}
    kept.update({k: int64(v) for k, v in limits.properties().items() if v is not None})
    return kept


class KeyStore:
    """Creates, lists, revokes and looks up subscription keys, with their quotas.

    ``lookup_timeout`` bounds each attempt of a lookup and allows one retry (see ``bounded``), for
    lookups made on the request path; without it the SDK's own time-outs and retries apply.
    """

    def __init__(
        self, service: TableServiceClient, *, secret: bytes = b"", lookup_timeout: float | None = None
    ) -> None:
        self._table: TableClient = service.get_table_client(KEYS_TABLE)
        self._service = service
        self._secret = secret
        self._lookup_options: dict[str, Any] = {} if lookup_timeout is None else bounded(lookup_timeout)

    async def ensure_table(self) -> None:
        with contextlib.suppress(ResourceExistsError):
            await self._service.create_table(KEYS_TABLE)

    async def lookup_hash(self, digest: str) -> KeyRecord | None:
        """The record of the key whose ``hash_key`` is ``digest``, or ``None`` when it is unknown."""
        try:
            entity = await self._table.get_entity(PARTITION, "hash-" + digest, **self._lookup_options)
        except ResourceNotFoundError:
            return None
        return _record(str(entity["Name"]), entity)

    async def create(self, name: str, *, limits: Limits = Limits(), log_content: bool = False,
                     deployments: frozenset[str] | None = None, expires_at: datetime | None = None) -> str:
        """A new key for ``name`` (returned once, never stored in clear); replaces a revoked one.

        ``deployments``: the only deployments it may call (``None``: all); ``expires_at``: when it stops working.
        """
        if not KEY_NAME.fullmatch(name):
            raise KeyStoreError(f"key name {name!r} must be 1-64 letters, digits, '.', '_' or '-'")
        if deployments is not None:
            deployments = checked_scope(deployments)
        await self.ensure_table()
        key = new_key()
        digest = hash_key(key, self._secret)
        now = datetime.now(UTC)
        name_row = _with_scope(_with_limits({"PartitionKey": PARTITION, "RowKey": "name-" + name, "Hash": digest,
                                             "Enabled": True, "CreatedAt": now, LOG_CONTENT: log_content}, limits),
                               deployments, expires_at)
        hash_row = _with_scope(_with_limits({"PartitionKey": PARTITION, "RowKey": "hash-" + digest, "Name": name,
                                             "Enabled": True, "CreatedAt": now, LOG_CONTENT: log_content}, limits),
                               deployments, expires_at)
        try:
            existing = await self._table.get_entity(PARTITION, "name-" + name)
        except ResourceNotFoundError:
            existing = None
        if existing is None:
            await self._submit([(TransactionOperation.CREATE, name_row), (TransactionOperation.CREATE, hash_row)],
                               name)
            return key
        if existing.get("Enabled"):
            raise KeyStoreError(f"key {name!r} exists and is enabled; revoke it first")
        await self._submit([_replace(name_row, existing), (TransactionOperation.CREATE, hash_row)], name)
        return key

    async def _submit(self, operations: list[Any], name: str) -> None:
        try:
            await self._table.submit_transaction(operations)
        except TableTransactionError as exc:
            raise KeyStoreError(f"key {name!r} was changed by someone else at the same time; try again") from exc

    async def _rows(self, name: str) -> tuple[TableEntity, TableEntity]:
        try:
            name_row = await self._table.get_entity(PARTITION, "name-" + name)
            hash_row = await self._table.get_entity(PARTITION, "hash-" + str(name_row["Hash"]))
        except ResourceNotFoundError:
            raise KeyStoreError(f"no key named {name!r}") from None
        return name_row, hash_row

    async def list(self) -> list[KeyRecord]:
        """Every key's record, sorted by name."""
        records: list[KeyRecord] = []
        try:
            async for entity in self._table.query_entities(
                "PartitionKey eq @p and RowKey ge @lo and RowKey lt @hi",
                parameters={"p": PARTITION, "lo": "name-", "hi": "name."},
            ):
                records.append(_record(str(entity["RowKey"])[len("name-"):], entity))
        except ResourceNotFoundError:
            return []
        return sorted(records, key=lambda r: r.name)

    async def _previous(self, name_row: TableEntity) -> TableEntity | None:
        """The hash row of the key ``name_row``'s last rotation replaced, if it is still there."""
        previous = name_row.get(PREVIOUS_HASH)
        if not previous:
            return None
        try:
            return await self._table.get_entity(PARTITION, "hash-" + str(previous))
        except ResourceNotFoundError:
            return None

    async def _all_rows(self, name: str) -> tuple[TableEntity, ...]:
        """The name row, the current key's hash row and, if there is one, the replaced key's."""
        name_row, hash_row = await self._rows(name)
        previous = await self._previous(name_row)
        return (name_row, hash_row) if previous is None else (name_row, hash_row, previous)

    async def revoke(self, name: str) -> None:
        """Disable ``name``: its current key and the one a rotation replaced (gateways notice within
        KEY_CACHE_SECONDS)."""
        rows = await self._all_rows(name)
        await self._submit([_replace({**row, "Enabled": False}, row) for row in rows], name)

    async def set_limits(self, name: str, limits: Limits) -> None:
        """Replace ``name``'s quotas with ``limits``."""
        rows = await self._all_rows(name)
        await self._submit([_replace(_with_limits(dict(row), limits), row) for row in rows], name)

    async def set_logging(self, name: str, *, on: bool) -> None:
        """Turn content logging for ``name`` on or off (gateways notice within KEY_CACHE_SECONDS)."""
        rows = await self._all_rows(name)
        await self._submit([_replace({**row, LOG_CONTENT: on}, row) for row in rows], name)

    async def set_expiry(self, name: str, expires_at: datetime | None) -> None:
        """Make ``name``'s keys stop working at ``expires_at`` (``None``: never); a key in its grace period
        after a rotation still stops at the end of that period, if that comes first."""
        rows = await self._all_rows(name)
        await self._submit([_replace(_with_scope(dict(row), _deployments(row), expires_at), row) for row in rows],
                           name)

    async def set_scope(self, name: str, deployments: frozenset[str] | None) -> None:
        """Limit ``name``'s keys to ``deployments`` (``None``: all)."""
        if deployments is not None:
            deployments = checked_scope(deployments)
        rows = await self._all_rows(name)
        await self._submit([_replace(_with_scope(dict(row), deployments, _moment(row, EXPIRES_AT)), row)
                            for row in rows], name)

    async def rotate(self, name: str, *, grace: timedelta, now: datetime | None = None) -> str:
        """A new key for ``name`` (returned once) with the current key's quotas, scope, expiry and logging;
        the current key keeps working for ``grace`` (0: it stops at once, as gateways notice a revocation).

        A key an earlier rotation replaced, still in its grace period or not, stops working at once: at most
        two keys of a name work at any time. A revoked name cannot be rotated (``create`` gives it a key).
        """
        if grace < timedelta(0):
            raise KeyStoreError("the grace period cannot be negative")
        name_row, hash_row = await self._rows(name)
        if not name_row.get("Enabled"):
            raise KeyStoreError(f"key {name!r} is revoked; create a new key for it instead")
        older = await self._previous(name_row)
        key = new_key()
        digest = hash_key(key, self._secret)
        moment = (now or datetime.now(UTC)).astimezone(UTC)
        until = moment + grace
        new_row = {k: v for k, v in hash_row.items() if k not in (REPLACED_UNTIL, PREVIOUS_HASH, PREVIOUS_UNTIL)}
        new_row.update({"RowKey": "hash-" + digest, "CreatedAt": moment})
        operations: list[Any] = [
            (TransactionOperation.CREATE, new_row),
            _replace({**name_row, "Hash": digest, PREVIOUS_HASH: str(name_row["Hash"]), PREVIOUS_UNTIL: until},
                     name_row),
            _replace({**hash_row, REPLACED_UNTIL: until}, hash_row),
        ]
        if older is not None:
            operations.append((TransactionOperation.DELETE, older, {
                "etag": older.metadata["etag"], "match_condition": MatchConditions.IfNotModified}))
        await self._submit(operations, name)
        return key

    async def rehash(self, old_digest: str, new_digest: str) -> bool:
        """Move a key from the hash under the previous secret to the hash under the current one (``KEY_HASH_SECRET``
        rotation): in one transaction the new hash row is created, the name row points to it, and the old one goes.
        False when there is nothing to move (already moved, revoked and replaced) or someone changed it meanwhile.
        """
        try:
            old_row = await self._table.get_entity(PARTITION, "hash-" + old_digest, **self._lookup_options)
            name_row = await self._table.get_entity(PARTITION, "name-" + str(old_row["Name"]),
                                                    **self._lookup_options)
        except ResourceNotFoundError:
            return False
        if name_row.get("Hash") == old_digest:
            pointer = "Hash"
        elif name_row.get(PREVIOUS_HASH) == old_digest:  # a key in its grace period after a rotation
            pointer = PREVIOUS_HASH
        else:
            return False
        new_row = {**old_row, "RowKey": "hash-" + new_digest}
        try:
            await self._table.submit_transaction([
                (TransactionOperation.CREATE, new_row),
                _replace({**name_row, pointer: new_digest}, name_row),
                (TransactionOperation.DELETE, old_row, {"etag": old_row.metadata["etag"],
                                                        "match_condition": MatchConditions.IfNotModified}),
            ])
        except TableTransactionError:
            return False
        return True

    async def get(self, name: str) -> KeyRecord:
        name_row, _ = await self._rows(name)
        return _record(name, name_row)


def _replace(
    entity: dict[str, Any], current: TableEntity
) -> tuple[TransactionOperation, dict[str, Any], dict[str, Any]]:
    """A transaction step replacing ``current`` with ``entity``, if nobody changed it meanwhile."""
    return (TransactionOperation.UPDATE, entity, {
        "mode": UpdateMode.REPLACE, "etag": current.metadata["etag"], "match_condition": MatchConditions.IfNotModified})
