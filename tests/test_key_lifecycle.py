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


#: a short KEY_CACHE_SECONDS, passed on the gateway's clock (the test moves it; it stands still otherwise)
CACHE = 2.0


def test_changes_reach_an_idle_key_within_key_cache_seconds(storage: str) -> None:
    """A key unused for KEY_CACHE_SECONDS gets what the table says on its next request, not its old record."""
    with running_gateway(storage, key_cache_seconds=CACHE, key_stale_seconds=HOUR) as gw:
        revoked, rotated, revived, widened = (unique(n) for n in ("revoked", "rotated", "revived", "widened"))
        revoked_key = created(gw, "--name", revoked)
        old = created(gw, "--name", rotated)
        expired = created(gw, "--name", revived, "--expires", "2020-01-01")
        scoped = created(gw, "--name", widened, "--deployments", "gpt-35")
        assert chat(gw, revoked_key).choices and chat(gw, old).choices
        assert "expired" in refused(gw, expired)
        with pytest.raises(openai.PermissionDeniedError):
            chat(gw, scoped)

        assert cli(gw, "revoke", revoked).returncode == 0
        done = cli(gw, "rotate", rotated, "--grace", "0", "--json")
        assert done.returncode == 0, done.stderr
        new = json.loads(done.stdout)["key"]
        assert cli(gw, "set-expiry", revived, "none").returncode == 0
        assert cli(gw, "set-scope", widened, "all").returncode == 0
        gw.clock.advance(CACHE)

        assert "invalid" in refused(gw, revoked_key)
        assert "rotated" in refused(gw, old) and chat(gw, new).choices
        assert chat(gw, expired).choices
        assert chat(gw, scoped).choices


def test_changes_reach_a_busy_key_within_key_cache_seconds(storage: str) -> None:
    """A key in use is re-checked ahead in the background: its old record is never served past KEY_CACHE_SECONDS."""
    with running_gateway(storage, key_cache_seconds=CACHE, key_stale_seconds=HOUR) as gw:
        name = unique("busy")
        key = created(gw, "--name", name)
        assert chat(gw, key).choices
        assert cli(gw, "revoke", name).returncode == 0
        gw.clock.advance(CACHE * 0.85)
        assert chat(gw, key).choices  # still its cached record, which is re-checked meanwhile
        gw.clock.advance(CACHE * 0.2)
        assert "invalid" in refused(gw, key)


def test_deployments_all_means_every_deployment_and_none_is_refused(storage: str) -> None:
    """``create --deployments all`` is what ``set-scope NAME all`` is: no limit; ``none`` is no deployment name."""
    with running_gateway(storage, key_cache_seconds=0, key_stale_seconds=0) as gw:
        name = unique("everything")
        done = cli(gw, "create", "--name", name, "--deployments", "ALL", "--json")
        assert done.returncode == 0, done.stderr
        document = json.loads(done.stdout)
        assert document["deployments"] is None and listed(gw, name)["deployments"] is None
        assert chat(gw, document["key"]).choices and chat(gw, document["key"], model="gpt-35").choices
        text = cli(gw, "create", "--name", unique("everything"), "--deployments", "all")
        assert text.returncode == 0 and "deployments" not in text.stdout.splitlines()[0]

        nothing, mixed = unique("nothing"), unique("mixed")
        for args in (("create", "--name", nothing, "--deployments", "none"),
                     ("set-scope", name, "None"),
                     ("create", "--name", mixed, "--deployments", "gpt-4o,all"),
                     ("set-scope", name, "none,gpt-4o")):
            refused_scope = cli(gw, *args)
            assert refused_scope.returncode == 2, (args, refused_scope.stdout)
            assert "'all'" in refused_scope.stderr and "Traceback" not in refused_scope.stderr
        assert listed(gw, name)["deployments"] is None
        names = {row["name"] for row in json.loads(cli(gw, "list", "--json").stdout)}
        assert name in names and not names & {nothing, mixed}


def test_expires_takes_the_iso_8601_forms_and_keeps_fractions_of_a_second_exactly(storage: str) -> None:
    """Lowercase ``t``/``z``, basic and week forms, a comma: what Python's ``datetime.fromisoformat`` reads; a
    fraction of a second is kept to the microsecond and shown; one it would misread or cut is refused."""
    with running_gateway(storage) as gw:
        for given, shown in (("2099-12-31t18:00:00z", "2099-12-31T18:00:00Z"),
                             ("20991231T180000Z", "2099-12-31T18:00:00Z"),
                             ("2099-W01-1", "2098-12-29T00:00:00Z"),
                             ("2099-12-31 18:00:00.25+01:00", "2099-12-31T17:00:00.25Z"),
                             ("2099-12-31T18:00:00,000001z", "2099-12-31T18:00:00.000001Z")):
            name = unique("iso")
            done = cli(gw, "create", "--name", name, "--expires", given, "--json")
            assert done.returncode == 0, (given, done.stderr)
            assert json.loads(done.stdout)["expires_at"] == shown
            assert listed(gw, name)["expires_at"] == shown
            assert f" {shown} " in cli(gw, "list").stdout

        fractional = unique("fractional")
        assert cli(gw, "create", "--name", fractional, "--expires", "2099-01-01").returncode == 0
        done = cli(gw, "set-expiry", fractional, "2099-06-30T23:59:59.999999Z")
        assert done.returncode == 0 and "2099-06-30T23:59:59.999999Z" in done.stdout
        assert listed(gw, fractional)["expires_at"] == "2099-06-30T23:59:59.999999Z"

        past = cli(gw, "create", "--name", unique("past"), "--expires", "2020-01-01T00:00:00.5z", "--json")
        assert past.returncode == 0 and "2020-01-01T00:00:00.5Z is in the past" in past.stderr
        assert "expired at 2020-01-01T00:00:00.5Z" in refused(gw, json.loads(past.stdout)["key"])

        for bad in ("2099-12-31T18:00:00.1234567Z",  # finer than a microsecond: it would be cut
                    "2099-12-31T18.5Z", "2099-12-31T18:30.5Z"):  # a fraction of an hour, a minute: read as seconds
            done = cli(gw, "create", "--name", unique("bad"), "--expires", bad)
            assert done.returncode == 2 and "second" in done.stderr and "Traceback" not in done.stderr, bad
