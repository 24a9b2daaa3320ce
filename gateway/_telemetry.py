"""OpenTelemetry for the gateway, following the GenAI semantic conventions: metrics, a span per request with a
child span per backend attempt, and W3C ``traceparent`` upstream.

Exporters are chosen from the environment, once per process (``setup_telemetry``):

- ``APPLICATIONINSIGHTS_CONNECTION_STRING``: Azure Monitor, with the exporters of ``azure-monitor-opentelemetry``
  (``azure-monitor-opentelemetry-exporter``, what the distro is built on) on the app's own providers: the
  distro's ``configure_azure_monitor`` installs global providers, which FastAPI's native telemetry inside the
  worker then uses for a second server span and HTTP metrics per request, and exports logs the Functions host
  already ships (``APPLICATIONINSIGHTS_AUTHENTICATION_STRING`` ``Authorization=AAD;ClientId=…`` for Entra ID);
- ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` / ``…_TRACES_ENDPOINT``):
  OTLP over HTTP, with the standard ``OTEL_*`` variables (``OTEL_METRIC_EXPORT_INTERVAL``,
  ``OTEL_EXPORTER_OTLP_HEADERS``, ``OTEL_TRACES_SAMPLER``, ``OTEL_SERVICE_NAME``, …);
- both, or nothing: then ``Telemetry.off()`` is a no-op and the request path makes no OpenTelemetry call.

The SDK runs inside the worker and is set up by the app itself: the host's ``telemetryMode: OpenTelemetry``
stays off (with it, async functions on Python 3.13 have been reported to answer 500,
azure-functions-python-worker#1881), and so does the worker's ``PYTHON_ENABLE_OPENTELEMETRY``.

Metric and attribute names are listed in ``METRICS``; no attribute carries a key, a secret or a URL.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextvars import ContextVar, Token
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import aiohttp
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway._exceptions import QuotaExceeded, RequestError
from gateway._records import UsageRecord
from gateway._settings import BackendConfig
from usage import use_meter_provider

if TYPE_CHECKING:
    from gateway._backends import BackendPool
    from gateway._publish import UsagePublisher

__all__ = ["METRICS", "Span", "Telemetry", "flush_telemetry", "setup_telemetry"]

log = logging.getLogger(__name__)

SCOPE = "aoai_gateway"
PROVIDER = "azure.ai.openai"
#: the gateway's operations as ``gen_ai.operation.name`` spells them
OPERATIONS = {"chat/completions": "chat", "completions": "text_completion", "embeddings": "embeddings",
              "responses": "chat"}
#: name: (instrument, unit, description)
METRICS = {
    "gen_ai.client.token.usage": ("histogram", "{token}", "Tokens per request, by gen_ai.token.type"),
    "gen_ai.client.operation.duration": ("histogram", "s", "Request duration, until the answer's end"),
    "gen_ai.client.operation.time_to_first_chunk": ("histogram", "s", "Time to the first streamed chunk"),
    "aoai_gateway.failovers": ("counter", "{attempt}", "Backend attempts that failed over, by reason"),
    "aoai_gateway.backends.cooling": ("gauge", "{backend}", "Backends cooling now, per backend"),
    "aoai_gateway.quota.refusals": ("counter", "{request}", "Requests refused by a key's token quota"),
    "aoai_gateway.quota.budget_warnings": ("counter", "{warning}",
                                           "Keys passing 80% and 100% of their monthly budget, by threshold"),
    "aoai_gateway.usage.buffered": ("gauge", "{event}", "Usage events waiting in the publisher's buffer"),
    "aoai_gateway.usage.dropped": ("counter", "{event}", "Usage events dropped from a full buffer"),
    "aoai_gateway.usage.failed_sends": ("counter", "{send}", "Usage batches whose send failed"),
    "aoai_gateway.usage.counted": ("counter", "{event}", "Usage events the aggregator counted"),
    "aoai_gateway.usage.rejected": ("counter", "{event}", "Usage messages the aggregator rejected"),
    "aoai_gateway.usage.unpriced": ("counter", "{event}", "Usage events counted with no price in force"),
    "aoai_gateway.usage.lag": ("histogram", "s", "From an event's time to its being counted"),
}
_TOKEN_BUCKETS = [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864]
_SECONDS_BUCKETS = [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92]
_TRACECONTEXT = TraceContextTextMapPropagator()
#: traces started a second (per instance) when OTEL_TRACES_SAMPLER is not set
DEFAULT_TRACES_PER_SECOND = 5.0
_providers: tuple[Any, Any] | None = None  # (MeterProvider, TracerProvider), or (None, None): no exporter


def _wanted(env: Mapping[str, str]) -> tuple[bool, bool]:
    """(Azure Monitor, OTLP) as the environment asks."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False, False
    azure = bool(env.get("APPLICATIONINSIGHTS_CONNECTION_STRING", "").strip())
    otlp = any(env.get(f"OTEL_EXPORTER_OTLP{part}_ENDPOINT", "").strip() for part in ("", "_METRICS", "_TRACES"))
    return azure, otlp


