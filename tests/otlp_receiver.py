"""A local OTLP/HTTP receiver: decodes the protobuf export requests the gateway's exporters POST to
``/v1/metrics`` and ``/v1/traces`` (``opentelemetry-proto``) and keeps what arrived."""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue

from tests.harness import LoopThread


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


def attributes(items: Any) -> dict[str, Any]:
    return {item.key: _value(item.value) for item in items}


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status_code: int


class OtlpReceiver:
    """Keeps every metric data point and span it is sent (thread-safe reads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._metrics: list[ExportMetricsServiceRequest] = []
        self.spans: list[ReceivedSpan] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/metrics", self._on_metrics)
        app.router.add_post("/v1/traces", self._on_traces)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @staticmethod
    async def _body(request: web.Request) -> bytes:
        body = await request.read()
        return gzip.decompress(body) if request.headers.get("content-encoding") == "gzip" else body

    async def _on_metrics(self, request: web.Request) -> web.Response:
        message = ExportMetricsServiceRequest.FromString(await self._body(request))
        with self._lock:
            self._metrics.append(message)
        return web.Response(body=ExportMetricsServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    async def _on_traces(self, request: web.Request) -> web.Response:
        message = ExportTraceServiceRequest.FromString(await self._body(request))
        spans = [ReceivedSpan(span.name, span.kind, span.trace_id.hex(), span.span_id.hex(), span.parent_span_id.hex(),
                              attributes(span.attributes), span.status.code)
                 for resource in message.resource_spans for scope in resource.scope_spans for span in scope.spans]
        with self._lock:
            self.spans.extend(spans)
        return web.Response(body=ExportTraceServiceResponse().SerializeToString(),
                            content_type="application/x-protobuf")

    def metric_names(self) -> set[str]:
        with self._lock:
            return {metric.name for request in self._metrics for resource in request.resource_metrics
                    for scope in resource.scope_metrics for metric in scope.metrics}

    def latest(self, name: str) -> list[tuple[dict[str, Any], Any]]:
        """The data points of the last export that had metric ``name`` (cumulative: the running totals)."""
        with self._lock:
            requests = list(self._metrics)
        for request in reversed(requests):
            points = [(attributes(point.attributes), point)
                      for resource in request.resource_metrics for scope in resource.scope_metrics
                      for metric in scope.metrics if metric.name == name
                      for point in getattr(metric, metric.WhichOneof("data")).data_points]
            if points:
                return points
        return []


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    loop = LoopThread()
    receiver = OtlpReceiver()
    loop.run(receiver.start())
    try:
        yield receiver
    finally:
        loop.run(receiver.stop())
        loop.close()
