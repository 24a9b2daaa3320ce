"""One frozen settings object, built by the pure ``load_settings(env)``."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from gateway._exceptions import SettingsError
from usage import BlobStorageConfig, StorageConfig, load_blob_config, load_storage_config
from usage._config import DEFAULT_LEDGER_RETENTION_DAYS, load_ledger_retention
from usage._prices import Prices, load_prices

DEPLOYMENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def is_deployment_name(value: str) -> bool:
    """A plain deployment name: letters, digits, ``.``, ``_``, ``-`` (and not a dot path)."""
    return DEPLOYMENT_NAME.fullmatch(value) is not None and value not in (".", "..")


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One AOAI resource the gateway can send requests to."""

    name: str
    endpoint: str
    priority: int = 1
    weight: float = 1.0
    api_key: str | None = field(default=None, repr=False)
    #: gateway deployment name -> the backend's own name; ``None`` serves every deployment as named.
    deployments: Mapping[str, str] | None = None
    #: seconds to wait for this backend's response headers; ``None``: ``RESPONSE_TIMEOUT_SECONDS``
    response_timeout: float | None = None
    #: gateway deployment name -> seconds to wait for its response headers here, over ``response_timeout``
    deployment_timeouts: Mapping[str, float] | None = None

    def serves(self, deployment: str) -> bool:
        return self.deployments is None or deployment in self.deployments

    def upstream_deployment(self, deployment: str) -> str:
        if self.deployments is None:
            return deployment
        return self.deployments[deployment]

    def response_timeout_for(self, deployment: str, *, default: float) -> float:
        """How long to wait for response headers: the deployment's setting, else the backend's, else ``default``."""
        if self.deployment_timeouts is not None and deployment in self.deployment_timeouts:
            return self.deployment_timeouts[deployment]
        return default if self.response_timeout is None else self.response_timeout


@dataclass(frozen=True, slots=True)
class ServiceBusConfig:
    """Where usage events go: a connection string, or a namespace reached with managed identity."""

    queue: str
    connection_string: str | None = field(default=None, repr=False)
    fully_qualified_namespace: str | None = None


