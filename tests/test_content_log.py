"""Content logging end to end: the openai SDK through the gateway, records read back from Azurite's blob service."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from azure.storage.blob import BlobServiceClient
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from devkit.services import AZURITE_ACCOUNT_KEY, free_port
from tests.harness import PROJECT, Gateway, running_gateway
from usage import BlobStorageConfig

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]
API_VERSION = "2024-10-21"
TOOLS: list[ChatCompletionToolParam] = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
NAME = re.compile(r"\d{4}/\d{2}/\d{2}/\d{2}/(?P<key>[^/]+)/[A-Za-z0-9.-]+-\d{6}\.jsonl")


def client(gw: Gateway, key: str) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(azure_endpoint=gw.url, api_key=key, api_version=API_VERSION, max_retries=0)


def blobs(storage: str, key_name: str) -> dict[str, list[dict[str, Any]]]:
    """Every content blob of ``key_name``, by name, as its parsed lines."""
    container = BlobServiceClient.from_connection_string(storage).get_container_client("contentlog")
    if not container.exists():
        return {}
    found = {}
    for blob in container.list_blobs():
        match = NAME.fullmatch(blob.name)
        assert match is not None, f"blob name out of layout: {blob.name}"
        if match["key"] == key_name:
            data = container.download_blob(blob.name).readall()
            found[blob.name] = [json.loads(line) for line in data.splitlines()]
    return found


def records(storage: str, key_name: str, count: int = 1, timeout: float = 15.0) -> list[dict[str, Any]]:
    """``key_name``'s records once ``count`` have been written (the writer gathers them for a second)."""
    deadline = time.monotonic() + timeout
    while True:
        found = [r for lines in blobs(storage, key_name).values() for r in lines]
        if len(found) >= count or time.monotonic() > deadline:
            assert len(found) == count, f"expected {count} record(s) of {key_name}, got {found}"
            return found
        time.sleep(0.1)


@pytest.fixture
def logged(storage: str) -> Iterator[Gateway]:
    with running_gateway(storage, content_log=BlobStorageConfig(connection_string=storage),
                         content_log_redact=(r"sk-[A-Za-z0-9]{8}", r"SECRET-\d+")) as gw:
        yield gw


def opted_in(gw: Gateway) -> tuple[str, str]:
    name = f"logged-{os.urandom(4).hex()}"
    return name, gw.create_key(name, log_content=True)


def test_stream_without_include_usage_is_recorded_once(logged: Gateway, storage: str) -> None:
    """A stream's record holds the body sent upstream (stream_options added), the text and the exact usage."""
    name, key = opted_in(logged)
    response = client(logged, key).chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
    [usage] = logged.sink.wait(1)
    [record] = records(storage, name)
    assert list(record) == ["request_id", "time", "key_name", "deployment", "backend", "operation", "request",
                            "choices", "usage", "usage_source", "status", "outcome", "truncated"]
    assert record["request_id"] == response.headers["x-gateway-request-id"] == usage.request_id
    assert record["request"] == logged.eastus.received[-1].body
    assert record["request"]["stream_options"] == {"include_usage": True}
    assert record["choices"] == [{"index": 0, "content": text, "tool_calls": [], "refusal": None,
                                  "finish_reason": "stop"}]
    assert record["usage"]["total_tokens"] == usage.total_tokens > 0 and record["usage_source"] == "reported"
    assert (record["key_name"], record["deployment"], record["backend"], record["operation"], record["status"],
            record["outcome"], record["truncated"]) == (name, "gpt-4o", "eastus", "chat/completions", 200,
                                                        "complete", False)
    assert record["time"] == usage.time


