"""The app as Azure's Python 3.13 runtime sees it: indexing, loading, HTTP and Service Bus invocations through
the real ``azure-functions-runtime`` in a worker process of its own, driven by the local host."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

from azure.servicebus import ServiceBusClient, ServiceBusMessage

from devkit.amqp_broker import AmqpBroker
from devkit.services import free_port
from gateway._settings import ServiceBusConfig
from tests.harness import PROJECT, Gateway, LoopThread, eventually, running_gateway, running_host
from tests.test_pipeline import wait_for_row
from usage import open_table_service
from usage._schema import REJECTS_TABLE

QUEUE = "usage-events"


def test_indexing_reports_the_bindings_azure_will_see(gateway: Gateway) -> None:
    """The runtime indexes every function with its routes, methods and the Service Bus batch trigger."""
    triggers = {f.name: f.trigger for f in gateway.host.functions}
    routes = {name: (t["route"], t.get("methods")) for name, t in triggers.items() if t["type"] == "httpTrigger"}
    assert set(triggers) == {*routes, "aggregate_usage", "clean_usage_ledger"} and len(triggers) == 30
    methods = {name: [m.upper() for m in found] if found else found for name, (_, found) in routes.items()}
    assert {name: (route, methods[name]) for name, (route, _) in routes.items()} == {
        "chat_completions": ("openai/deployments/{deployment}/chat/completions", ["POST"]),
        "completions": ("openai/deployments/{deployment}/completions", ["POST"]),
        "embeddings": ("openai/deployments/{deployment}/embeddings", ["POST"]),
        "v1_chat_completions": ("openai/v1/chat/completions", ["POST"]),
        "v1_embeddings": ("openai/v1/embeddings", ["POST"]),
        "v1_models": ("openai/v1/models", ["GET"]),
        "v1_responses": ("openai/v1/responses", ["POST"]),
        "responses": ("openai/responses", ["POST"]),
        "v1_response": ("openai/v1/responses/{response_id}", ["GET", "DELETE"]),
        "response": ("openai/responses/{response_id}", ["GET", "DELETE"]),
        "v1_response_cancel": ("openai/v1/responses/{response_id}/cancel", ["POST"]),
        "response_cancel": ("openai/responses/{response_id}/cancel", ["POST"]),
        "v1_response_input_items": ("openai/v1/responses/{response_id}/input_items", ["GET"]),
        "response_input_items": ("openai/responses/{response_id}/input_items", ["GET"]),
        "images_generations": ("openai/deployments/{deployment}/images/generations", ["POST"]),
        "v1_images_generations": ("openai/v1/images/generations", ["POST"]),
        "audio_transcriptions": ("openai/deployments/{deployment}/audio/transcriptions", ["POST"]),
        "v1_audio_transcriptions": ("openai/v1/audio/transcriptions", ["POST"]),
        "audio_translations": ("openai/deployments/{deployment}/audio/translations", ["POST"]),
        "v1_audio_translations": ("openai/v1/audio/translations", ["POST"]),
        "audio_speech": ("openai/deployments/{deployment}/audio/speech", ["POST"]),
        "v1_audio_speech": ("openai/v1/audio/speech", ["POST"]),
        "health": ("health", ["GET"]),
        "health_ready": ("health/ready", ["GET"]),
        "usage_page": ("usage", ["GET"]),
        "usage_data": ("usage/data", ["GET"]),
        "usage_statement": ("usage/statement.csv", ["GET"]),
        "not_found": ("{*path}", routes["not_found"][1]),
    }
    assert routes["not_found"][1] in (None, [])  # every method
    assert all(t["authLevel"].upper() == "ANONYMOUS" for t in triggers.values() if t["type"] == "httpTrigger")
    timer = triggers["clean_usage_ledger"]
    assert (timer["type"], timer["schedule"], timer.get("runOnStartup", False)) == (
        "timerTrigger", "0 17 * * * *", False)
    queue = triggers["aggregate_usage"]
    assert (queue["type"], queue["queueName"], queue["connection"], queue["cardinality"].lower()) == (
        "serviceBusTrigger", "%USAGE_QUEUE_NAME%", "ServiceBusConnection", "many")


def _event(key_name: str, tokens: int) -> dict[str, Any]:
    return {"schema": 1, "event_id": uuid.uuid4().hex, "request_id": "r", "time": time.strftime(
        "%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()), "key_name": key_name, "deployment": "gpt-4o",
        "model": "gpt-4o-2024-08-06", "backend": "eastus", "operation": "chat/completions", "streaming": True,
        "prompt_tokens": tokens, "completion_tokens": 5, "total_tokens": tokens + 5, "cached_tokens": 0,
        "reasoning_tokens": 0, "usage_source": "reported", "status": 200, "latency_ms": 1.0, "ttfb_ms": 1.0,
        "outcome": "complete"}


def test_queue_trigger_counts_the_valid_and_rejects_the_malformed_of_one_batch(storage: str,
                                                                                broker: AmqpBroker) -> None:
    """A batch mixing good and malformed messages: the good are counted once, the bad kept as rejects."""
    config = ServiceBusConfig(queue=QUEUE, connection_string=broker.connection_string)
    name = f"team-{uuid.uuid4().hex[:8]}"
    good = [_event(name, tokens) for tokens in (10, 20, 30)]
    bad = {f"bad-{uuid.uuid4().hex[:8]}": body for body in (b"not json", b'{"schema": 1}', b"[" * 50 + b"]" * 50)}
    with (running_gateway(storage, service_bus=config, env={"AzureWebJobs.aggregate_usage.Disabled": "false"}) as gw,
          ServiceBusClient.from_connection_string(broker.connection_string) as client,
          client.get_queue_sender(QUEUE) as sender):
        batch = sender.create_message_batch()
        for event in good:
            batch.add_message(ServiceBusMessage(json.dumps(event), message_id=event["event_id"]))
        for message_id, body in bad.items():
            batch.add_message(ServiceBusMessage(body, message_id=message_id))
        sender.send_messages(batch)
        row = wait_for_row(gw, name, 3)
        assert (row["Requests"], row["TotalTokens"]) == (3, sum(e["total_tokens"] for e in good))
        eventually(lambda: broker.messages(QUEUE) == [])  # the batch was completed, not abandoned
        assert broker.dead_letters(QUEUE) == []

        async def rejected() -> set[str]:
            async with open_table_service(gw.settings.storage) as service:
                table = service.get_table_client(REJECTS_TABLE)
                return {str(e.get("MessageId") or e["RowKey"]) async for e in table.list_entities()}

        assert set(bad) <= gw.loop.run(rejected())


FLAKY_APP = '''
import json
import os
import typing

import azure.functions as func

app = func.FunctionApp()


@app.service_bus_queue_trigger(arg_name="batch", queue_name="%QUEUE%", connection="Bus", cardinality="many")
async def consume(batch: typing.List[func.ServiceBusMessage]) -> None:
    with open(os.environ["SEEN_FILE"], "a") as seen:
        for message in batch:
            seen.write(json.dumps([message.get_body().decode(), message.message_id, message.delivery_count]) + "\\n")
    if any(m.get_body() == b"fail" for m in batch):
        raise RuntimeError("this batch fails")
'''


def test_queue_trigger_completes_on_success_and_abandons_on_failure(tmp_path: Path, broker: AmqpBroker) -> None:
    """A batch whose invocation succeeds is completed; one that fails is abandoned and delivered again."""
    (tmp_path / "function_app.py").write_text(FLAKY_APP)
    (tmp_path / "host.json").write_text('{"version": "2.0", "extensions": {"serviceBus": {"maxMessageBatchSize": 5}}}')
    seen = tmp_path / "seen.jsonl"
    settings = {"QUEUE": "work", "Bus": broker.connection_string, "SEEN_FILE": str(seen)}

    def lines() -> list[list[Any]]:
        return [json.loads(line) for line in seen.read_text().splitlines()] if seen.is_file() else []

    loop = LoopThread()
    try:
        with (running_host(loop, tmp_path, settings),
              ServiceBusClient.from_connection_string(broker.connection_string) as client,
              client.get_queue_sender("work") as sender):
            sender.send_messages([ServiceBusMessage("ok", message_id="m-ok")])
            eventually(lambda: broker.messages("work") == [] and ["ok", "m-ok", 1] in lines(), message=lines)
            sender.send_messages([ServiceBusMessage("fail", message_id="m-fail")])
            # abandoned, so delivered again and again (the queue's max delivery count would dead-letter it)
            eventually(lambda: ["fail", "m-fail", 3] in lines(), message=lines)
            assert [line for line in lines() if line[0] == "ok"] == [["ok", "m-ok", 1]]  # completed: never again
    finally:
        loop.close()


BROKEN_APP = '''
import azure.functions as func

app = func.FunctionApp()


@app.service_bus_queue_trigger(arg_name="messages", queue_name="q", connection="Bus", cardinality="many")
async def consume(messages: list[func.ServiceBusMessage]) -> None:
    return None
'''


def test_an_app_that_cannot_load_stops_serve_with_the_runtimes_message(tmp_path: Path) -> None:
    """serve exits non-zero at once with the runtime's FunctionLoadError, before listening."""
    (tmp_path / "function_app.py").write_text(BROKEN_APP)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "devkit", "serve", "--port", str(free_port())], cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT)}, capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert "FunctionLoadError" in done.stderr and "invalid non-type annotation" in done.stderr
    assert "Traceback" not in done.stderr and time.monotonic() - started < 60


