"""Stopping loses no usage: SIGTERM to the worker flushes its buffer; SIGTERM to serve finishes requests first."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import openai

from devkit.amqp_broker import AmqpBroker
from devkit.services import free_port, wait_for_port
from devkit.simulator import SimulatedRegion
from gateway._settings import ServiceBusConfig
from tests.harness import PROJECT, LoopThread, eventually, running_gateway
from usage import KeyStore, StorageConfig, open_table_service

QUEUE = "usage-events"
MESSAGES: Any = [{"role": "user", "content": "hi"}]


def queued_ids(broker: AmqpBroker) -> set[str]:
    return {str(m.message_id) for m in broker.messages(QUEUE)}


def test_sigterm_to_the_worker_sends_what_it_buffered(storage: str, broker: AmqpBroker) -> None:
    """Events held back by a Service Bus outage still reach the queue when the worker is told to stop."""
    config = ServiceBusConfig(queue=QUEUE, connection_string=broker.connection_string)
    with running_gateway(storage, service_bus=config) as gw:
        client = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=gw.key, api_version="2024-10-21", max_retries=0)
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)  # the publisher is up and connected
        eventually(lambda: len(broker.messages(QUEUE)) == 1)
        broker.set_available(False)
        for stream in (False, True, False, True, False):
            if stream:
                assert list(client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
            else:
                assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices
        records = gw.sink.wait(6)
        assert gw.host.worker_pid is not None
        os.kill(gw.host.worker_pid, signal.SIGTERM)
        time.sleep(1.0)
        broker.set_available(True)  # back within the worker's flush window
        eventually(lambda: queued_ids(broker) == {r.request_id for r in records}, timeout=15,
                   message=lambda: f"lost on SIGTERM: {len(records) - len(queued_ids(broker))} of {len(records)}")


def test_sigterm_to_serve_finishes_streams_and_loses_no_event(storage: str, broker: AmqpBroker) -> None:
    """python -m gateway serve, stopped mid-stream: the streams finish whole and every event is queued."""
    loop = LoopThread()
    region = SimulatedRegion(name="eastus", api_key="backend-secret", chunk_delay=0.05)
    loop.run(region.start())

    async def create_key() -> str:
        async with open_table_service(StorageConfig(connection_string=storage)) as service:
            return await KeyStore(service, secret=b"shutdown-test").create(f"stop-{time.monotonic_ns()}")

    key = loop.run(create_key())
    port = free_port()
    env = {**os.environ, "UsageStorage": storage, "KEY_HASH_SECRET": "shutdown-test",
           "AOAI_BACKENDS": json.dumps([{"name": "east", "endpoint": region.url, "api_key": "backend-secret"}]),
           "ServiceBusConnection": broker.connection_string, "USAGE_QUEUE_NAME": QUEUE,
           "AzureWebJobs.aggregate_usage.Disabled": "true"}
    server = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port)], cwd=PROJECT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, timeout=60)
        client = openai.AzureOpenAI(azure_endpoint=f"http://127.0.0.1:{port}", api_key=key,
                                    api_version="2024-10-21", max_retries=0)
        for _ in range(3):
            assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices

        def stream() -> str:
            chunks = client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            streams = [pool.submit(stream) for _ in range(3)]
            time.sleep(0.4)  # the streams are under way (each takes about a second)
            server.send_signal(signal.SIGTERM)
            texts = [s.result(timeout=30) for s in streams]
        assert texts == ["".join(region._text())] * 3
        output, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
        loop.run(region.stop())
        loop.close()
    assert server.returncode == 0, output
    eventually(lambda: len(broker.messages(QUEUE)) == 6, timeout=5,
               message=lambda: f"lost on SIGTERM: {6 - len(broker.messages(QUEUE))} of 6\n{output}")
