"""Key expiry (``--expires``) and rotation (``keys rotate NAME --grace HOURS``): through the CLI as operators run
it, and the openai SDK against the running gateway, whose wall clock the test moves (``gateway.clock``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import openai
import pytest

from tests.harness import PROJECT, Gateway, eventually, running_gateway
from usage import KeyStore, hash_key, open_table_service
from usage._keys import PARTITION
from usage._tables import KEYS_TABLE

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]
HOUR = 3600.0


def unique(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def cli(gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m usage keys ...`` against the gateway's key table and secret."""
    assert gw.settings.storage.connection_string is not None
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "UsageStorage": gw.settings.storage.connection_string,
           "KEY_HASH_SECRET": gw.settings.key_hash_secret.decode()}
    return subprocess.run([sys.executable, "-m", "usage", "keys", *args], cwd=PROJECT, env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def created(gw: Gateway, *args: str) -> str:
    done = cli(gw, "create", *args, "--json")
    assert done.returncode == 0, done.stderr
    return str(json.loads(done.stdout)["key"])


def listed(gw: Gateway, name: str) -> dict[str, Any]:
    done = cli(gw, "list", "--json")
    assert done.returncode == 0, done.stderr
    return next(row for row in json.loads(done.stdout) if row["name"] == name)


def chat(gw: Gateway, key: str, model: str = "gpt-4o") -> Any:
    client = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=key, api_version="2024-10-21", max_retries=0)
    return client.chat.completions.create(model=model, messages=MESSAGES)


def refused(gw: Gateway, key: str) -> str:
    """The 401's message, checked to be AOAI-shaped and free of the key."""
    with pytest.raises(openai.AuthenticationError) as caught:
        chat(gw, key)
    body = caught.value.response.json()
    assert set(body["error"]) >= {"code", "message"} and key not in caught.value.response.text
    return str(body["error"]["message"])


def test_an_expiring_key_stops_at_its_moment_even_while_cached(storage: str) -> None:
    # answers cached for hours, never re-read: the expiry is compared with the clock on each request
    with running_gateway(storage, key_cache_seconds=10 * HOUR, key_stale_seconds=20 * HOUR) as gw:
        name = unique("expiring")
        expires = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
        offset = expires.astimezone(ZoneInfo("Asia/Kolkata")).isoformat()  # +05:30
        key = created(gw, "--name", name, "--expires", offset)
        row = listed(gw, name)
        assert row["expires_at"] == expires.strftime("%Y-%m-%dT%H:%M:%SZ") and row["state"] == "enabled"
        assert chat(gw, key).choices
        gw.clock.advance(2 * HOUR - 60)
        assert chat(gw, key).choices
        gw.clock.advance(120)
        message = refused(gw, key)
        assert "expired" in message and expires.strftime("%Y-%m-%dT%H:%M:%SZ") in message

        pushed = cli(gw, "set-expiry", name, "none")  # the cached record still says it expired
        assert pushed.returncode == 0, pushed.stderr
        assert listed(gw, name)["expires_at"] is None


def test_expires_takes_a_date_or_date_time_and_refuses_anything_else(storage: str) -> None:
    with running_gateway(storage) as gw:
        dated, over = unique("dated"), unique("over")
        key = created(gw, "--name", dated, "--expires", "2099-12-31")
        assert listed(gw, dated)["expires_at"] == "2099-12-31T00:00:00Z"  # a date: its first moment, UTC
        assert chat(gw, key).choices
        for bad in ("tomorrow", "2026-13-01", "31/12/2026"):
            done = cli(gw, "create", "--name", "bad-date", "--expires", bad)
            assert done.returncode == 2 and "ISO 8601" in done.stderr and "Traceback" not in done.stderr
        past = cli(gw, "create", "--name", over, "--expires", "2020-01-01T00:00:00Z", "--json")
        assert past.returncode == 0 and "in the past" in past.stderr
        assert "expired" in refused(gw, json.loads(past.stdout)["key"])
        assert listed(gw, over)["state"] == "expired"


def test_a_rotated_key_works_through_its_grace_period_with_everything_the_old_one_had(storage: str) -> None:
    # known keys are re-checked in the background every 30 s, and served from memory meanwhile
    with running_gateway(storage, key_cache_seconds=30, key_stale_seconds=10 * HOUR) as gw:
        name = unique("rotating")
        old = created(gw, "--name", name, "--deployments", "gpt-4o,embed", "--tokens-per-day", "1000000",
                      "--expires", "2099-01-01")
        assert chat(gw, old).choices
        rotated = cli(gw, "rotate", name, "--grace", "2", "--json")
        assert rotated.returncode == 0, rotated.stderr
        document = json.loads(rotated.stdout)
        assert set(document) == {"name", "key"} and document["name"] == name
        new = document["key"]
        assert new != old and new.startswith("gw-")

        row = listed(gw, name)
        until = datetime.fromisoformat(row["previous_key_valid_until"])
        assert timedelta(hours=1, minutes=59) < until - datetime.now(UTC) <= timedelta(hours=2)
        assert (row["deployments"], row["expires_at"], row["tokens_per_day"]) == (
            ["embed", "gpt-4o"], "2099-01-01T00:00:00Z", 1_000_000)
        table = cli(gw, "list").stdout
        assert "previous key valid until" in table and "embed,gpt-4o" in table
        assert old not in table + json.dumps(row) and new not in table + json.dumps(row)

        gw.clock.advance(31)  # the cached record of the old key is refreshed: it now knows its grace period
        assert chat(gw, old).choices and chat(gw, new).choices
        with pytest.raises(openai.PermissionDeniedError):
            chat(gw, new, model="gpt-35")  # the scope came along
        gw.clock.advance(2 * HOUR - 31 - 60)
        assert chat(gw, old).choices
        gw.clock.advance(120)
        message = refused(gw, old)
        assert "expired" in message and "rotated" in message
        assert chat(gw, new).choices

        records = gw.sink.wait(6)  # the 401 authenticated no one: like a revoked key's, it is not counted
        assert [(r.key_name, r.status) for r in records] == [(name, s) for s in (200, 200, 200, 403, 200, 200)]


