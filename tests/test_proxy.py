"""The request path through the real openai SDK against the running local host."""

from __future__ import annotations

import json
import time

import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from devkit.simulator import SimulatedRegion
from gateway import BackendConfig
from tests.harness import Gateway, http

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Say hello"}]
API_VERSION = "2024-10-21"


def azure_client(gw: Gateway) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(azure_endpoint=gw.url, api_key=gw.key, api_version=API_VERSION, max_retries=0)


def v1_client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/openai/v1/", api_key=gw.key, max_retries=0)


def expected_text(region: SimulatedRegion) -> str:
    return "".join(region._text())


def wait_until(predicate: object, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.01)
    return False


def test_stream_text_and_usage_intact(gateway: Gateway) -> None:
    """A streamed answer arrives whole and its reported usage is recorded exactly."""
    stream = azure_client(gateway).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_text(gateway.eastus)
    [record] = gateway.sink.wait(1)
    sent = gateway.eastus.received[-1].body
    assert record.usage_source == "reported"
    assert record.prompt_tokens == SimulatedRegion.prompt_tokens(sent)
    assert record.completion_tokens == gateway.eastus.chunks
    assert record.total_tokens == record.prompt_tokens + record.completion_tokens
    assert (record.key_name, record.deployment, record.backend, record.streaming) == (
        record.key_name, "gpt-4o", "eastus", True)
    assert record.key_name.startswith("team-")
    assert record.ttfb_ms is not None and record.model == "gpt-4o-2024-08-06"


def test_include_usage_added_and_its_chunk_stripped(gateway: Gateway) -> None:
    """The gateway asks for usage upstream and the client still gets what AOAI would have sent it."""
    response = http(
        "POST", f"{gateway.url}/openai/deployments/gpt-4o/chat/completions?api-version={API_VERSION}",
        headers={"api-key": gateway.key, "content-type": "application/json"},
        body=json.dumps({"messages": MESSAGES, "stream": True}).encode())
    assert response.status == 200
    assert gateway.eastus.received[-1].body["stream_options"] == {"include_usage": True}
    assert '"usage"' not in response.text
    frames = [f for f in response.text.split("\n\n") if f]
    assert frames[-1] == "data: [DONE]"
    assert json.loads(frames[0][6:])["prompt_filter_results"]
    assert gateway.sink.wait(1)[0].usage_source == "reported"


def test_client_that_asks_for_usage_gets_the_usage_chunk(gateway: Gateway) -> None:
    """A client's own include_usage is honoured: it gets the usage chunk AOAI reported."""
    stream = azure_client(gateway).chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0].choices == []
    [record] = gateway.sink.wait(1)
    assert usage_chunks[0].usage is not None
    assert usage_chunks[0].usage.total_tokens == record.total_tokens
    assert usage_chunks[0].usage.completion_tokens == gateway.eastus.chunks


def test_v1_path_stream_and_non_stream(gateway: Gateway) -> None:
    """OpenAI(base_url=.../openai/v1) works, with the deployment taken from 'model'."""
    client = v1_client(gateway)
    text = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True) if c.choices)
    assert text == expected_text(gateway.eastus)
    completion = client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert completion.choices[0].message.content == expected_text(gateway.eastus)
    assert gateway.eastus.received[-1].path == "/openai/v1/chat/completions"
    records = gateway.sink.wait(2)
    assert [r.usage_source for r in records] == ["reported", "reported"]
    assert completion.usage is not None and records[1].total_tokens == completion.usage.total_tokens


async def test_async_clients_stream(gateway: Gateway) -> None:
    """AsyncAzureOpenAI and AsyncOpenAI stream through the gateway too."""
    azure = openai.AsyncAzureOpenAI(azure_endpoint=gateway.url, api_key=gateway.key, api_version=API_VERSION)
    plain = openai.AsyncOpenAI(base_url=gateway.url + "/openai/v1/", api_key=gateway.key)
    for client in (azure, plain):
        stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == expected_text(gateway.eastus)
        await client.close()
    assert len(gateway.sink.wait(2)) == 2


