"""The Responses API through the real openai SDK: both client shapes, streams, usage, stored responses."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import openai
import pytest

from devkit._sim_responses import output_deltas
from gateway import _tokens
from gateway._affinity import AFFINITY_TABLE
from tests.harness import Gateway, http
from usage import open_table_service

PREVIEW = "2025-04-01-preview"
PROMPT = "Tell me a story about regions."


def v1_client(gw: Gateway, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/openai/v1", api_key=gw.key, max_retries=0, **options)


def azure_client(gw: Gateway, **options: Any) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(azure_endpoint=gw.url, api_key=gw.key, api_version=PREVIEW, max_retries=0, **options)


def story(count: int = 20) -> str:
    return "".join(output_deltas(count))


def affinity_row(gw: Gateway, response_id: str) -> dict[str, Any] | None:
    async def read() -> dict[str, Any] | None:
        async with open_table_service(gw.settings.storage) as service:
            table = service.get_table_client(AFFINITY_TABLE)
            found = [dict(e) async for e in table.query_entities("PartitionKey eq @id", parameters={"id": response_id})]
            return found[0] if found else None

    return gw.loop.run(read())


def test_create_streamed_and_not_through_both_client_shapes(gateway: Gateway) -> None:
    """client.responses.create works through OpenAI(base_url=…/openai/v1) and AzureOpenAI(api_version=preview),
    streamed and not, and each call's usage is what the region reported on the body or the terminal event."""
    clients = [(v1_client(gateway), "/openai/v1/responses"), (azure_client(gateway), "/openai/responses")]
    for number, (client, path) in enumerate(clients):
        response = client.responses.create(model="gpt-4o", input=PROMPT)
        assert response.output_text == story() and response.status == "completed"
        events = list(client.responses.create(model="gpt-4o", input=PROMPT, instructions="Be brief.", stream=True))
        assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
        assert events[-1].type == "response.completed"
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == story()
        sent = [r for r in gateway.eastus.received if r.path == path]
        assert len(sent) == 2 and all("stream_options" not in r.body for r in sent)
        assert path == "/openai/v1/responses" or sent[0].query == {"api-version": PREVIEW}
        records = gateway.sink.wait(2 * number + 2)[2 * number:]
        final = events[-1].response
        for record, usage in zip(records, (response.usage, final.usage), strict=True):
            assert usage is not None
            assert (record.operation, record.deployment, record.usage_source) == ("responses", "gpt-4o", "reported")
            assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (
                usage.input_tokens, usage.output_tokens, usage.total_tokens)
        assert [r.streaming for r in records] == [False, True]


async def test_async_clients_create_streamed_and_not(gateway: Gateway) -> None:
    """AsyncOpenAI and AsyncAzureOpenAI create responses too, streamed and not."""
    clients = [openai.AsyncOpenAI(base_url=gateway.url + "/openai/v1/", api_key=gateway.key),
               openai.AsyncAzureOpenAI(azure_endpoint=gateway.url, api_key=gateway.key, api_version=PREVIEW)]
    for client in clients:
        response = await client.responses.create(model="gpt-4o", input=PROMPT)
        assert response.output_text == story()
        stream = await client.responses.create(model="gpt-4o", input=PROMPT, stream=True)
        kinds = [event.type async for event in stream]
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        await client.close()
    records = gateway.sink.wait(4)
    assert all(r.usage_source == "reported" and r.completion_tokens == 20 for r in records)


def test_stream_is_relayed_byte_for_byte(gateway: Gateway) -> None:
    """The client gets exactly the frames the region sent, event lines and all, without [DONE]."""
    response = http("POST", gateway.url + "/openai/v1/responses",
                    headers={"api-key": gateway.key, "content-type": "application/json"},
                    body=json.dumps({"model": "gpt-4o", "input": PROMPT, "stream": True}).encode())
    assert response.status == 200 and response.headers["content-type"].startswith("text/event-stream")
    assert response.body == gateway.eastus.responses.last_stream
    assert response.text.startswith("event: response.created\ndata: ") and "[DONE]" not in response.text