def test_malformed_http_gets_an_aoai_shaped_400(gateway: Gateway) -> None:
    """A request line that is not HTTP gets a JSON error body, like the gateway's own errors."""
    port = int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        answer = b""
        while chunk := sock.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"application/json" in head
    error = json.loads(body)["error"]
    assert error["code"] == "BadRequest" and "Malformed" in error["message"]


def test_runtime_and_protocol_versions_are_the_pinned_ones() -> None:
    """The tests run on the pinned azure-functions-runtime with the protocol classes setup.sh installed."""
    from importlib.metadata import version

    pinned = dict(line.split("==") for line in textwrap.dedent(
        (PROJECT / "devkit/requirements.txt").read_text()).splitlines() if "==" in line and not line.startswith("#"))
    assert version("azure-functions-runtime") == pinned["azure-functions-runtime"]
    assert sys.version_info[:2] == (3, 13)


def test_websocket_upgrade_gets_an_aoai_shaped_answer(gateway: Gateway) -> None:
    """An Upgrade: websocket request is answered as plain HTTP: the JSON 404, not a text 500."""
    port = int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /socket HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
                     b"sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n")
        answer = b""
        while b"}}" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 404") and json.loads(answer.partition(b"\r\n\r\n")[2])["error"]


def test_the_hosts_listener_is_tcp_so_connections_get_no_nagle_delay() -> None:
    """serve's pre-bound socket says IPPROTO_TCP: asyncio turns Nagle off only then (else 40 ms per request)."""
    from devkit._serve import _listen

    with _listen("127.0.0.1", 0) as listener:
        assert listener.proto == socket.IPPROTO_TCP