def _azure_credential(env: Mapping[str, str]) -> Any:
    """Entra ID for ingestion when ``APPLICATIONINSIGHTS_AUTHENTICATION_STRING`` says ``Authorization=AAD``."""
    fields = dict(part.split("=", 1) for part in env.get("APPLICATIONINSIGHTS_AUTHENTICATION_STRING", "").split(";")
                  if "=" in part)
    if fields.get("Authorization", "").upper() != "AAD":
        return None
    from azure.identity import ManagedIdentityCredential  # noqa: PLC0415

    return ManagedIdentityCredential(client_id=fields.get("ClientId") or env.get("AZURE_CLIENT_ID") or None)


def _exporters(env: Mapping[str, str], *, azure: bool, otlp: bool) -> tuple[list[Any], list[Any]]:
    """Metric exporters and span exporters; each reads its own settings (the OTLP ones the ``OTEL_*``)."""
    metric_exporters: list[Any] = []
    span_exporters: list[Any] = []
    if otlp:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter  # noqa: PLC0415
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter  # noqa: PLC0415

        metric_exporters.append(OTLPMetricExporter())
        span_exporters.append(OTLPSpanExporter())
    if azure:
        from azure.monitor.opentelemetry.exporter import (  # noqa: PLC0415
            AzureMonitorMetricExporter,
            AzureMonitorTraceExporter,
        )

        options = {"connection_string": env["APPLICATIONINSIGHTS_CONNECTION_STRING"],
                   "credential": _azure_credential(env)}
        metric_exporters.append(AzureMonitorMetricExporter(**options))
        span_exporters.append(AzureMonitorTraceExporter(**options))
    return metric_exporters, span_exporters


def _sampler(env: Mapping[str, str]) -> Any:
    """``OTEL_TRACES_SAMPLER`` when set (the SDK reads it); else at most ``DEFAULT_TRACES_PER_SECOND`` new traces
    a second, a client's sampled ``traceparent`` always followed (Azure Monitor's default too): a recorded span
    and its export cost more than all the metrics, so a busy instance records a sample."""
    if env.get("OTEL_TRACES_SAMPLER", "").strip():
        return None
    from azure.monitor.opentelemetry.exporter import RateLimitedSampler  # noqa: PLC0415

    return RateLimitedSampler(DEFAULT_TRACES_PER_SECOND)


def setup_telemetry(env: Mapping[str, str] | None = None) -> bool:
    """Make this process's meter and tracer providers from the environment, once; True if any exporter is on.

    The providers are the app's own, never OpenTelemetry's globals: a library that finds global providers
    instruments itself (FastAPI's native telemetry, inside the worker's HTTP server, would add a server span
    and HTTP metrics to every request; the Azure SDK a span per storage call).
    """
    global _providers  # noqa: PLW0603 (one set of providers per process)
    if _providers is not None:
        return _providers[0] is not None
    env = os.environ if env is None else env
    azure, otlp = _wanted(env)
    if not (azure or otlp):
        _providers = (None, None)
        return False
    from opentelemetry.sdk.metrics import MeterProvider  # noqa: PLC0415
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader  # noqa: PLC0415
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415

    metric_exporters, span_exporters = _exporters(env, azure=azure, otlp=otlp)
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME") or "aoai-gateway"})
    exemplars: dict[str, Any] = {}
    if not env.get("OTEL_METRICS_EXEMPLAR_FILTER"):  # exemplars cost every measurement; on request only
        from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter  # noqa: PLC0415

        exemplars["exemplar_filter"] = AlwaysOffExemplarFilter()
    meter_provider = MeterProvider(metric_readers=[PeriodicExportingMetricReader(e) for e in metric_exporters],
                                   resource=resource, **exemplars)
    tracer_provider = TracerProvider(resource=resource, sampler=_sampler(env))
    for exporter in span_exporters:
        tracer_provider.add_span_processor(BatchSpanProcessor(exporter))
    _providers = (meter_provider, tracer_provider)
    use_meter_provider(meter_provider)
    log.info("telemetry: %s", " and ".join(n for n, on in (("Azure Monitor", azure), ("OTLP/HTTP", otlp)) if on))
    return True