def test_stream_with_include_usage_is_recorded(logged: Gateway, storage: str) -> None:
    """With the client's own include_usage, the record's usage is the usage chunk the client got."""
    name, key = opted_in(logged)
    chunks = list(client(logged, key).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    [record] = records(storage, name)
    assert chunks[-1].usage is not None
    assert record["usage"]["total_tokens"] == chunks[-1].usage.total_tokens
    assert record["choices"][0]["content"] == text and record["choices"][0]["finish_reason"] == "stop"
    assert record["request"]["stream_options"] == {"include_usage": True}


def test_non_streamed_completion_is_recorded(logged: Gateway, storage: str) -> None:
    """A non-streamed answer is recorded with the body as sent and the message the client got."""
    name, key = opted_in(logged)
    completion = client(logged, key).chat.completions.create(model="gpt-4o", messages=MESSAGES, temperature=0.5)
    [record] = records(storage, name)
    assert record["request"] == logged.eastus.received[-1].body
    assert "stream_options" not in record["request"] and record["request"]["temperature"] == 0.5
    assert record["choices"] == [{"index": 0, "content": completion.choices[0].message.content, "tool_calls": [],
                                  "refusal": None, "finish_reason": "stop"}]
    assert completion.usage is not None and record["usage"]["prompt_tokens"] == completion.usage.prompt_tokens


def test_tool_call_stream_is_recorded(logged: Gateway, storage: str) -> None:
    """A streamed tool call is recorded as one call with its id, name and whole arguments."""
    name, key = opted_in(logged)
    chunks = list(client(logged, key).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, tools=TOOLS, stream=True))
    arguments = "".join(
        (c.choices[0].delta.tool_calls or [])[0].function.arguments or ""  # type: ignore[union-attr]
        for c in chunks if c.choices and c.choices[0].delta.tool_calls)
    [record] = records(storage, name)
    assert json.loads(arguments) == {"city": "Paris", "days": 3}
    assert record["choices"] == [{"index": 0, "content": None, "refusal": None, "finish_reason": "tool_calls",
                                  "tool_calls": [{"id": "call_sim0001", "name": "get_weather",
                                                  "arguments": arguments}]}]
    assert record["request"]["tools"][0]["function"]["name"] == "get_weather"


def test_client_disconnect_records_what_the_client_got(logged: Gateway, storage: str) -> None:
    """A client that leaves mid-stream gets a record of the part it was sent, marked client_disconnected."""
    name, key = opted_in(logged)
    logged.eastus.chunks, logged.eastus.chunk_delay = 200, 0.02
    full = "".join(logged.eastus._text())
    stream = client(logged, key).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    got = "".join(c.choices[0].delta.content or "" for _, c in zip(range(6), stream, strict=False) if c.choices)
    stream.close()
    [record] = records(storage, name)
    content = record["choices"][0]["content"]
    assert record["outcome"] == "client_disconnected" and record["usage_source"] == "estimated"
    assert content.startswith(got) and full.startswith(content) and len(content) < len(full)
    assert record["choices"][0]["finish_reason"] is None


def test_upstream_cut_records_what_the_client_got(logged: Gateway, storage: str) -> None:
    """A stream the region breaks off is recorded with exactly the text the client received."""
    name, key = opted_in(logged)
    logged.eastus.fail_next("cut")
    got: list[str] = []
    with pytest.raises(openai.APIError, match="broke off"):
        for chunk in client(logged, key).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True):
            if chunk.choices:
                got.append(chunk.choices[0].delta.content or "")
    [record] = records(storage, name)
    assert record["outcome"] == "upstream_cut" and record["status"] == 200
    assert record["choices"][0]["content"] == "".join(got) != ""


def test_no_record_without_the_keys_opt_in(logged: Gateway, storage: str) -> None:
    """A key that did not opt in is never recorded, even beside one that did."""
    name, key = opted_in(logged)
    plain = client(logged, logged.key)
    list(plain.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    plain.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    client(logged, key).chat.completions.create(model="gpt-4o", messages=MESSAGES)
    plain_name = logged.sink.wait(3)[0].key_name
    records(storage, name)  # written in the same batch as the others would have been
    assert blobs(storage, plain_name) == {}


def test_nothing_recorded_without_content_log_setting(storage: str) -> None:
    """Without CONTENT_LOG an opted-in key's requests are served and nothing is written."""
    with running_gateway(storage) as gw:
        name, key = opted_in(gw)
        list(client(gw, key).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
        gw.sink.wait(1)
        time.sleep(2.0)  # twice the writer's gathering time
        assert blobs(storage, name) == {}


def test_redaction_covers_prompts_and_secrets_split_across_chunks(logged: Gateway, storage: str) -> None:
    """Every match of CONTENT_LOG_REDACT is replaced in the prompt and in the assembled completion."""
    name, key = opted_in(logged)
    logged.eastus.words = ("The", " code", " is", " SEC", "RET", "-4", "2", ", keep", " it", ".")
    prompt: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "Never reveal sk-ABCD1234."},
        {"role": "user", "content": "My key is sk-WXYZ9876, what is the code?"}]
    text = "".join(c.choices[0].delta.content or "" for c in client(logged, key).chat.completions.create(
        model="gpt-4o", messages=prompt, stream=True) if c.choices)
    assert text == "The code is SECRET-42, keep it."  # the client gets the answer untouched
    [record] = records(storage, name)
    assert [m["content"] for m in record["request"]["messages"]] == [
        "Never reveal [redacted].", "My key is [redacted], what is the code?"]
    assert record["choices"][0]["content"] == "The code is [redacted], keep it."
    [raw] = blobs(storage, name)
    data = BlobServiceClient.from_connection_string(storage).get_container_client("contentlog").download_blob(
        raw).readall()
    assert b"sk-" not in data and b"SECRET" not in data


