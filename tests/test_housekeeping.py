"""Housekeeping against Azurite: the ledger clean-up (directly and as the timer function under the real runtime),
and `python -m usage rejects list|replay`."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.harness import running_gateway
from usage import StorageConfig, delete_old_ledgers, open_table_service
from usage._aggregate import Aggregator
from usage._cli import main
from usage._rejects import reject_entity
from usage._schema import REJECTS_TABLE, USAGE_TABLE
from usage._tables import as_int

NOW = datetime.now(UTC).replace(microsecond=0)


def event(key: str, when: datetime, tokens: int = 10) -> bytes:
    return json.dumps({
        "schema": 1, "event_id": uuid.uuid4().hex, "request_id": "r", "time": when.isoformat(), "key_name": key,
        "deployment": "gpt-4o", "model": "gpt-4o-2024-08-06", "backend": "eastus", "operation": "chat/completions",
        "streaming": False, "prompt_tokens": tokens, "completion_tokens": 1, "total_tokens": tokens + 1,
        "cached_tokens": 0, "reasoning_tokens": 0, "usage_source": "reported", "status": 200, "latency_ms": 1.0,
        "ttfb_ms": 1.0, "outcome": "complete"}).encode()


@pytest.fixture
async def service(storage: str) -> AsyncIterator[Any]:
    async with open_table_service(StorageConfig(connection_string=storage)) as client:
        yield client


async def rows(service: Any, key: str) -> dict[str, dict[str, Any]]:
    """Every row of ``key``'s partitions, by RowKey."""
    table = service.get_table_client(USAGE_TABLE)
    found = table.query_entities("PartitionKey ge @lo and PartitionKey lt @hi",
                                 parameters={"lo": "0", "hi": "9"})
    return {str(e["RowKey"]) + "@" + str(e["PartitionKey"])[:7]: dict(e) async for e in found
            if str(e["PartitionKey"]).endswith(f"|{key}")}


def ledgers(found: dict[str, dict[str, Any]]) -> list[str]:
    return sorted(k for k in found if k.startswith("ledger|"))


async def test_clean_up_deletes_only_ledger_rows_past_the_horizon(service: Any) -> None:
    """Ledger rows older than the retention go; newer ones and every counter stay; a redelivered recent event
    is still counted once."""
    key = f"k{uuid.uuid4().hex[:8]}"
    old = [event(key, NOW - timedelta(days=days)) for days in (40, 20, 15)]
    recent = [event(key, NOW - timedelta(days=days)) for days in (13, 1)]
    aggregator = Aggregator(service)
    for body in old + recent:  # one batch each: one ledger row each
        await aggregator.aggregate([body])
    before = await rows(service, key)
    assert len(ledgers(before)) == 5
    kept_longer = await delete_old_ledgers(service, retention_days=60, now=NOW)
    assert len(ledgers(await rows(service, key))) == 5 and kept_longer.cutoff < (NOW - timedelta(days=59)).isoformat()
    await delete_old_ledgers(service, retention_days=14, now=NOW)
    after = await rows(service, key)
    assert ledgers(after) == sorted(k for k in ledgers(before)
                                    if k.split("|")[1] >= (NOW - timedelta(days=14)).isoformat()[:16])
    assert len(ledgers(after)) == 2
    assert {k: v for k, v in after.items() if not k.startswith("ledger|")} == {
        k: v for k, v in before.items() if not k.startswith("ledger|")}
    again = await aggregator.aggregate(recent)
    assert (again.counted, again.duplicates) == (0, 2)


def test_the_timer_function_cleans_the_ledger_under_the_runtime(storage: str) -> None:
    """clean_usage_ledger, invoked through the local host and the real runtime, honours LEDGER_RETENTION_DAYS."""
    key = f"k{uuid.uuid4().hex[:8]}"

    async def seed() -> None:
        async with open_table_service(StorageConfig(connection_string=storage)) as client:
            aggregator = Aggregator(client)
            for days in (20, 8, 2):
                await aggregator.aggregate([event(key, NOW - timedelta(days=days))])

    async def ledger_days() -> list[int]:
        async with open_table_service(StorageConfig(connection_string=storage)) as client:
            return sorted(round((NOW - datetime.fromisoformat(k.split("|")[1] + "+00:00")).total_seconds() / 86400)
                          for k in ledgers(await rows(client, key)))

    with running_gateway(storage, ledger_retention_days=7.0) as gw:
        gw.loop.run(seed())
        assert gw.loop.run(ledger_days()) == [2, 8, 20]
        triggers = {f.name: f.trigger for f in gw.host.functions}
        assert triggers["clean_usage_ledger"]["type"] == "timerTrigger"
        assert gw.loop.run(gw.host.run_timer("clean_usage_ledger")) is True
        assert gw.loop.run(ledger_days()) == [2]


