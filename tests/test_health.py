"""/health and /health/ready under the real runtime: no key, no usage, and 503 soon after storage goes away."""

from __future__ import annotations

import time

import pytest

from devkit.amqp_broker import AmqpBroker
from gateway._settings import ServiceBusConfig
from tests.harness import Gateway, RawResponse, eventually, http, running_gateway
from tests.storage_proxy import storage_proxy


def _leaks(gw: Gateway, response: RawResponse) -> list[str]:
    """Backend names, endpoints or keys found in an answer."""
    secrets = [gw.key, *(b.name for b in gw.settings.backends), *(b.endpoint for b in gw.settings.backends),
               *(b.api_key or "" for b in gw.settings.backends), gw.settings.key_hash_secret.decode(), "127.0.0.1"]
    return [s for s in secrets if s and s in response.text]


def test_liveness_needs_no_key_and_counts_no_usage(gateway: Gateway) -> None:
    """GET /health answers 200 {"status": "ok"} without a key; nothing is recorded as usage."""
    response = http("GET", f"{gateway.url}/health")
    assert (response.status, response.json()) == (200, {"status": "ok"})
    ready = http("GET", f"{gateway.url}/health/ready")
    assert ready.status == 200, ready.text
    assert ready.json()["status"] == "ok"
    assert {name: c["status"] for name, c in ready.json()["components"].items()} == {
        "settings": "ok", "storage": "ok", "usage_publisher": "ok"}
    assert ready.json()["components"]["usage_publisher"]["transport"] == "in_process"
    assert _leaks(gateway, ready) == []
    assert http("POST", f"{gateway.url}/health").status == 404  # GET only; other methods are unknown routes
    time.sleep(0.7)  # past the publisher's linger: a usage event would have been recorded by now
    assert gateway.sink.records == []
    assert gateway.eastus.received == [] and gateway.westus.received == []


@pytest.mark.parametrize("fault", ["hang", "refuse"])
def test_readiness_is_503_within_10_s_of_storage_going_away(storage: str, fault: str) -> None:
    """Storage hung or refusing: /health/ready says 503 with storage down well within 10 s; /health stays 200;
    storage back: 200 again."""
    with storage_proxy(storage) as proxy, running_gateway(proxy.connection_string) as gw:
        try:
            assert http("GET", f"{gw.url}/health/ready").status == 200
            getattr(proxy, fault)()
            went = time.monotonic()
            response = http("GET", f"{gw.url}/health/ready", timeout=15)
            assert time.monotonic() - went < 10
            assert response.status == 503, response.text
            components = response.json()["components"]
            assert response.json()["status"] == "down" and components["storage"]["status"] == "down"
            assert components["settings"]["status"] == "ok"
            assert _leaks(gw, response) == []
            started = time.monotonic()
            assert http("GET", f"{gw.url}/health").status == 200
            assert time.monotonic() - started < 1
            proxy.restore()
            assert http("GET", f"{gw.url}/health/ready").status == 200
        finally:
            proxy.restore()


def test_readiness_names_a_bad_setting_without_its_value(storage: str) -> None:
    """A malformed setting: 503 with settings down, naming the setting but not its value."""
    with running_gateway(storage, env={"MAX_ATTEMPTS": "several-secret-value"}) as gw:
        response = http("GET", f"{gw.url}/health/ready")
        assert response.status == 503
        settings = response.json()["components"]["settings"]
        assert settings["status"] == "down" and "MAX_ATTEMPTS" in settings["reason"]
        assert "several-secret-value" not in response.text
        assert http("GET", f"{gw.url}/health").status == 200


def test_readiness_checks_that_service_bus_can_take_events(storage: str, broker: AmqpBroker) -> None:
    """With Service Bus, the publisher is ready while the broker is; down (503) when it is unreachable."""
    config = ServiceBusConfig(queue="usage-events", connection_string=broker.connection_string)
    with running_gateway(storage, service_bus=config) as gw:
        # a loaded machine may take the first AMQP connection past the 2 s bound: ask again then
        eventually(lambda: http("GET", f"{gw.url}/health/ready").status == 200, timeout=20)
        response = http("GET", f"{gw.url}/health/ready")
        assert response.status == 200, response.text
        assert response.json()["components"]["usage_publisher"]["transport"] == "service_bus"
        broker.stop()
        started = time.monotonic()
        response = http("GET", f"{gw.url}/health/ready", timeout=15)
        assert time.monotonic() - started < 10
        assert response.status == 503, response.text
        assert response.json()["components"]["usage_publisher"]["status"] == "down"
        assert response.json()["components"]["storage"]["status"] == "ok"