def test_cut_stream_raises_in_the_sdk_and_is_estimated(gateway: Gateway) -> None:
    """A stream the region breaks off ends with an in-stream error event (the SDK raises) and an estimate."""
    gateway.eastus.fail_next("cut")
    body: dict[str, Any] = {"model": "gpt-4o", "instructions": "Answer in one paragraph.",
                            "input": [{"role": "user", "content": PROMPT}]}
    seen: list[Any] = []
    with pytest.raises(openai.APIError, match="broke off"):
        for event in v1_client(gateway).responses.create(**body, stream=True):
            seen.append(event)
    deltas = "".join(e.delta for e in seen if e.type == "response.output_text.delta")
    assert 0 < len(deltas) < len(story())
    [record] = gateway.sink.wait(1)
    assert (record.outcome, record.usage_source, record.operation) == ("upstream_cut", "estimated", "responses")
    assert record.prompt_tokens == _tokens.responses_tokens(body, "gpt-4o")
    assert record.completion_tokens == _tokens.count(deltas, "gpt-4o") > 0


def test_stored_response_routes_on_both_path_styles(gateway: Gateway) -> None:
    """Retrieve, input_items and delete reach the region that made the response; each call is an event of 0
    tokens under the response's deployment."""
    for client in (v1_client(gateway), azure_client(gateway)):
        created = client.responses.create(model="gpt-4o", input=PROMPT)
        again = client.responses.retrieve(created.id)
        assert again.id == created.id and again.output_text == story()
        items = client.responses.input_items.list(created.id)
        assert [item.model_dump()["content"][0]["text"] for item in items.data] == [PROMPT]
        client.responses.delete(created.id)
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(created.id)
    records = gateway.sink.wait(10)
    by_id = [r for r in records if r.operation != "responses"]
    assert [r.operation for r in by_id[:4]] == [
        "responses.retrieve", "responses.input_items", "responses.delete", "responses.retrieve"]
    assert all(r.deployment == "gpt-4o" and r.total_tokens == 0 and r.backend == "eastus" for r in by_id)
    assert [r.status for r in by_id] == [200, 200, 200, 404] * 2
    assert [r.path for r in gateway.eastus.received[-4:]] == [
        f"/openai/responses/{created.id}", f"/openai/responses/{created.id}/input_items",
        f"/openai/responses/{created.id}", f"/openai/responses/{created.id}"]
    assert gateway.westus.received == []


def test_response_home_is_recorded_before_the_client_sees_its_id(gateway: Gateway) -> None:
    """By the time the first event (with the id) reaches the client, the shared map already has it."""
    stream = v1_client(gateway).responses.create(model="gpt-4o", input=PROMPT, stream=True)
    first = next(iter(stream))
    assert first.type == "response.created"
    row = affinity_row(gateway, first.response.id)
    stream.close()
    assert row is not None and (row["Backend"], row["Deployment"]) == ("eastus", "gpt-4o")
    assert row["KeyName"].startswith("team-")
    assert (row["ExpiresAt"] - row["CreatedAt"]).days == 30
    unstored = v1_client(gateway).responses.create(model="gpt-4o", input=PROMPT, store=False)
    assert affinity_row(gateway, unstored.id) is None  # nothing can name it later: no table write on its path


def test_continuations_follow_their_response_and_wait_while_its_backend_cools(gateway: Gateway) -> None:
    """A response made in eastus is continued in eastus, never elsewhere: while eastus cools, a continuation gets
    429 with eastus's Retry-After and westus is not asked; a new conversation meanwhile fails over to westus, and its
    continuation follows it there."""
    client = v1_client(gateway)
    chat = openai.OpenAI(base_url=gateway.url + "/openai/v1", api_key=gateway.key, max_retries=0)
    first = client.responses.create(model="gpt-4o", input=PROMPT)
    second = client.responses.create(model="gpt-4o", input="And then?", previous_response_id=first.id)
    assert gateway.eastus.received[-1].body["previous_response_id"] == first.id
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.total_tokens  # the region counted the earlier turn too

    gateway.eastus.retry_after_ms, gateway.eastus.retry_after = "30000", "30"
    gateway.eastus.fail_next("429")
    chat.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])  # eastus now cools
    westus_before = len(gateway.westus.received)
    attempts: list[Callable[[], object]] = [
        lambda: client.responses.create(model="gpt-4o", input="More?", previous_response_id=second.id),
        lambda: client.responses.retrieve(second.id)]
    for attempt in attempts:
        with pytest.raises(openai.RateLimitError) as caught:
            attempt()
        assert caught.value.response.headers["retry-after"] == "30"
        assert "eastus" in caught.value.response.json()["error"]["message"]
    assert len(gateway.westus.received) == westus_before  # no region without the state was bothered

    elsewhere = client.responses.with_raw_response.create(model="gpt-4o", input=PROMPT)
    assert elsewhere.headers["x-gateway-backend"] == "westus"  # a new conversation fails over as chat does
    followed = client.responses.with_raw_response.create(model="gpt-4o", input="Go on.",
                                                         previous_response_id=elsewhere.parse().id)
    assert followed.headers["x-gateway-backend"] == "westus"

    gateway.clock.advance(30.5)
    resumed = client.responses.with_raw_response.create(model="gpt-4o", input="More?", previous_response_id=second.id)
    assert resumed.headers["x-gateway-backend"] == "eastus"
    refused = [r for r in gateway.sink.records if r.status == 429]
    assert len(refused) == 2 and all(r.outcome == "refused" and r.total_tokens == 0 for r in refused)


