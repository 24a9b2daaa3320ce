"""What the host reads from the function app's folder: app settings and ``host.json``."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class HostConfigError(ValueError):
    """A host file cannot be used; the message names it."""


def app_settings(directory: Path, *, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The process environment over ``local.settings.json``'s ``Values``, as ``func start`` does."""
    merged: dict[str, str] = {}
    path = directory / "local.settings.json"
    if path.is_file():
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise HostConfigError(f"{path} is not valid JSON ({exc})") from exc
        values = document.get("Values", {}) if isinstance(document, dict) else None
        if not isinstance(values, dict):
            raise HostConfigError(f'{path}: "Values" must be an object')
        merged.update({str(k): str(v) for k, v in values.items()})
    merged.update(os.environ if environ is None else environ)
    return merged


@dataclass(frozen=True, slots=True)
class HostJson:
    """The parts of ``host.json`` the local host applies."""

    route_prefix: str = "api"
    max_message_batch_size: int = 1000
    function_timeout: float | None = None

    @classmethod
    def read(cls, directory: Path) -> HostJson:
        path = directory / "host.json"
        if not path.is_file():
            return cls()
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise HostConfigError(f"{path} is not valid JSON ({exc})") from exc
        extensions: Any = document.get("extensions", {}) if isinstance(document, dict) else {}
        http = extensions.get("http", {}) if isinstance(extensions, dict) else {}
        service_bus = extensions.get("serviceBus", {}) if isinstance(extensions, dict) else {}
        prefix = http.get("routePrefix", "api") if isinstance(http, dict) else "api"
        batch = service_bus.get("maxMessageBatchSize", 1000) if isinstance(service_bus, dict) else 1000
        if not isinstance(prefix, str):
            raise HostConfigError(f"{path}: extensions.http.routePrefix must be a string")
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            raise HostConfigError(f"{path}: extensions.serviceBus.maxMessageBatchSize must be a whole number >= 1")
        return cls(route_prefix=prefix.strip("/"), max_message_batch_size=batch,
                   function_timeout=_timespan(document.get("functionTimeout"), path))


def _timespan(value: object, path: Path) -> float | None:
    if value is None:
        return None
    try:
        hours, minutes, seconds = str(value).split(":")
        return int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    except ValueError as exc:
        raise HostConfigError(f"{path}: functionTimeout must look like 00:10:00") from exc