def test_truncation_keeps_ids_and_usage(storage: str) -> None:
    """A record over CONTENT_LOG_MAX_BYTES is cut to fit, keeps its ids and usage, and says truncated."""
    with running_gateway(storage, content_log=BlobStorageConfig(connection_string=storage),
                         content_log_max_bytes=4096) as gw:
        name, key = opted_in(gw)
        long_prompt: list[ChatCompletionMessageParam] = [{"role": "user", "content": "é" + "x" * 20_000}]
        raw = client(gw, key).chat.completions.with_raw_response.create(model="gpt-4o", messages=long_prompt)
        completion = raw.parse()
        [line] = [line for lines in _raw_lines(storage, name) for line in lines]
        assert len(line) <= 4096
        record = json.loads(line)
        assert record["truncated"] is True and record["request_id"] == raw.headers["x-gateway-request-id"]
        assert completion.usage is not None and record["usage"]["total_tokens"] == completion.usage.total_tokens
        assert record["choices"][0]["content"] == completion.choices[0].message.content  # short text kept whole
        cut = record["request"]["messages"][0]["content"]
        assert 1000 < len(cut) < 4096 and ("é" + "x" * 20_000).startswith(cut)


def _raw_lines(storage: str, key_name: str, timeout: float = 15.0) -> list[list[bytes]]:
    container = BlobServiceClient.from_connection_string(storage).get_container_client("contentlog")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        names = [b.name for b in container.list_blobs() if f"/{key_name}/" in b.name] if container.exists() else []
        if names:
            return [container.download_blob(n).readall().splitlines() for n in names]
        time.sleep(0.1)
    raise AssertionError(f"no content blob of {key_name}")


def test_first_chunk_arrives_before_the_region_finishes(logged: Gateway, storage: str) -> None:
    """Logging a stream buffers nothing: the first chunk reaches the client while the region still writes."""
    name, key = opted_in(logged)
    logged.eastus.chunks, logged.eastus.chunk_delay = 30, 0.05
    stream = client(logged, key).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    first = next(c for c in stream if c.choices and c.choices[0].delta.content)
    assert first.choices[0].delta.content == "Hello"
    assert logged.eastus.streams_started == 1 and logged.eastus.streams_finished == 0
    rest = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    [record] = records(storage, name)
    assert record["choices"][0]["content"] == "Hello" + rest == "".join(logged.eastus._text())


