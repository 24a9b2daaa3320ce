"""OpenTelemetry under the real runtime, exported over OTLP/HTTP to a local receiver: token histograms that add up
to the usage events, a span per request with its backend attempts as children, traceparent upstream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any

import openai
import pytest

from gateway._telemetry import METRICS
from tests.harness import PROJECT, eventually, http, running_gateway
from tests.otlp_receiver import OtlpReceiver, otlp_receiver

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
CONNECTION = "InstrumentationKey=00000000-0000-0000-0000-000000000000;IngestionEndpoint=http://127.0.0.1:9/"


def token_sums(receiver: OtlpReceiver) -> dict[tuple[str, str, str], float]:
    sums: dict[tuple[str, str, str], float] = defaultdict(float)
    for attributes, point in receiver.latest("gen_ai.client.token.usage"):
        sums[(attributes["aoai_gateway.key_name"], attributes["gen_ai.request.model"],
              attributes["gen_ai.token.type"])] += point.sum
    return dict(sums)


def test_otlp_token_sums_equal_the_usage_events_and_spans_nest(storage: str) -> None:
    """Per key and deployment, gen_ai.client.token.usage sums to the events' prompt and completion tokens; every
    request has one span whose attempts are its children, and each attempt's traceparent reached the backend."""
    with otlp_receiver() as receiver, running_gateway(storage, env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_METRIC_EXPORT_INTERVAL": "300",
            "OTEL_BSP_SCHEDULE_DELAY": "100", "OTEL_TRACES_SAMPLER": "always_on"}) as gw:
        other = gw.create_key(f"team-{uuid.uuid4().hex[:8]}")
        for key in (gw.key, other):
            client = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=key, api_version="2024-10-21")
            for deployment in ("gpt-4o", "gpt-4o-mini"):
                list(client.chat.completions.create(model=deployment, messages=MESSAGES, stream=True))
                client.chat.completions.create(model=deployment, messages=MESSAGES)
            client.embeddings.create(model="text-embedding-3-small", input="hello")
        gw.eastus.fail_next("500")  # one failover, and an attempt span with an error
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES,
                                       extra_headers={"traceparent": f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"})
        records = gw.sink.wait(11)
        expected: dict[tuple[str, str, str], float] = defaultdict(float)
        for record in records:
            expected[(record.key_name, record.deployment, "input")] += record.prompt_tokens
            expected[(record.key_name, record.deployment, "output")] += record.completion_tokens
        eventually(lambda: token_sums(receiver) == dict(expected), timeout=20,
                   message=lambda: (token_sums(receiver), dict(expected)))
        assert len({(k, d) for k, d, _ in expected}) == 6 and all(v > 0 for k, v in expected.items() if k[2] == "input")

        [(attributes, _)] = [p for p in receiver.latest("gen_ai.client.token.usage")
                             if p[0]["gen_ai.request.model"] == "text-embedding-3-small"
                             and p[0]["gen_ai.token.type"] == "input"
                             and p[0]["aoai_gateway.key_name"] == records[0].key_name]
        assert attributes["gen_ai.operation.name"] == "embeddings"
        assert attributes["gen_ai.provider.name"] == "azure.ai.openai"
        assert attributes["server.address"] == "127.0.0.1"
        assert attributes["aoai_gateway.usage_source"] == "reported"
        assert attributes["aoai_gateway.backend"] in ("eastus", "westus")
        eventually(lambda: {"gen_ai.client.operation.duration", "gen_ai.client.operation.time_to_first_chunk",
                            "aoai_gateway.failovers", "aoai_gateway.backends.cooling", "aoai_gateway.usage.buffered",
                            "aoai_gateway.usage.counted"} <= receiver.metric_names(), timeout=10,
                   message=receiver.metric_names)
        assert receiver.metric_names() <= set(METRICS)
        [(failover, point)] = receiver.latest("aoai_gateway.failovers")
        assert (failover, point.as_int) == ({"reason": "server_error", "aoai_gateway.backend": "eastus"}, 1)
        eventually(lambda: sum(p.as_int for _, p in receiver.latest("aoai_gateway.usage.counted")) >= len(records),
                   timeout=10)

        def request_spans() -> list[Any]:
            return [s for s in receiver.spans if s.kind == 2 and "aoai_gateway.request_id" in s.attributes]

        eventually(lambda: len(request_spans()) == len(records), timeout=10,
                   message=lambda: [s.name for s in receiver.spans])
        attempts = [s for s in receiver.spans if s.kind == 3]
        by_id = {s.span_id: s for s in request_spans()}
        assert len(attempts) == len(records) + 1  # the failed attempt too
        assert all(a.parent_span_id in by_id and a.trace_id == by_id[a.parent_span_id].trace_id for a in attempts)
        assert all(a.attributes["server.address"] == "127.0.0.1" and a.attributes["aoai_gateway.backend"]
                   for a in attempts)
        [traced] = [s for s in request_spans() if s.trace_id == CLIENT_TRACE]
        assert traced.parent_span_id == CLIENT_SPAN and traced.name == "chat gpt-4o"
        children = [a for a in attempts if a.parent_span_id == traced.span_id]
        assert [(a.attributes["aoai_gateway.backend"], a.status_code) for a in children] == [
            ("eastus", 2), ("westus", 0)]
        upstream = [r.headers.get("traceparent", "") for r in gw.eastus.received + gw.westus.received]
        assert all(tp.endswith(("-01", "-03")) for tp in upstream)  # sampled (and, 03, a random trace id)
        assert {f"00-{a.trace_id}-{a.span_id}" for a in attempts} == {tp[:-3] for tp in upstream}

        everything = repr(receiver.spans) + repr([receiver.latest(n) for n in METRICS])
        assert gw.key not in everything and other not in everything
        assert all(b.api_key not in everything for b in gw.settings.backends if b.api_key)


def test_no_exporter_set_means_no_telemetry(storage: str) -> None:
    """Without APPLICATIONINSIGHTS_CONNECTION_STRING or OTEL_EXPORTER_OTLP_ENDPOINT nothing is set up: no traceparent
    goes upstream."""
    with running_gateway(storage) as gw:
        client = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=gw.key, api_version="2024-10-21")
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert "traceparent" not in gw.eastus.received[-1].headers
        assert http("GET", f"{gw.url}/health").status == 200


