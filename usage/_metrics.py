"""Where the usage side's instruments come from: the meter provider the process installed (the gateway's
``setup_telemetry``), else OpenTelemetry's no-op one. Not the global provider: libraries that find a global
one instrument themselves (FastAPI's native telemetry would add a span and metrics to every request)."""

from __future__ import annotations

from opentelemetry.metrics import Meter, MeterProvider, NoOpMeterProvider

_provider: MeterProvider = NoOpMeterProvider()


def use_meter_provider(provider: MeterProvider) -> None:
    global _provider  # noqa: PLW0603 (one provider per process)
    _provider = provider


def usage_meter() -> Meter:
    return _provider.get_meter("aoai_gateway.usage")