def test_pinned_call_throttled_without_retry_headers_waits_the_default_cool_down(gateway: Gateway) -> None:
    """AOAI's Responses 429s may carry no retry-after and x-ratelimit-* of -1 or 0: the pinned call gets 429 with
    DEFAULT_COOLDOWN_SECONDS, and is not sent to the other region."""
    client = v1_client(gateway)
    made = client.responses.create(model="gpt-4o", input=PROMPT)
    gateway.eastus.retry_after = gateway.eastus.retry_after_ms = None
    gateway.eastus.ratelimit_reset = "-1"
    gateway.eastus.fail_next("429")
    with pytest.raises(openai.RateLimitError) as caught:
        client.responses.create(model="gpt-4o", input="Again", previous_response_id=made.id)
    headers = caught.value.response.headers
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("10", "10000")
    assert gateway.westus.received == []
    gateway.eastus.ratelimit_reset = "0"
    gateway.clock.advance(10.5)
    gateway.eastus.fail_next("429")
    with pytest.raises(openai.RateLimitError) as again:
        client.responses.retrieve(made.id)
    assert again.value.response.headers["retry-after"] == "10"


def test_the_map_is_shared_through_the_table(gateway: Gateway) -> None:
    """What another instance recorded in the table sends this one straight to the response's region."""
    import time

    from gateway._affinity import AffinityMap

    stored = gateway.westus.responses.create({"model": "gpt-4o", "input": PROMPT})
    gateway.westus.responses.finish(stored)
    response_id = stored.document["id"]

    async def recorded_elsewhere() -> None:
        async with open_table_service(gateway.settings.storage) as service:
            other = AffinityMap(service, timeout=2.0, wall_clock=time.time)
            assert await other.record(response_id, backend="westus", deployment="gpt-4o", key_name="team-other")

    gateway.loop.run(recorded_elsewhere())
    client = v1_client(gateway)
    assert client.responses.retrieve(response_id).output_text == story()
    assert client.responses.create(model="gpt-4o", input="More", previous_response_id=response_id).output_text
    assert gateway.eastus.received == [] and len(gateway.westus.received) == 2


def test_a_response_the_map_does_not_know_is_found_in_its_region(gateway: Gateway) -> None:
    """A response made without the gateway (or whose record was lost) is looked for in each region once, then
    remembered: calls on it go where it is."""
    stored = gateway.westus.responses.create({"model": "gpt-4o", "input": PROMPT})
    gateway.westus.responses.finish(stored)
    response_id = stored.document["id"]
    client = v1_client(gateway)
    assert client.responses.retrieve(response_id).output_text == story()
    assert [r.method for r in gateway.eastus.received] == ["GET"]  # asked, did not have it
    probes = len(gateway.westus.received)
    assert client.responses.create(model="gpt-4o", input="More", previous_response_id=response_id).output_text
    assert len(gateway.westus.received) == probes + 1 and len(gateway.eastus.received) == 1  # remembered
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve("resp_nowhere")
    assert caught.value.response.json()["error"]["code"] == "ResponseNotFound"