def load_service_bus(env: Mapping[str, str]) -> ServiceBusConfig | None:
    """``ServiceBusConnection`` or ``ServiceBusConnection__fullyQualifiedNamespace``; ``None`` if neither."""
    queue = env.get("USAGE_QUEUE_NAME", "").strip() or "usage-events"
    connection = env.get("ServiceBusConnection", "").strip()
    namespace = env.get("ServiceBusConnection__fullyQualifiedNamespace", "").strip()
    if connection:
        if "endpoint=" not in connection.lower():
            raise SettingsError("ServiceBusConnection", "is not a Service Bus connection string (no Endpoint=)")
        return ServiceBusConfig(queue=queue, connection_string=connection)
    if namespace:
        if "/" in namespace or "." not in namespace:
            raise SettingsError("ServiceBusConnection__fullyQualifiedNamespace",
                                "must be a host name like contoso.servicebus.windows.net")
        return ServiceBusConfig(queue=queue, fully_qualified_namespace=namespace)
    return None


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the gateway reads from its app settings."""

    backends: tuple[BackendConfig, ...]
    storage: StorageConfig
    key_hash_secret: bytes = field(default=b"", repr=False)
    #: during a rotation, the secret before KEY_HASH_SECRET: keys still hashed with it are found and moved
    key_hash_previous_secret: bytes = field(default=b"", repr=False)
    key_cache_seconds: float = 30.0
    key_lookup_timeout: float = 2.0
    key_stale_seconds: float = 300.0
    connect_timeout: float = 5.0
    response_timeout: float = 120.0
    stream_idle_timeout: float = 120.0
    request_deadline: float = 220.0  # Azure's front end ends a request unanswered after 230 s
    max_attempts: int = 4
    default_cooldown: float = 10.0
    failure_cooldown: float = 5.0
    max_request_bytes: int = 32 * 1024 * 1024
    body_read_timeout: float = 30.0
    service_bus: ServiceBusConfig | None = None
    usage_buffer_size: int = 10_000
    quota_cache_seconds: float = 5.0
    #: a key's shared quota that cannot be leased (storage down): 503 instead of admitting from what is known
    quota_fail_closed: bool = False
    quota_read_timeout: float = 0.5
    #: where content records go (``CONTENT_LOG``); ``None``: nothing is recorded, whatever the keys say
    content_log: BlobStorageConfig | None = None
    content_log_max_bytes: int = 1024 * 1024
    #: regular expressions whose matches are replaced by ``[redacted]`` in prompts and completions
    content_log_redact: tuple[str, ...] = ()
    content_log_buffer_bytes: int = 64 * 1024 * 1024
    #: read by the ledger clean-up (``usage``); checked here so a bad value stops start-up and shows in readiness
    ledger_retention_days: float = DEFAULT_LEDGER_RETENTION_DAYS
    #: ``PRICES``: each deployment's price history; read by the aggregator, checked here so a bad value stops start-up
    prices: Prices = field(default_factory=Prices)

    @property
    def needs_credential(self) -> bool:
        return (self.storage.uses_identity or any(b.api_key is None for b in self.backends)
                or (self.service_bus is not None and self.service_bus.connection_string is None)
                or (self.content_log is not None and self.content_log.uses_identity))


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0.0) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(name, f"must be a number, not {raw!r}") from None
    if not math.isfinite(value) or value < minimum:
        raise SettingsError(name, f"must be a finite number of at least {minimum}, not {raw!r}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(name, f"must be a whole number, not {raw!r}") from None
    if value < minimum:
        raise SettingsError(name, f"must be at least {minimum}, not {value}")
    return value


def _flag(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("true", "1", "yes"):
        return True
    if raw in ("false", "0", "no"):
        return False
    raise SettingsError(name, f"must be true or false, not {raw!r}")


def _seconds(value: Any, where: str) -> float:
    """A time-out from ``AOAI_BACKENDS``: a finite number of seconds > 0."""
    if (not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value)
            or not value > 0):
        raise SettingsError("AOAI_BACKENDS", f"{where} must be a number of seconds > 0, not {value!r}")
    return float(value)


def _deployments(raw: Any, where: str) -> tuple[dict[str, str] | None, dict[str, float]]:
    """``deployments``: a list of names, or an object mapping our name to the backend's own name
    or to ``{"name": ..., "response_timeout_seconds": ...}``; and the time-outs it sets."""
    where = f"{where}.deployments"
    timeouts: dict[str, float] = {}
    if raw is None:
        return None, timeouts
    if isinstance(raw, list):
        deployments = {d: d for d in raw if isinstance(d, str)}
        if len(deployments) != len(raw):
            raise SettingsError("AOAI_BACKENDS", f"{where} must list names")
    elif isinstance(raw, dict):
        deployments = {}
        for ours, target in raw.items():
            if isinstance(target, dict):
                unknown = set(target) - {"name", "response_timeout_seconds"}
                if unknown:
                    raise SettingsError("AOAI_BACKENDS", f"{where}.{ours} has unknown field(s) {sorted(unknown)}")
                target_name = target.get("name", ours)
                if target.get("response_timeout_seconds") is not None:
                    timeouts[ours] = _seconds(target["response_timeout_seconds"],
                                              f"{where}.{ours}.response_timeout_seconds")
            else:
                target_name = target
            if not isinstance(target_name, str):
                raise SettingsError("AOAI_BACKENDS", f"{where} must map names to names or to "
                                    '{"name": ..., "response_timeout_seconds": ...}')
            deployments[ours] = target_name
    else:
        raise SettingsError("AOAI_BACKENDS", f"{where} must be a list or an object")
    for ours, theirs in deployments.items():
        if not (is_deployment_name(ours) and is_deployment_name(theirs)):
            raise SettingsError("AOAI_BACKENDS", f"{where} has a name that is not plain: {ours!r}")
    return deployments, timeouts


def _backend(item: Any, index: int) -> BackendConfig:
    where = f"AOAI_BACKENDS[{index}]"
    if not isinstance(item, dict):
        raise SettingsError("AOAI_BACKENDS", f"{where} must be an object")
    unknown = set(item) - {"name", "endpoint", "priority", "weight", "api_key", "deployments",
                           "response_timeout_seconds"}
    if unknown:
        raise SettingsError("AOAI_BACKENDS", f"{where} has unknown field(s) {sorted(unknown)}")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise SettingsError("AOAI_BACKENDS", f"{where}.name must be a non-empty string")
    endpoint = item.get("endpoint")
    parts = urlsplit(endpoint) if isinstance(endpoint, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise SettingsError("AOAI_BACKENDS", f"{where}.endpoint must be an http(s) URL")
    priority = item.get("priority", 1)
    if not isinstance(priority, int) or isinstance(priority, bool) or priority < 0:
        raise SettingsError("AOAI_BACKENDS", f"{where}.priority must be a whole number >= 0")
    weight = item.get("weight", 1)
    if not isinstance(weight, int | float) or isinstance(weight, bool) or not weight > 0:
        raise SettingsError("AOAI_BACKENDS", f"{where}.weight must be a number > 0")
    api_key = item.get("api_key")
    if api_key is not None and (not isinstance(api_key, str) or not api_key):
        raise SettingsError("AOAI_BACKENDS", f"{where}.api_key must be a non-empty string")
    response_timeout = item.get("response_timeout_seconds")
    if response_timeout is not None:
        response_timeout = _seconds(response_timeout, f"{where}.response_timeout_seconds")
    deployments, timeouts = _deployments(item.get("deployments"), where)
    return BackendConfig(
        name=name.strip(),
        endpoint=endpoint.rstrip("/"),  # type: ignore[union-attr]
        priority=priority,
        weight=float(weight),
        api_key=api_key,
        deployments=None if deployments is None else MappingProxyType(deployments),
        response_timeout=response_timeout,
        deployment_timeouts=MappingProxyType(timeouts) if timeouts else None,
    )


def load_backends(raw: str) -> tuple[BackendConfig, ...]:
    if not raw.strip():
        raise SettingsError("AOAI_BACKENDS", "is not set (a JSON array of backends)")
    try:
        items = json.loads(raw)
    except ValueError as exc:
        raise SettingsError("AOAI_BACKENDS", f"is not valid JSON ({exc})") from None
    if not isinstance(items, list) or not items:
        raise SettingsError("AOAI_BACKENDS", "must be a non-empty JSON array")
    backends = tuple(_backend(item, i) for i, item in enumerate(items))
    names = [b.name for b in backends]
    if len(set(names)) != len(names):
        raise SettingsError("AOAI_BACKENDS", "backend names must be unique")
    return backends


def load_redactions(raw: str) -> tuple[str, ...]:
    """``CONTENT_LOG_REDACT``: a JSON list of regular expressions (Python syntax), each checked here."""
    if not raw.strip():
        return ()
    try:
        items = json.loads(raw)
    except ValueError as exc:
        raise SettingsError("CONTENT_LOG_REDACT", f"is not valid JSON ({exc})") from None
    if not isinstance(items, list) or not all(isinstance(item, str) and item for item in items):
        raise SettingsError("CONTENT_LOG_REDACT", "must be a JSON list of non-empty regular expressions")
    for item in items:
        try:
            re.compile(item)
        except re.error as exc:
            raise SettingsError("CONTENT_LOG_REDACT", f"{item!r} is not a regular expression ({exc})") from None
    return tuple(items)


def unknown_price_backends(settings: Settings) -> dict[str, list[str]]:
    """Per deployment, the backends ``PRICES`` overrides that ``AOAI_BACKENDS`` does not have: a typo, or a
    backend since removed (whose events may still be aggregated, so this is worth a warning, not a refusal)."""
    names = {backend.name for backend in settings.backends}
    unknown: dict[str, list[str]] = {}
    for deployment, history in settings.prices.entries.items():
        missing = sorted({name for entry in history for name in entry.backends} - names)
        if missing:
            unknown[deployment] = missing
    return unknown


def load_settings(env: Mapping[str, str]) -> Settings:
    """Build the settings from ``env``; a missing or malformed setting raises, naming it."""
    return Settings(
        backends=load_backends(env.get("AOAI_BACKENDS", "")),
        storage=load_storage_config(env),
        key_hash_secret=env.get("KEY_HASH_SECRET", "").encode(),
        key_hash_previous_secret=env.get("KEY_HASH_SECRET_PREVIOUS", "").encode(),
        key_cache_seconds=_number(env, "KEY_CACHE_SECONDS", 30.0),
        key_lookup_timeout=_number(env, "KEY_LOOKUP_TIMEOUT_SECONDS", 2.0, minimum=0.001),
        key_stale_seconds=_number(env, "KEY_STALE_SECONDS", 300.0),
        connect_timeout=_number(env, "CONNECT_TIMEOUT_SECONDS", 5.0, minimum=0.001),
        response_timeout=_number(env, "RESPONSE_TIMEOUT_SECONDS", 120.0, minimum=0.001),
        stream_idle_timeout=_number(env, "STREAM_IDLE_TIMEOUT_SECONDS", 120.0, minimum=0.001),
        request_deadline=_number(env, "REQUEST_DEADLINE_SECONDS", 220.0, minimum=0.001),
        max_attempts=_integer(env, "MAX_ATTEMPTS", 4),
        default_cooldown=_number(env, "DEFAULT_COOLDOWN_SECONDS", 10.0),
        failure_cooldown=_number(env, "FAILURE_COOLDOWN_SECONDS", 5.0),
        max_request_bytes=_integer(env, "MAX_REQUEST_BYTES", 32 * 1024 * 1024),
        body_read_timeout=_number(env, "BODY_READ_TIMEOUT_SECONDS", 30.0, minimum=0.001),
        service_bus=load_service_bus(env),
        usage_buffer_size=_integer(env, "USAGE_BUFFER_SIZE", 10_000),
        quota_cache_seconds=_number(env, "QUOTA_CACHE_SECONDS", 5.0),
        quota_fail_closed=_flag(env, "QUOTA_FAIL_CLOSED", False),
        quota_read_timeout=_number(env, "QUOTA_READ_TIMEOUT_SECONDS", 0.5, minimum=0.001),
        content_log=load_blob_config(env),
        content_log_max_bytes=_integer(env, "CONTENT_LOG_MAX_BYTES", 1024 * 1024, minimum=4096),
        content_log_redact=load_redactions(env.get("CONTENT_LOG_REDACT", "")),
        content_log_buffer_bytes=_integer(env, "CONTENT_LOG_BUFFER_BYTES", 64 * 1024 * 1024, minimum=1024 * 1024),
        ledger_retention_days=load_ledger_retention(env),
        prices=load_prices(env),
    )