def test_non_streaming_and_embeddings_pass_through(gateway: Gateway) -> None:
    """Bodies come back unchanged and usage is read from them, for chat, completions and embeddings."""
    client = azure_client(gateway)
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    body = json.loads(raw.text)
    assert body["choices"][0]["message"]["content"] == expected_text(gateway.eastus)
    assert raw.headers["x-gateway-backend"] == "eastus"
    assert raw.headers["x-ms-region"] == "eastus"
    assert raw.headers["x-ratelimit-remaining-tokens"] == "99000"
    assert "apim-request-id" in raw.headers
    legacy = client.completions.create(model="gpt-35-instruct", prompt="Once")
    assert legacy.choices[0].text == expected_text(gateway.eastus)
    embedding = client.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(embedding.data) == 2
    v1_embedding = v1_client(gateway).embeddings.create(model="text-embedding-3-small", input="a")
    assert len(v1_embedding.data) == 1
    records = gateway.sink.wait(4)
    assert [r.operation for r in records] == ["chat/completions", "completions", "embeddings", "embeddings"]
    assert records[0].total_tokens == body["usage"]["total_tokens"]
    assert embedding.usage.total_tokens == records[2].total_tokens
    assert all(r.usage_source == "reported" and not r.streaming for r in records)


def test_first_chunk_arrives_while_upstream_still_generating(gateway: Gateway) -> None:
    """The first chunk reaches the client long before the upstream stream ends."""
    gateway.eastus.chunks, gateway.eastus.chunk_delay = 30, 0.05
    stream = azure_client(gateway).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    first_content = next(c for c in stream if c.choices and c.choices[0].delta.content)
    assert first_content.choices[0].delta.content == "Hello"
    assert gateway.eastus.streams_started == 1 and gateway.eastus.streams_finished == 0
    rest = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert "Hello" + rest == expected_text(gateway.eastus)


def test_429_fails_over_and_honours_retry_after_ms(gateway: Gateway) -> None:
    """A throttled region is skipped for exactly its retry-after-ms, then used again."""
    gateway.eastus.retry_after_ms, gateway.eastus.retry_after = "30000", "30"
    gateway.eastus.fail_next("429")
    client = azure_client(gateway)
    first = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert first.headers["x-gateway-backend"] == "westus"
    assert len(gateway.eastus.received) == 1
    gateway.clock.advance(29.9)
    again = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert again.headers["x-gateway-backend"] == "westus" and len(gateway.eastus.received) == 1
    gateway.clock.advance(0.2)
    back = client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert back.headers["x-gateway-backend"] == "eastus" and len(gateway.eastus.received) == 2


def test_429_retry_after_seconds_when_no_ms(gateway: Gateway) -> None:
    """Without retry-after-ms, retry-after seconds set the cooling time."""
    gateway.eastus.retry_after_ms, gateway.eastus.retry_after = None, "7"
    gateway.eastus.fail_next("429")
    client = azure_client(gateway)
    assert client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES).headers["x-gateway-backend"] == "westus"
    gateway.clock.advance(6.5)
    assert client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES).headers["x-gateway-backend"] == "westus"
    gateway.clock.advance(1.0)
    assert client.chat.completions.with_raw_response.create(
        model="gpt-4o", messages=MESSAGES).headers["x-gateway-backend"] == "eastus"


def test_all_cooling_gives_429_with_retry_after(gateway: Gateway) -> None:
    """When every region throttles, the client gets a 429 with the soonest recovery time."""
    gateway.eastus.retry_after_ms, gateway.westus.retry_after_ms = "20000", "12500"
    gateway.eastus.fail_next("429")
    gateway.westus.fail_next("429")
    client = azure_client(gateway)
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    headers = caught.value.response.headers
    assert headers["retry-after-ms"] == "12500" and headers["retry-after"] == "13"
    assert caught.value.response.json()["error"]["code"] == "429"
    gateway.clock.advance(5)
    with pytest.raises(openai.RateLimitError) as again:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert again.value.response.headers["retry-after-ms"] == "7500"
    assert len(gateway.eastus.received) == 1 and len(gateway.westus.received) == 1  # no one was bothered
    gateway.clock.advance(8)
    assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices


def test_5xx_fails_over(gateway: Gateway) -> None:
    """A 500 from one region is absorbed by the next."""
    gateway.eastus.fail_next("500")
    raw = azure_client(gateway).chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
    assert raw.headers["x-gateway-backend"] == "westus"


def test_refused_connection_fails_over(storage: str) -> None:
    """A region that refuses connections is skipped."""
    from devkit.services import free_port
    from gateway import BackendConfig
    from tests.harness import running_gateway

    dead = BackendConfig(name="dead", endpoint=f"http://127.0.0.1:{free_port()}", priority=0, api_key="x")
    with running_gateway(storage, backends=lambda regions: (dead, *regions)) as gw:
        raw = azure_client(gw).chat.completions.with_raw_response.create(model="gpt-4o", messages=MESSAGES)
        assert raw.headers["x-gateway-backend"] == "eastus"
        assert any("backend dead failed" in line for line in gw.logs.lines)