def test_background_usage_is_counted_once_however_often_it_is_polled(gateway: Gateway) -> None:
    """A background response answers queued without usage; the poll that first sees it finished emits its usage
    as an event whose id is derived from the response id, so polls after it, and the same event sent again by
    another instance, leave the usage table as it was."""
    import uuid

    from gateway._records import encode_event
    from gateway._responses_api import background_event_id
    from tests.test_pipeline import wait_for_row
    from usage import Aggregator

    name = f"team-{uuid.uuid4().hex[:8]}"
    client = openai.OpenAI(base_url=gateway.url + "/openai/v1", api_key=gateway.create_key(name), max_retries=0)
    gateway.eastus.responses.background_polls = 2
    queued = client.responses.create(model="gpt-4o", input=PROMPT, background=True)
    assert (queued.status, queued.usage) == ("queued", None)
    statuses = [client.responses.retrieve(queued.id).status for _ in range(4)]
    assert statuses == ["in_progress", "completed", "completed", "completed"]
    reported = gateway.eastus.responses.reported[queued.id]
    records = gateway.sink.wait(6)
    [counted] = [r for r in records if r.outcome == "background"]
    assert counted.request_id == background_event_id(queued.id)
    assert (counted.key_name, counted.deployment, counted.backend, counted.operation) == (
        name, "gpt-4o", "eastus", "responses")
    assert (counted.prompt_tokens, counted.completion_tokens, counted.total_tokens) == (
        reported["input_tokens"], reported["output_tokens"], reported["total_tokens"])
    own = [r for r in records if r.outcome != "background"]
    assert len(own) == 5 and all(r.total_tokens == 0 for r in own)  # the create and the four polls
    row = wait_for_row(gateway, name, 6)
    assert row["TotalTokens"] == reported["total_tokens"]

    async def again() -> None:  # another instance sees it finished too, and emits the same event
        async with open_table_service(gateway.settings.storage) as service:
            result = await Aggregator(service).aggregate([encode_event(counted)])
            assert (result.counted, result.duplicates) == (0, 1)

    gateway.loop.run(again())
    assert wait_for_row(gateway, name, 6) == row


def test_background_stream_resumed_counts_its_usage_once(gateway: Gateway) -> None:
    """A background stream the client leaves early goes on in the region; resuming it with starting_after
    replays the rest, and its usage is counted once, by the call that saw it finish."""
    gateway.eastus.chunk_delay = 0.05  # the client leaves long before the region ends the stream
    client = azure_client(gateway)
    stream = client.responses.create(model="gpt-4o", input=PROMPT, background=True, stream=True)
    events = iter(stream)
    head = [next(events) for _ in range(5)]
    stream.close()
    response_id = head[0].response.id  # type: ignore[union-attr]
    assert head[0].response.status == "queued"  # type: ignore[union-attr]
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=head[-1].sequence_number))
    assert rest[0].sequence_number == head[-1].sequence_number + 1 and rest[-1].type == "response.completed"
    assert client.responses.retrieve(response_id).status == "completed"
    records = gateway.sink.wait(4)
    first, resumed, polled = (r for r in records if r.outcome != "background")
    assert (first.outcome, first.usage_source, first.total_tokens) == ("client_disconnected", "none", 0)
    assert (resumed.operation, resumed.streaming) == ("responses.retrieve", True)
    assert (polled.operation, polled.streaming) == ("responses.retrieve", False)
    [counted] = [r for r in records if r.outcome == "background"]
    assert counted.total_tokens == gateway.eastus.responses.reported[response_id]["total_tokens"]


def test_cancelling_a_background_response_counts_what_it_used(gateway: Gateway) -> None:
    """cancel goes to the response's region and, the response now finished, its usage is counted once."""
    gateway.eastus.responses.background_polls = 5
    client = v1_client(gateway)
    queued = client.responses.create(model="gpt-4o", input=PROMPT, background=True)
    cancelled = client.responses.cancel(queued.id)
    assert cancelled.status == "cancelled" and cancelled.usage is not None
    assert client.responses.retrieve(queued.id).status == "cancelled"
    records = gateway.sink.wait(4)
    [counted] = [r for r in records if r.outcome == "background"]
    assert counted.total_tokens == cancelled.usage.total_tokens and counted.completion_tokens == 0
    assert [r.operation for r in records if r.outcome != "background"] == [
        "responses", "responses.cancel", "responses.retrieve"]