EXPORTERS = '''
import json, sys
from gateway._telemetry import _exporters, _wanted
env = json.loads(sys.argv[1])
azure, otlp = _wanted(env)
metrics, spans = _exporters(env, azure=azure, otlp=otlp)
print(json.dumps([type(e).__name__ for e in metrics + spans]))
'''


@pytest.mark.parametrize(("env", "expected"), [
    ({}, []),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}, ["OTLPMetricExporter", "OTLPSpanExporter"]),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"},
     ["OTLPMetricExporter", "OTLPSpanExporter"]),
    ({"APPLICATIONINSIGHTS_CONNECTION_STRING": CONNECTION},
     ["AzureMonitorMetricExporter", "AzureMonitorTraceExporter"]),
    ({"APPLICATIONINSIGHTS_CONNECTION_STRING": CONNECTION, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"},
     ["OTLPMetricExporter", "AzureMonitorMetricExporter", "OTLPSpanExporter", "AzureMonitorTraceExporter"]),
    ({"APPLICATIONINSIGHTS_CONNECTION_STRING": CONNECTION, "OTEL_SDK_DISABLED": "true"}, []),
])
def test_exporters_follow_the_environment(env: dict[str, str], expected: list[str], tmp_path: Path) -> None:
    """App Insights' connection string: Azure Monitor; an OTLP endpoint: OTLP/HTTP; both: both; neither: none."""
    done = subprocess.run([sys.executable, "-c", EXPORTERS, json.dumps(env)], cwd=PROJECT, capture_output=True,
                          text=True, timeout=120, check=False, env={**os.environ, "TMPDIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == expected


def test_traces_are_rate_limited_unless_a_sampler_is_set() -> None:
    """Without OTEL_TRACES_SAMPLER a busy instance records at most a few traces a second (the SDK's own sampler
    otherwise)."""
    from gateway._telemetry import DEFAULT_TRACES_PER_SECOND, _sampler

    assert _sampler({"OTEL_TRACES_SAMPLER": "always_on"}) is None
    assert str(DEFAULT_TRACES_PER_SECOND) in _sampler({}).get_description()