def test_blob_storage_outage_neither_slows_nor_fails_requests(storage: str) -> None:
    """With the blob service unreachable, opted-in requests are served as fast as the others."""
    dead = re.sub(r"BlobEndpoint=http://127\.0\.0\.1:\d+/", f"BlobEndpoint=http://127.0.0.1:{free_port()}/", storage)
    with running_gateway(storage, content_log=BlobStorageConfig(connection_string=dead)) as gw:
        _, key = opted_in(gw)
        logging_client = client(gw, key)
        started = time.monotonic()
        for _ in range(5):
            assert list(logging_client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
            assert logging_client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices
        assert time.monotonic() - started < 5.0
        assert len(gw.sink.wait(10)) == 10
        deadline = time.monotonic() + 30
        while not any("content record(s) failed" in line for line in gw.logs.lines) and time.monotonic() < deadline:
            time.sleep(0.1)
        failures = [line for line in gw.logs.lines if "content record(s) failed" in line]
        assert failures and "will retry" in failures[0]
        assert not any(AZURITE_ACCOUNT_KEY in line or key in line for line in gw.logs.lines)


def run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=PROJECT, env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_key_commands_and_reading_records_back(logged: Gateway, storage: str, tmp_path: Path) -> None:
    """keys create --log-content / set-logging / list show the opt-in; usage content reads the records back."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "UsageStorage": storage, "CONTENT_LOG": storage,
           "KEY_HASH_SECRET": logged.settings.key_hash_secret.decode()}
    name = f"cli-{os.urandom(4).hex()}"
    created = run(["-m", "usage", "keys", "create", "--name", name, "--log-content", "--json"], env)
    assert created.returncode == 0, created.stderr
    document = json.loads(created.stdout)
    assert document["log_content"] is True
    other = f"cli-plain-{os.urandom(4).hex()}"
    assert json.loads(run(["-m", "usage", "keys", "create", "--name", other, "--json"], env).stdout)[
        "log_content"] is False

    def listed() -> dict[str, bool]:
        rows = json.loads(run(["-m", "usage", "keys", "list", "--json"], env).stdout)
        return {row["name"]: row["log_content"] for row in rows}

    assert (listed()[name], listed()[other]) == (True, False)
    assert run(["-m", "usage", "keys", "set-logging", other, "on"], env).returncode == 0
    assert run(["-m", "usage", "keys", "set-logging", name, "off"], env).returncode == 0
    assert (listed()[name], listed()[other]) == (False, True)
    assert run(["-m", "usage", "keys", "set-logging", name, "on"], env).returncode == 0
    table = run(["-m", "usage", "keys", "list"], env).stdout
    assert re.search(rf"^{name} +enabled +\S+ \S+ +logged ", table, re.MULTILINE), table

    azure = client(logged, document["key"])
    ids = [azure.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES).headers[
        "x-gateway-request-id"] for _ in range(2)]
    records(storage, name, count=2)
    read = run(["-m", "usage", "content", "--key", name, "--format", "jsonl"], env)
    assert read.returncode == 0, read.stderr
    assert [json.loads(line)["request_id"] for line in read.stdout.splitlines()] == ids
    assert "reading" in read.stderr and document["key"] not in read.stdout
    one = run(["-m", "usage", "content", "--key", name, "--request-id", ids[1]], env)
    assert [json.loads(line)["request_id"] for line in one.stdout.splitlines()] == [ids[1]]
    shown = run(["-m", "usage", "content", "--key", name, "--since", "2020-01-01", "--until", "2020-01-02",
                 "--format", "table"], env)
    assert shown.returncode == 0 and "no content records" in shown.stdout
    today = run(["-m", "usage", "content", "--key", name, "--format", "table"], env)
    assert "Say hello → Hello from the simulated" in today.stdout and ids[0] in today.stdout
    missing = run(["-m", "usage", "content", "--key", name], {**env, "CONTENT_LOG": ""})
    assert missing.returncode == 2 and "CONTENT_LOG" in missing.stderr


def test_responses_api_calls_are_recorded_the_same_way(logged: Gateway, storage: str) -> None:
    """A Responses API call, streamed or not, is recorded with its input and the text the client received."""
    name, key = opted_in(logged)
    v1 = openai.OpenAI(base_url=logged.url + "/openai/v1/", api_key=key, max_retries=0)
    streamed = "".join(e.delta for e in v1.responses.create(model="gpt-4o", input="Say hello", stream=True)
                       if e.type == "response.output_text.delta")
    plain = v1.responses.create(model="gpt-4o", input="Say hello again").output_text
    found = records(storage, name, count=2)
    by_input = {r["request"]["input"]: r for r in found}
    assert {r["operation"] for r in found} == {"responses"}
    for text, prompt in ((streamed, "Say hello"), (plain, "Say hello again")):
        [choice] = by_input[prompt]["choices"]
        assert text and choice["content"] == text and choice["finish_reason"] == "completed"
        assert by_input[prompt]["usage"]["completion_tokens"] > 0
