"""Benchmark: what the telemetry hooks cost one request, in process, exports included.

Run by hand (``.venv/bin/python bench/bench_telemetry.py [--sampler always_on]``). It exports over OTLP/HTTP
to a local sink (``bench/otlp_sink.py``) every second and runs the hooks a request goes through (the request
span, one attempt span with its traceparent, the token, duration and first-chunk metrics) many times; the
CPU of the whole process, export threads included, divided by the requests. Steadier than the end-to-end
benchmark on a busy machine; compare with the gateway's worker CPU per stream there.
"""

from __future__ import annotations

import argparse
import atexit
import os
import resource
import subprocess
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from devkit.services import free_port, wait_for_port  # noqa: E402


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--sampler", help="OTEL_TRACES_SAMPLER (default: the gateway's, 5 traces a second)")
    args = parser.parse_args()
    port = free_port()
    sink = subprocess.Popen([sys.executable, "bench/otlp_sink.py", str(port)], cwd=PROJECT)
    atexit.register(sink.terminate)  # after the providers' own exit hooks (registered later, run first)
    wait_for_port(port)
    os.environ.update({"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
                       "OTEL_METRIC_EXPORT_INTERVAL": "1000", "OTEL_BSP_SCHEDULE_DELAY": "1000"})
    if args.sampler:
        os.environ["OTEL_TRACES_SAMPLER"] = args.sampler
    from gateway._records import UsageRecord  # noqa: PLC0415
    from gateway._settings import BackendConfig  # noqa: PLC0415
    from gateway._telemetry import Telemetry, flush_telemetry  # noqa: PLC0415

    backend = BackendConfig(name="eastus", endpoint="http://127.0.0.1:8001")
    telemetry = Telemetry.from_env([backend])
    record = UsageRecord(
        request_id="0" * 32, time="2026-11-29T13:45:00+00:00", key_name="team-a", deployment="gpt-4o",
        model="gpt-4o-2024-08-06", backend="eastus", operation="chat/completions", streaming=True,
        prompt_tokens=100, completion_tokens=50, total_tokens=150, cached_tokens=0, reasoning_tokens=0,
        usage_source="reported", status=200, latency_ms=5.0, ttfb_ms=1.0, outcome="complete")

    def one() -> None:
        span = telemetry.start_request({"content-type": "application/json"}, "chat/completions")
        with telemetry.current(span):
            headers: dict[str, str] = {}
            with telemetry.attempt(backend, headers) as attempt:
                attempt.answered(200)
        telemetry.record(span, record)

    for _ in range(1000):
        one()
    flush_telemetry()
    started = cpu()
    for _ in range(args.requests):
        one()
    flush_telemetry()
    per_request = (cpu() - started) / args.requests * 1e6
    print(f"telemetry: {per_request:.1f} µs of CPU per request ({args.sampler or 'default sampler'}, "
          f"{args.requests} requests, exports included)")


if __name__ == "__main__":
    main()
