"""Measure: how far the gateway's estimate of a cut Responses API stream is from what the region reports.

Run by hand (``.venv/bin/python bench/estimate_responses.py``); it prints a Markdown table. It starts
Azurite, a simulated region (in this process, so it can be told to cut streams and asked what it would
have reported) and ``python -m gateway serve`` (log level debug, whose ``usage {...}`` lines carry the
estimates). Each case is one streamed ``POST /openai/v1/responses`` the region breaks off half-way.

The region's usage is a tokenizing imitation (``devkit/_sim_responses.py``): its per-item framing is
the chat recipe's, so for text it measures what the estimate cannot see (earlier turns, what was not
delivered), not the recipe against AOAI's own count, which needs a real region.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from devkit.services import azurite, free_port, wait_for_port  # noqa: E402
from devkit.simulator import SimulatedRegion  # noqa: E402
from usage import KeyStore, StorageConfig, open_table_service  # noqa: E402

PARAGRAPH = ("Azure OpenAI regions differ in capacity, so a gateway spreads requests over several of them, "
             "fails over when one throttles, and keeps each team's token count exact. ") * 6
CASES: list[tuple[str, dict[str, Any], int]] = [
    ("short string", {"input": "Tell me a story about regions."}, 40),
    ("long string", {"input": PARAGRAPH}, 200),
    ("instructions + 4 turns", {"instructions": "You are a terse assistant. Answer in one paragraph.", "input": [
        {"role": "user", "content": "What is failover?"},
        {"role": "assistant", "content": "Sending a request to another region when one fails."},
        {"role": "user", "content": "And affinity?"},
        {"role": "user", "content": [{"type": "input_text", "text": "Explain with an example."}]}]}, 100),
    ("German and Japanese", {"input": "Erklären Sie Lastverteilung. 負荷分散を説明してください。"}, 100),
    ("continuation (previous_response_id)", {"input": "Continue the story.", "previous_response_id": "PREVIOUS"}, 100),
    ("long output", {"input": "Write at length."}, 800),
]


async def make_key(storage: str) -> str:
    async with open_table_service(StorageConfig(connection_string=storage)) as service:
        return await KeyStore(service, secret=b"bench").create(f"estimates-{int(time.time())}")


def usage_line(log: Path, request_id: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log.read_text(errors="replace").splitlines():
            if "usage {" in line and request_id in line:
                return dict(json.loads(line[line.index("usage {") + 6:]))
        time.sleep(0.05)
    raise TimeoutError(f"no usage record for {request_id}")


async def cut_stream(session: aiohttp.ClientSession, url: str, key: str, body: dict[str, Any]) -> tuple[str, str, int]:
    """(request id, response id, output deltas delivered) of one streamed create the region cuts."""
    async with session.post(url + "/openai/v1/responses", json={"model": "gpt-4o", **body, "stream": True},
                            headers={"api-key": key}) as answer:
        assert answer.status == 200, await answer.text()
        raw = await answer.read()
        request_id = answer.headers["x-gateway-request-id"]
    response_id, deltas = "", 0
    for frame in raw.split(b"\n\n"):
        data = b"".join(line[6:] for line in frame.splitlines() if line.startswith(b"data: "))
        if not data:
            continue
        event = json.loads(data)
        if event["type"] == "response.created":
            response_id = event["response"]["id"]
        deltas += event["type"] == "response.output_text.delta"
    assert b"BackendStreamInterrupted" in raw
    return request_id, response_id, deltas


def percent(estimate: int, truth: int) -> str:
    return f"{(estimate - truth) / truth * 100:+.1f}%" if truth else "n/a"


async def measure(url: str, key: str, region: SimulatedRegion, log: Path) -> list[str]:
    rows = ["| case | prompt: estimated / reported | completion: estimated / delivered before the cut "
            "| completion: estimated / full answer | total: estimated / full answer |", "|---|---|---|---|---|"]
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/openai/v1/responses", headers={"api-key": key},
                                json={"model": "gpt-4o", "input": PARAGRAPH}) as answer:
            previous = (await answer.json())["id"]
        for name, case, output in CASES:
            region.responses.output_tokens = output
            body = {**case, "previous_response_id": previous} if "previous_response_id" in case else case
            region.fail_next("cut")
            request_id, response_id, delivered = await cut_stream(session, url, key, body)
            record = await asyncio.to_thread(usage_line, log, request_id)
            assert record["usage_source"] == "estimated", record
            full = region.responses.reported[response_id]
            prompt, completion = record["prompt_tokens"], record["completion_tokens"]
            rows.append(
                f"| {name} | {prompt} / {full['input_tokens']} ({percent(prompt, full['input_tokens'])}) "
                f"| {completion} / {delivered} ({percent(completion, delivered)}) "
                f"| {completion} / {full['output_tokens']} ({percent(completion, full['output_tokens'])}) "
                f"| {prompt + completion} / {full['total_tokens']} "
                f"({percent(prompt + completion, full['total_tokens'])}) |")
    return rows


def start_gateway(port: int, region_url: str, storage: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "UsageStorage": storage, "KEY_HASH_SECRET": "bench",
           "AOAI_BACKENDS": json.dumps([{"name": "eastus", "endpoint": region_url, "api_key": "k"}])}
    with log.open("wb") as sink:
        return subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port), "--log-level", "debug"],
                                cwd=PROJECT, env=env, stdout=sink, stderr=subprocess.STDOUT)


async def run(storage: str, log: Path) -> list[str]:
    region = SimulatedRegion(name="eastus", api_key="k")
    region_url = await region.start()
    port = free_port()
    gateway = await asyncio.to_thread(start_gateway, port, region_url, storage, log)
    try:
        await asyncio.to_thread(wait_for_port, port, timeout=60)
        key = await make_key(storage)
        return await measure(f"http://127.0.0.1:{port}", key, region, log)
    finally:
        gateway.terminate()
        gateway.wait(30)
        await region.stop()


def main() -> None:
    with azurite() as storage, tempfile.TemporaryDirectory() as scratch:
        rows = asyncio.run(run(storage, Path(scratch) / "gateway.log"))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