def test_content_filter_is_not_failed_over(gateway: Gateway) -> None:
    """A 400 content_filter goes back as it came; no other region is asked."""
    with pytest.raises(openai.BadRequestError) as caught:
        azure_client(gateway).chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "FILTER_ME"}], stream=True)
    error = caught.value.response.json()["error"]
    assert error["code"] == "content_filter"
    assert error["innererror"]["code"] == "ResponsibleAIPolicyViolation"
    assert len(gateway.westus.received) == 0


def test_client_disconnect_closes_upstream_and_estimates(gateway: Gateway) -> None:
    """When the client goes away mid-stream the upstream is closed and usage is estimated."""
    gateway.eastus.chunks, gateway.eastus.chunk_delay = 200, 0.02
    stream = azure_client(gateway).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    received = [c for _, c in zip(range(5), stream, strict=False)]
    assert len(received) == 5
    stream.close()
    assert wait_until(lambda: gateway.eastus.streams_abandoned == 1), "upstream was not closed"
    [record] = gateway.sink.wait(1)
    assert gateway.eastus.streams_finished == 0
    assert record.outcome == "client_disconnected" and record.usage_source == "estimated"
    assert 0 < record.completion_tokens < 200 and record.prompt_tokens > 0


def test_upstream_cut_is_estimated(gateway: Gateway) -> None:
    """A stream broken off by the upstream still produces an estimated usage record."""
    gateway.eastus.fail_next("cut")
    stream = azure_client(gateway).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
    with pytest.raises(openai.APIError, match="broke off"):
        list(stream)
    [record] = gateway.sink.wait(1)
    assert record.usage_source == "estimated" and record.completion_tokens > 0


def test_older_api_version_gets_no_stream_options(gateway: Gateway) -> None:
    """Before 2024-09-01-preview the gateway does not add stream_options and estimates usage."""
    client = openai.AzureOpenAI(azure_endpoint=gateway.url, api_key=gateway.key, api_version="2024-06-01")
    text = "".join(c.choices[0].delta.content or ""
                   for c in client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
                   if c.choices)
    assert text == expected_text(gateway.eastus)
    assert "stream_options" not in gateway.eastus.received[-1].body
    assert gateway.eastus.received[-1].query["api-version"] == "2024-06-01"
    [record] = gateway.sink.wait(1)
    assert record.usage_source == "estimated" and record.completion_tokens > 0


def test_backend_refusing_stream_options_is_retried_without(gateway: Gateway) -> None:
    """A backend that answers 400 to stream_options is asked again without it, and remembered."""
    gateway.eastus.stream_options_since = "2099-01-01"
    client = azure_client(gateway)
    for _ in range(2):
        text = "".join(c.choices[0].delta.content or ""
                       for c in client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
                       if c.choices)
        assert text == expected_text(gateway.eastus)
    bodies = [r.body for r in gateway.eastus.received]
    assert ["stream_options" in b for b in bodies] == [True, False, False]
    assert [r.usage_source for r in gateway.sink.wait(2)] == ["estimated", "estimated"]


def test_deployment_names_are_mapped_per_backend(storage: str) -> None:
    """A backend's own deployment name replaces ours in the path and in the v1 body."""
    from dataclasses import replace

    from tests.harness import running_gateway

    def mapped(regions: tuple[BackendConfig, ...]) -> tuple[BackendConfig, ...]:
        east, west = regions
        return replace(east, deployments={"chat": "gpt-4o-east"}), replace(west, deployments={"other": "x"})

    with running_gateway(storage, backends=mapped) as gw:
        azure_client(gw).chat.completions.create(model="chat", messages=MESSAGES)
        assert gw.eastus.received[-1].path == "/openai/deployments/gpt-4o-east/chat/completions"
        v1_client(gw).chat.completions.create(model="chat", messages=MESSAGES)
        assert gw.eastus.received[-1].body["model"] == "gpt-4o-east"
        with pytest.raises(openai.NotFoundError) as caught:
            azure_client(gw).chat.completions.create(model="unknown", messages=MESSAGES)
        assert caught.value.response.json()["error"]["code"] == "DeploymentNotFound"