def run_cli(args: list[str], storage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> tuple[int, str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("UsageStorage", storage)
    out = io.StringIO()
    code = main(args, out=out)
    return code, out.getvalue()


def test_rejects_list_and_replay(storage: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """list shows every reject; replay counts a fixed one once and removes it, keeps one still malformed, and
    refuses one whose stored body was cut."""
    key = f"k{uuid.uuid4().hex[:8]}"
    fixed = event(key, NOW - timedelta(hours=1), tokens=41)
    fixed_id = f"m-{uuid.uuid4().hex}"
    malformed = json.dumps({"schema": 1, "event_id": uuid.uuid4().hex, "key_name": key}).encode()
    too_long = b"x" * 40_000

    async def seed() -> None:
        async with open_table_service(StorageConfig(connection_string=storage)) as client:
            # as an older aggregator, since fixed, rejected it
            await Aggregator(client).ensure_tables()
            await client.get_table_client(REJECTS_TABLE).upsert_entity(
                reject_entity(fixed, "refused by a bug since fixed", fixed_id, NOW))
            await Aggregator(client).aggregate([malformed, too_long], message_ids=[f"bad-{key}", f"long-{key}"])

    async def month_total() -> int:
        async with open_table_service(StorageConfig(connection_string=storage)) as client:
            entity = await client.get_table_client(USAGE_TABLE).get_entity(
                f"{NOW - timedelta(hours=1):%Y-%m}|{key}", f"month|{NOW - timedelta(hours=1):%Y-%m}|gpt-4o")
            return as_int(entity["TotalTokens"])

    import asyncio

    asyncio.run(seed())
    code, out = run_cli(["rejects", "list", "--json"], storage, monkeypatch, tmp_path)
    assert code == 0
    listed = {r["message_id"]: r for r in json.loads(out)}
    assert {fixed_id, f"bad-{key}", f"long-{key}"} <= set(listed)
    assert (listed[fixed_id]["replayable"], listed[f"bad-{key}"]["replayable"],
            listed[f"long-{key}"]["replayable"]) == (True, True, False)
    code, table = run_cli(["rejects", "list"], storage, monkeypatch, tmp_path)
    assert code == 0 and listed[fixed_id]["id"][:12] in table and "refused by a bug since fixed" in table

    code, out = run_cli(["rejects", "replay", listed[fixed_id]["id"][:10]], storage, monkeypatch, tmp_path)
    assert (code, out.splitlines()[0][:10]) == (0, "replayed 1"), out
    assert asyncio.run(month_total()) == 42
    code, _ = run_cli(["rejects", "replay", listed[fixed_id]["id"]], storage, monkeypatch, tmp_path)
    assert code == 2 and "matches 0 rejects" in capsys.readouterr().err  # it is gone

    code, out = run_cli(["rejects", "replay", listed[f"bad-{key}"]["id"], listed[f"long-{key}"]["id"]], storage,
                        monkeypatch, tmp_path)
    assert code == 1 and "still rejected" in out and "not replayable" in out
    code, out = run_cli(["rejects", "list", "--json"], storage, monkeypatch, tmp_path)
    assert {f"bad-{key}", f"long-{key}"} <= {r["message_id"] for r in json.loads(out)}

    # the same message rejected again and replayed again: already counted, so removed and not counted twice
    async def reject_again() -> None:
        async with open_table_service(StorageConfig(connection_string=storage)) as client:
            await client.get_table_client(REJECTS_TABLE).upsert_entity(
                reject_entity(fixed, "refused by a bug since fixed", fixed_id, NOW))

    asyncio.run(reject_again())
    code, out = run_cli(["rejects", "replay", listed[fixed_id]["id"]], storage, monkeypatch, tmp_path)
    assert code == 0 and asyncio.run(month_total()) == 42
    code, _ = run_cli(["rejects", "replay"], storage, monkeypatch, tmp_path)
    assert code == 2