def test_rotating_again_ends_the_older_key_and_revoke_ends_both(storage: str) -> None:
    # no cache: what the table says is what the next request gets
    with running_gateway(storage, key_cache_seconds=0, key_stale_seconds=0) as gw:
        twice, at_once = unique("twice"), unique("at-once")
        first = created(gw, "--name", twice)
        second = json.loads(cli(gw, "rotate", twice, "--json").stdout)["key"]  # 24 hours' grace by default
        assert chat(gw, first).choices and chat(gw, second).choices
        third = json.loads(cli(gw, "rotate", twice, "--grace", "1", "--json").stdout)["key"]
        assert "invalid" in refused(gw, first)  # the key replaced before is gone at once
        assert chat(gw, second).choices and chat(gw, third).choices

        assert cli(gw, "revoke", twice).returncode == 0
        for key in (second, third):
            assert "invalid" in refused(gw, key)
        again = cli(gw, "rotate", twice)
        assert again.returncode == 1 and "revoked" in again.stderr and "Traceback" not in again.stderr

        now = created(gw, "--name", at_once)
        done = cli(gw, "rotate", at_once, "--grace", "0")
        assert done.returncode == 0 and "stops working now" in done.stdout
        fresh = done.stdout.strip().splitlines()[-1]
        assert "expired" in refused(gw, now) and chat(gw, fresh).choices
        missing = cli(gw, "rotate", "no-such-team")
        assert missing.returncode == 1 and "no-such-team" in missing.stderr
        negative = cli(gw, "rotate", at_once, "--grace", "-1")
        assert negative.returncode == 2 and "grace" in negative.stderr


def test_a_key_in_its_grace_period_moves_to_a_new_key_hash_secret(storage: str) -> None:
    """KEY_HASH_SECRET rotation still works for a key ``keys rotate`` replaced: it moves too, and stays a grace key."""
    old_secret, new_secret = b"lifecycle-old", b"lifecycle-new"
    name = unique("grace-rehash")

    async def rotate() -> tuple[str, str]:
        async with open_table_service(gw.settings.storage) as service:
            store = KeyStore(service, secret=old_secret)
            first = await store.create(name)
            return first, await store.rotate(name, grace=timedelta(hours=1))

    async def pointers() -> tuple[str, str]:
        async with open_table_service(gw.settings.storage) as service:
            row = await service.get_table_client(KEYS_TABLE).get_entity(PARTITION, "name-" + name)
            return str(row["Hash"]), str(row["PreviousHash"])

    with running_gateway(storage, key_hash_secret=new_secret, key_hash_previous_secret=old_secret) as gw:
        first, second = gw.loop.run(rotate())
        before = gw.loop.run(pointers())
        assert chat(gw, first).choices and chat(gw, second).choices
        eventually(lambda: gw.loop.run(pointers()) == (hash_key(second, new_secret), hash_key(first, new_secret)),
                   timeout=10, message=lambda: (before, gw.loop.run(pointers())))
        gw.clock.advance(HOUR + 60)
        assert "expired" in refused(gw, first)
        assert chat(gw, second).choices


def test_scopes_are_set_and_changed_from_the_cli(storage: str) -> None:
    with running_gateway(storage, key_cache_seconds=0, key_stale_seconds=0) as gw:
        name = unique("scoped")
        done = cli(gw, "create", "--name", name, "--deployments", "gpt-4o, embed")
        assert done.returncode == 0 and "deployments embed,gpt-4o" in done.stdout
        key = done.stdout.strip().splitlines()[-1]
        assert chat(gw, key).choices
        with pytest.raises(openai.PermissionDeniedError):
            chat(gw, key, model="gpt-35")
        assert cli(gw, "set-scope", name, "gpt-35").returncode == 0
        assert chat(gw, key, model="gpt-35").choices
        with pytest.raises(openai.PermissionDeniedError):
            chat(gw, key)
        assert listed(gw, name)["deployments"] == ["gpt-35"]
        assert cli(gw, "set-scope", name, "all").returncode == 0
        assert chat(gw, key).choices and listed(gw, name)["deployments"] is None
        for bad in ("gpt 4o", ",", "a/b"):
            refused_scope = cli(gw, "create", "--name", unique("bad"), "--deployments", bad)
            assert refused_scope.returncode == 2 and "deployment" in refused_scope.stderr
            assert "Traceback" not in refused_scope.stderr
