"""The documented commands, run as a user would: python -m gateway serve and python -m usage keys."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from devkit.services import free_port, wait_for_port
from devkit.simulator import SimulatedRegion
from tests.harness import PROJECT, LoopThread


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


@pytest.fixture
def environment(storage: str, tmp_path: Path) -> Iterator[tuple[dict[str, str], SimulatedRegion]]:
    loop = LoopThread()
    region = SimulatedRegion(name="eastus", api_key="backend-secret")
    loop.run(region.start())
    env = {
        **os.environ,
        "PYTHONPATH": str(PROJECT),
        "UsageStorage": storage,
        "AOAI_BACKENDS": json.dumps([{"name": "east", "endpoint": region.url, "api_key": "backend-secret"}]),
        "KEY_HASH_SECRET": "commands-test",
        "KEY_CACHE_SECONDS": "0",  # with no stale answers either, a revoked key is refused at once
        "KEY_STALE_SECONDS": "0",
    }
    try:
        yield env, region
    finally:
        loop.run(region.stop())
        loop.close()


def test_keys_cli_and_serve_end_to_end(environment: tuple[dict[str, str], SimulatedRegion], tmp_path: Path) -> None:
    """A key made with the CLI works through `python -m gateway serve`, until it is revoked."""
    env, region = environment
    created = run(["-m", "usage", "keys", "create", "--name", "cli-team", "--json"], env, tmp_path)
    assert created.returncode == 0, created.stderr
    document = json.loads(created.stdout)
    assert document["name"] == "cli-team" and len(document["key"]) > 30

    again = run(["-m", "usage", "keys", "create", "--name", "cli-team"], env, tmp_path)
    assert again.returncode != 0 and "cli-team" in again.stderr and "Traceback" not in again.stderr

    listed = run(["-m", "usage", "keys", "list", "--json"], env, tmp_path)
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["cli-team"]["enabled"] is True and document["key"] not in listed.stdout

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port)], cwd=PROJECT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port)
        client = openai.AzureOpenAI(azure_endpoint=f"http://127.0.0.1:{port}", api_key=document["key"],
                                    api_version="2024-10-21", max_retries=0)
        stream = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}],
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "".join(region._text())

        revoked = run(["-m", "usage", "keys", "revoke", "cli-team"], env, tmp_path)
        assert revoked.returncode == 0, revoked.stderr
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
    assert "worker loaded 30 function(s)" in output and "stopped" in output
    assert document["key"] not in output and "backend-secret" not in output
    report = run(["-m", "usage", "report", "--key", "cli-team", "--format", "json"], env, tmp_path)
    [row] = json.loads(report.stdout)
    assert row["requests"] == 1 and row["estimated_tokens"] == 0  # the stream's exact usage, counted once
    listed = run(["-m", "usage", "keys", "list"], env, tmp_path)
    assert "cli-team" in listed.stdout and "revoked" in listed.stdout


def test_quota_and_report_commands(environment: tuple[dict[str, str], SimulatedRegion], tmp_path: Path) -> None:
    """Quotas set from the CLI show in `keys list`; `report` reads what the aggregator counted."""
    env, _ = environment
    created = run(["-m", "usage", "keys", "create", "--name", "quota-team", "--tokens-per-minute", "1000",
                   "--tokens-per-day", "20000", "--json"], env, tmp_path)
    assert created.returncode == 0, created.stderr
    document = json.loads(created.stdout)
    assert (document["tokens_per_minute"], document["tokens_per_day"], document["tokens_per_month"]) == (
        1000, 20000, None)
    changed = run(["-m", "usage", "keys", "set-quota", "quota-team", "--tokens-per-minute", "none",
                   "--tokens-per-month", "500000"], env, tmp_path)
    assert changed.returncode == 0, changed.stderr
    rows = {r["name"]: r for r in json.loads(run(["-m", "usage", "keys", "list", "--json"], env, tmp_path).stdout)}
    assert (rows["quota-team"]["tokens_per_minute"], rows["quota-team"]["tokens_per_day"],
            rows["quota-team"]["tokens_per_month"]) == (None, 20000, 500000)

    bad = run(["-m", "usage", "keys", "set-quota", "quota-team", "--tokens-per-day", "-5"], env, tmp_path)
    assert bad.returncode == 2 and "negative" in bad.stderr

    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port)], cwd=PROJECT,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        client = openai.AzureOpenAI(azure_endpoint=f"http://127.0.0.1:{port}", api_key=document["key"],
                                    api_version="2024-10-21")
        totals = []
        for stream in (True, False):
            if stream:
                chunks = list(client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "hi"}], stream=True,
                    stream_options={"include_usage": True}))
                usage = chunks[-1].usage
            else:
                usage = client.chat.completions.create(model="gpt-4o",
                                                       messages=[{"role": "user", "content": "hi"}]).usage
            assert usage is not None
            totals.append(usage.total_tokens)
        # the local run counts in process after a short linger: a report a second later shows both requests
        time.sleep(1.0)
        report = run(["-m", "usage", "report", "--key", "quota-team", "--format", "json"], env, tmp_path)
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(30)
    assert report.returncode == 0, report.stderr
    [row] = json.loads(report.stdout)
    assert row["key"] == "quota-team" and row["total_tokens"] == sum(totals) and row["requests"] == 2
    by_day = run(["-m", "usage", "report", "--key", "quota-team", "--by", "day", "--format", "chart"], env, tmp_path)
    assert "█" in by_day.stdout and f"{sum(totals):,}" in by_day.stdout
    table = run(["-m", "usage", "report", "--by", "deployment"], env, tmp_path)
    assert "gpt-4o" in table.stdout and "TOTAL" in table.stdout
    reversed_range = run(["-m", "usage", "report", "--since", "2026-02-01", "--until", "2026-01-01"], env, tmp_path)
    assert reversed_range.returncode == 2 and "after" in reversed_range.stderr
