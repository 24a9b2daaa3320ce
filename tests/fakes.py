"""Stand-ins shared by the test process and the test worker process: a clock both can read and the test
moves, a usage sink written as JSON lines, and a credential issuing numbered Entra ID tokens."""

from __future__ import annotations

import json
import mmap
import struct
import time
from pathlib import Path
from typing import Any

from gateway import UsageRecord

_DOUBLE = struct.Struct("<d")


#: Where the harness starts the worker's shared clock; its wall clock is real time plus the clock's advance past it.
CLOCK_START = 1000.0


class SharedClock:
    """A monotonic clock kept in a small file: the test moves it by hand, the worker reads it, so cooling
    periods pass without sleeping in either process."""

    def __init__(self, path: Path, start: float | None = None) -> None:
        if start is not None:
            path.write_bytes(_DOUBLE.pack(start))
        self._file = path.open("r+b")
        self._map = mmap.mmap(self._file.fileno(), _DOUBLE.size)

    def __call__(self) -> float:
        return float(_DOUBLE.unpack(self._map[:_DOUBLE.size])[0])

    @property
    def now(self) -> float:
        return self()

    def advance(self, seconds: float) -> None:
        self._map[:_DOUBLE.size] = _DOUBLE.pack(self() + seconds)

    def close(self) -> None:
        self._map.close()
        self._file.close()


class FileSink:
    """The worker's usage sink in tests: one JSON line per record, appended as it is emitted."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")

    def emit(self, record: UsageRecord) -> None:
        self._file.write(json.dumps(record.to_dict()) + "\n")
        self._file.flush()


class RecordedUsage:
    """The test's view of a ``FileSink``: the records the worker has emitted so far."""

    def __init__(self, path: Path) -> None:
        self._path = path

    @property
    def records(self) -> list[UsageRecord]:
        if not self._path.is_file():
            return []
        lines = self._path.read_text(encoding="utf-8").splitlines()
        return [UsageRecord(**json.loads(line)) for line in lines if line.endswith("}")]

    def wait(self, count: int = 1, timeout: float = 10.0) -> list[UsageRecord]:
        """The records once ``count`` have arrived (a stream's record lands as it closes)."""
        deadline = time.monotonic() + timeout
        while len(records := self.records) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(records) >= count, f"expected {count} usage record(s), got {records}"
        return records


class IssuingCredential:
    """Stands in for DefaultAzureCredential (no Entra ID here): issues numbered tokens."""

    def __init__(self, lifetime: float = 3600.0, now: Any = time.time) -> None:
        self.scopes: list[tuple[str, ...]] = []
        self.lifetime = lifetime
        self.now = now

    async def get_token(self, *scopes: str, **_: Any) -> Any:
        from azure.core.credentials import AccessToken

        self.scopes.append(scopes)
        return AccessToken(f"entra-token-{len(self.scopes)}", int(self.now() + self.lifetime))

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> IssuingCredential:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None
