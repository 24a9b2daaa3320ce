"""Usage events over real Service Bus clients (azure-servicebus over AMQP to the test broker)."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import openai

from devkit.amqp_broker import AmqpBroker
from gateway._settings import ServiceBusConfig
from tests.harness import Gateway, eventually, running_gateway
from tests.test_pipeline import wait_for_row

QUEUE = "usage-events"
MESSAGES: Any = [{"role": "user", "content": "hi"}]


def test_service_bus_outage_fails_no_request_and_loses_no_event(storage: str, broker: AmqpBroker) -> None:
    """While Service Bus is down requests succeed; once it is back every event is on the queue, once."""
    config = ServiceBusConfig(queue=QUEUE, connection_string=broker.connection_string)
    with running_gateway(storage, service_bus=config) as gw:
        client = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=gw.key, api_version="2024-10-21", max_retries=0)
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        eventually(lambda: len(broker.messages(QUEUE)) == 1)
        broker.set_available(False)
        started = time.monotonic()
        for stream in (False, True, False, True):
            if stream:
                assert list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
            else:
                assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices
        assert time.monotonic() - started < 5  # the outage did not slow requests down
        records = gw.sink.wait(5)
        assert len(broker.messages(QUEUE)) == 1
        broker.set_available(True)
        eventually(lambda: len(broker.messages(QUEUE)) >= 5)
        queued = broker.messages(QUEUE)
        assert sorted(str(m.message_id) for m in queued) == sorted(r.request_id for r in records)
        bodies = [json.loads(m.body if isinstance(m.body, (bytes, str)) else b"".join(m.body)) for m in queued]
        assert {b["event_id"]: b["total_tokens"] for b in bodies} == {r.request_id: r.total_tokens for r in records}


def test_events_flow_through_the_queue_trigger_into_the_tables(storage: str, broker: AmqpBroker) -> None:
    """Gateway -> Service Bus -> aggregate_usage (run by the local host) -> usage table, exactly."""
    config = ServiceBusConfig(queue=QUEUE, connection_string=broker.connection_string)
    env = {"AzureWebJobs.aggregate_usage.Disabled": "false"}
    with running_gateway(storage, service_bus=config, env=env) as gw:
        name = f"team-{uuid.uuid4().hex[:8]}"
        client = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=gw.create_key(name), api_version="2024-10-21")
        for _ in range(3):
            list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
        records = gw.sink.wait(3)
        row = wait_for_row(gw, name, 3)
        assert row["TotalTokens"] == sum(r.total_tokens for r in records) and row["Requests"] == 3
        eventually(lambda: broker.messages(QUEUE) == [])  # completed, not left locked or redelivered


def test_gateway_sink_is_off_the_request_path(gateway: Gateway) -> None:
    """Without Service Bus the local run still aggregates (in process): usage reaches the table."""
    name = f"team-{uuid.uuid4().hex[:8]}"
    client = openai.AzureOpenAI(azure_endpoint=gateway.url, api_key=gateway.create_key(name),
                                api_version="2024-10-21")
    client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert wait_for_row(gateway, name, 1)["Requests"] == 1


def test_disabled_trigger_is_not_run_locally(storage: str, broker: AmqpBroker) -> None:
    """AzureWebJobs.aggregate_usage.Disabled keeps the local host from consuming the queue, as in Azure."""
    config = ServiceBusConfig(queue=QUEUE, connection_string=broker.connection_string)
    env = {"AzureWebJobs.aggregate_usage.Disabled": "true"}
    with running_gateway(storage, service_bus=config, env=env) as gw:
        client = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=gw.key, api_version="2024-10-21")
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        eventually(lambda: len(broker.messages(QUEUE)) == 1)
        time.sleep(1.5)  # a running trigger would have taken it by now (it receives every few ms)
        assert len(broker.messages(QUEUE)) == 1
        assert any("disabled by AzureWebJobs.aggregate_usage.Disabled" in line for line in gw.logs.lines)
