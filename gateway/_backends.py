"""Choosing a backend: best priority first, by weight, skipping backends that are cooling down."""

from __future__ import annotations

import email.utils
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from gateway._settings import BackendConfig


@dataclass(slots=True)
class _Cooling:
    until: float
    throttled: bool


def _positive(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number if number > 0 and math.isfinite(number) else None


def cooldown_from_headers(
    headers: Mapping[str, str], *, now: float, default: float
) -> float:
    """Seconds to leave a throttled backend alone, from a 429's headers.

    ``retry-after-ms``, else ``retry-after`` (seconds or an HTTP-date, against the wall clock
    ``now``), else the larger ``x-ratelimit-reset-*``, else ``default``. Missing, zero, negative
    and unparsable values fall through to the next source.
    """
    ms = _positive(headers.get("retry-after-ms"))
    if ms is not None:
        return ms / 1000.0
    raw = headers.get("retry-after")
    if raw is not None:
        seconds = _positive(raw)
        if seconds is None and not raw.strip().lstrip("-").replace(".", "").isdigit():
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                when = None
            if when is not None and when.tzinfo is not None:
                seconds = _positive(str(when.timestamp() - now))
        if seconds is not None:
            return seconds
    resets = [
        s for s in (_positive(headers.get("x-ratelimit-reset-tokens")),
                    _positive(headers.get("x-ratelimit-reset-requests")))
        if s is not None
    ]
    if resets:
        return max(resets)
    return default


class BackendPool:
    """The configured backends and which of them are cooling, per deployment."""

    def __init__(
        self,
        backends: Sequence[BackendConfig],
        *,
        clock: Callable[[], float],
        random: Callable[[], float],
    ) -> None:
        self._backends = tuple(backends)
        self._clock = clock
        self._random = random
        self._cooling: dict[tuple[str, str], _Cooling] = {}

    @property
    def backends(self) -> tuple[BackendConfig, ...]:
        return self._backends

    def serving(self, deployment: str) -> list[BackendConfig]:
        return [b for b in self._backends if b.serves(deployment)]

    def named(self, name: str) -> BackendConfig | None:
        return next((b for b in self._backends if b.name == name), None)

    def choose(self, deployment: str, *, exclude: set[str], only: str | None = None) -> BackendConfig | None:
        """A backend for ``deployment`` not in ``exclude`` and not cooling, or ``None``; with ``only``, that
        backend or ``None`` (it holds what the call needs, whatever deployments it lists now)."""
        now = self._clock()
        ready = []
        for backend in self._backends:
            wanted = backend.name == only if only is not None else backend.serves(deployment)
            if backend.name in exclude or not wanted:
                continue
            state = self._cooling.get((backend.name, deployment))
            if state is not None:
                if state.until > now:
                    continue
                del self._cooling[(backend.name, deployment)]
            ready.append(backend)
        if not ready:
            return None
        best = min(b.priority for b in ready)
        group = [b for b in ready if b.priority == best]
        if len(group) == 1:
            return group[0]
        point = self._random() * sum(b.weight for b in group)
        for backend in group:
            point -= backend.weight
            if point < 0:
                return backend
        return group[-1]

    def cool(self, backend: BackendConfig, deployment: str, seconds: float, *, throttled: bool) -> None:
        until = self._clock() + seconds
        current = self._cooling.get((backend.name, deployment))
        if current is None or current.until < until:
            self._cooling[(backend.name, deployment)] = _Cooling(until, throttled)

    def cooling(self) -> list[tuple[str, str]]:
        """The (backend, deployment) pairs cooling now (for the telemetry gauge)."""
        now = self._clock()
        return [pair for pair, state in list(self._cooling.items()) if state.until > now]

    def recovery(self, deployment: str, *, only: str | None = None) -> tuple[float, bool]:
        """Seconds until the first cooling backend for ``deployment`` (or backend ``only``) recovers, and
        whether any was throttled."""
        now = self._clock()
        waits = [
            (state.until - now, state.throttled)
            for (name, dep), state in self._cooling.items()
            if dep == deployment and state.until > now and (only is None or name == only)
        ]
        if not waits:
            return 0.0, False
        return min(w for w, _ in waits), any(t for _, t in waits)