def flush_telemetry(timeout_millis: int = 5000) -> None:
    """Export what the providers hold (at shutdown)."""
    if _providers is not None:
        for provider in _providers:
            if provider is not None:
                provider.force_flush(timeout_millis)


def _host(endpoint: str) -> tuple[str, int | None]:
    parts = urlsplit(endpoint)
    return parts.hostname or "", parts.port


#: the request span the current task works for: the parent of its attempts' spans
_REQUEST_SPAN: ContextVar[Span | None] = ContextVar("aoai_gateway_request_span", default=None)


class _Current:
    """Makes a request's span the parent of the attempts made inside (a plain context manager: it is on the
    request path)."""

    __slots__ = ("_span", "_token")

    def __init__(self, span: Span | None) -> None:
        self._span = span
        self._token: Token[Span | None] | None = None

    def __enter__(self) -> None:
        if self._span is not None:
            self._token = _REQUEST_SPAN.set(self._span)

    def __exit__(self, *_: object) -> None:
        if self._token is not None:
            _REQUEST_SPAN.reset(self._token)


_NO_CURRENT = _Current(None)


class _Attempt:
    """One backend attempt's span, from ``with`` to its end; ``answered`` records the status that came back.
    Entering puts its ``traceparent`` in ``headers``."""

    __slots__ = ("_attributes", "_headers", "_span", "_telemetry", "backend")

    def __init__(self, telemetry: Telemetry | None, backend: str, attributes: dict[str, Any],
                 headers: dict[str, str]) -> None:
        self._telemetry = telemetry
        self.backend = backend
        self._attributes = attributes
        self._headers = headers
        self._span: Span | None = None

    def __enter__(self) -> _Attempt:
        if self._telemetry is not None:
            parent = _REQUEST_SPAN.get()
            context = None if parent is None else trace.set_span_in_context(parent)
            self._span = self._telemetry.tracer.start_span("POST", context=context, kind=SpanKind.CLIENT,
                                                           attributes=self._attributes)
            _TRACECONTEXT.inject(self._headers, context=trace.set_span_in_context(self._span))
        return self

    def answered(self, status: int) -> None:
        if self._span is None or self._telemetry is None:
            return
        self._span.set_attribute("http.response.status_code", status)
        if status == 429 or status >= 500:
            self._span.set_attribute("error.type", str(status))
            self._span.set_status(Status(StatusCode.ERROR))
            self._telemetry.failovers.add(1, {"reason": "throttled" if status == 429 else "server_error",
                                              "aoai_gateway.backend": self.backend})

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _: object) -> None:
        if self._span is None or self._telemetry is None:
            return
        if error is not None and isinstance(error, aiohttp.ClientError | TimeoutError | OSError):
            # what the failover loop fails over on
            self._span.set_attribute("error.type", type(error).__name__)
            self._span.set_status(Status(StatusCode.ERROR))
            reason = "timeout" if isinstance(error, TimeoutError) else "connection"
            self._telemetry.failovers.add(1, {"reason": reason, "aoai_gateway.backend": self.backend})
        self._span.end()


_NO_ATTEMPT = _Attempt(None, "", {}, {})


class Telemetry:
    """The gateway's instruments and spans. ``Telemetry.off()`` does nothing at every hook."""

    def __init__(self, backends: Sequence[BackendConfig], *, enabled: bool) -> None:
        self.enabled = enabled
        self._servers = {b.name: _host(b.endpoint) for b in backends}
        self._attributes: dict[tuple[str, ...], tuple[dict[str, Any], dict[str, Any], dict[str, Any]]] = {}
        self._attempt_attributes: dict[str, dict[str, Any]] = {}
        if not enabled:
            return
        assert _providers is not None and _providers[0] is not None
        meter = _providers[0].get_meter(SCOPE)
        self.tracer: trace.Tracer = _providers[1].get_tracer(SCOPE)
        self._tokens = meter.create_histogram("gen_ai.client.token.usage", unit="{token}",
                                              description=METRICS["gen_ai.client.token.usage"][2],
                                              explicit_bucket_boundaries_advisory=_TOKEN_BUCKETS)
        self._duration = meter.create_histogram("gen_ai.client.operation.duration", unit="s",
                                                description=METRICS["gen_ai.client.operation.duration"][2],
                                                explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS)
        self._first_chunk = meter.create_histogram(
            "gen_ai.client.operation.time_to_first_chunk", unit="s",
            description=METRICS["gen_ai.client.operation.time_to_first_chunk"][2],
            explicit_bucket_boundaries_advisory=_SECONDS_BUCKETS)
        self.failovers = meter.create_counter("aoai_gateway.failovers", unit="{attempt}",
                                               description=METRICS["aoai_gateway.failovers"][2])
        self._refusals = meter.create_counter("aoai_gateway.quota.refusals", unit="{request}",
                                              description=METRICS["aoai_gateway.quota.refusals"][2])
        self._budget_warnings = meter.create_counter(
            "aoai_gateway.quota.budget_warnings", unit="{warning}",
            description=METRICS["aoai_gateway.quota.budget_warnings"][2])

    @classmethod
    def from_env(cls, backends: Sequence[BackendConfig], env: Mapping[str, str] | None = None) -> Telemetry:
        return cls(backends, enabled=setup_telemetry(env))

    @classmethod
    def off(cls) -> Telemetry:
        return cls((), enabled=False)

    # -- gauges read at export time, never on the request path -------------------------------

    def observe(self, *, pool: BackendPool, publisher: UsagePublisher) -> None:
        if not self.enabled:
            return
        assert _providers is not None
        meter = _providers[0].get_meter(SCOPE)

        def cooling(_: CallbackOptions) -> Iterable[Observation]:
            counts = dict.fromkeys(self._servers, 0)
            for backend, _deployment in pool.cooling():
                counts[backend] = counts.get(backend, 0) + 1
            return [Observation(n, {"aoai_gateway.backend": name}) for name, n in counts.items()]

        def one(read: Callable[[], int]) -> Callable[[CallbackOptions], Iterable[Observation]]:
            return lambda _: [Observation(read())]

        meter.create_observable_gauge("aoai_gateway.backends.cooling", [cooling], unit="{backend}",
                                      description=METRICS["aoai_gateway.backends.cooling"][2])
        meter.create_observable_gauge("aoai_gateway.usage.buffered", [one(lambda: publisher.pending)],
                                      unit="{event}", description=METRICS["aoai_gateway.usage.buffered"][2])
        meter.create_observable_counter("aoai_gateway.usage.dropped", [one(lambda: publisher.dropped)],
                                        unit="{event}", description=METRICS["aoai_gateway.usage.dropped"][2])
        meter.create_observable_counter("aoai_gateway.usage.failed_sends", [one(lambda: publisher.failed_sends)],
                                        unit="{send}", description=METRICS["aoai_gateway.usage.failed_sends"][2])

    # -- spans -----------------------------------------------------------------------------

    def start_request(self, headers: Mapping[str, str], operation: str) -> Span | None:
        """The request's span, a child of the client's ``traceparent`` when it sent one."""
        if not self.enabled:
            return None
        parent: Context | None = _TRACECONTEXT.extract(headers) if "traceparent" in headers else None
        name = OPERATIONS.get(operation, operation)
        return self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER, attributes={
            "gen_ai.operation.name": name, "gen_ai.provider.name": PROVIDER})

    def current(self, span: Span | None) -> _Current:
        """Make ``span`` the parent of the attempts made inside (``with``)."""
        return _NO_CURRENT if span is None else _Current(span)

    def attempt(self, backend: BackendConfig, headers: dict[str, str]) -> _Attempt:
        """A child span for one attempt at ``backend`` (``with``); its ``traceparent`` goes into ``headers``."""
        if not self.enabled:
            return _NO_ATTEMPT
        attributes = self._attempt_attributes.get(backend.name)
        if attributes is None:
            address, port = self._servers.get(backend.name) or _host(backend.endpoint)
            attributes = {"http.request.method": "POST", "server.address": address,
                          "aoai_gateway.backend": backend.name}
            if port is not None:
                attributes["server.port"] = port
            self._attempt_attributes[backend.name] = attributes
        return _Attempt(self, backend.name, attributes, headers)

    def budget_warning(self, key_name: str, percent: int) -> None:
        """A key passed ``percent`` of its monthly budget (logged by the quota guard)."""
        if self.enabled:
            self._budget_warnings.add(1, {"aoai_gateway.key_name": key_name, "aoai_gateway.budget.percent": percent})

    def refused(self, span: Span | None, error: RequestError) -> None:
        """The gateway answered ``error`` itself; a quota refusal is counted."""
        if not self.enabled:
            return
        if isinstance(error, QuotaExceeded) or error.code == "QuotaTooSmall":
            self._refusals.add(1, {"error.type": error.code})
        if span is not None:
            span.set_attribute("error.type", error.code)

    def end_request(self, span: Span | None, status: int) -> None:
        """End a span whose request produced no usage record (refused before it was read)."""
        if span is None:
            return
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    # -- the usage record: metrics, and the end of the request's span ----------------------------

    def _attributes_of(self, record: UsageRecord) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
        """Input-token, output-token and duration attributes (cached: a few combinations recur)."""
        failed = record.status >= 400 or record.outcome not in ("complete",)
        cache_key = (record.key_name, record.deployment, record.model, record.backend, record.operation,
                     record.usage_source, str(record.status) if failed else "", record.outcome if failed else "")
        found = self._attributes.get(cache_key)
        if found is not None:
            return found
        common: dict[str, Any] = {
            "gen_ai.operation.name": OPERATIONS.get(record.operation, record.operation),
            "gen_ai.request.model": record.deployment, "gen_ai.provider.name": PROVIDER,
            "aoai_gateway.key_name": record.key_name, "aoai_gateway.backend": record.backend,
            "aoai_gateway.usage_source": record.usage_source,
        }
        if record.model:
            common["gen_ai.response.model"] = record.model
        address, port = self._servers.get(record.backend, ("", None))
        if address:
            common["server.address"] = address
            if port is not None:
                common["server.port"] = port
        duration = dict(common)
        if failed:
            duration["error.type"] = str(record.status) if record.status >= 400 else record.outcome
        found = ({**common, "gen_ai.token.type": "input"}, {**common, "gen_ai.token.type": "output"}, duration)
        if len(self._attributes) > 10_000:
            self._attributes.clear()
        self._attributes[cache_key] = found
        return found

    def record(self, span: Span | None, record: UsageRecord) -> None:
        """Token, duration and first-chunk metrics for one request, and the end of its span."""
        if not self.enabled:
            return
        inputs, outputs, duration = self._attributes_of(record)
        if record.usage_source != "none":
            self._tokens.record(record.prompt_tokens, inputs)
            self._tokens.record(record.completion_tokens, outputs)
        self._duration.record(record.latency_ms / 1000, duration)
        if record.streaming and record.ttfb_ms is not None:
            self._first_chunk.record(record.ttfb_ms / 1000, duration)
        if span is None:
            return
        span.update_name(f"{duration['gen_ai.operation.name']} {record.deployment}")
        span.set_attributes({k: v for k, v in duration.items() if k != "aoai_gateway.usage_source"})
        span.set_attributes({"gen_ai.usage.input_tokens": record.prompt_tokens,
                             "gen_ai.usage.output_tokens": record.completion_tokens,
                             "http.response.status_code": record.status, "aoai_gateway.outcome": record.outcome,
                             "aoai_gateway.request_id": record.request_id})
        if record.status >= 500 or record.outcome == "upstream_cut":
            span.set_status(Status(StatusCode.ERROR))
        span.end()
