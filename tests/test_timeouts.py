"""Time-outs, driven by the gateway's injected clock: no test here waits for one in real time.

The gateway measures every limit on ``Gateway.clock`` and looks at a moved clock every 10 ms, so
a test moves the clock to just short of a limit, gives the gateway a moment to look (nothing
may happen), then just past it (the limit must act).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, TypeVar

import openai
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from gateway import BackendConfig
from tests.harness import Gateway, running_gateway

T = TypeVar("T")
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Think hard"}]
LOOK = 0.15  # real seconds for the gateway to look at a moved clock (it looks every 10 ms)


def client(gw: Gateway) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(azure_endpoint=gw.url, api_key=gw.key, api_version="2024-10-21", max_retries=0)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.005)


@pytest.fixture
def background() -> Iterator[Callable[[Callable[[], T]], Future[T]]]:
    """Runs a blocking client call in a thread while the test moves the clock."""
    with ThreadPoolExecutor(2) as pool:
        yield pool.submit


def create(gw: Gateway, model: str = "gpt-4o") -> Callable[[], Any]:
    return lambda: client(gw).chat.completions.with_raw_response.create(model=model, messages=MESSAGES)


def test_header_timeout_fails_over(storage: str, background: Any) -> None:
    """A region that sends no headers is left after RESPONSE_TIMEOUT_SECONDS on the clock, not before."""
    with running_gateway(storage, response_timeout=60.0) as gw:
        gw.eastus.fail_next("hang")
        answer = background(create(gw))
        wait_until(lambda: len(gw.eastus.received) == 1)
        gw.clock.advance(59.9)
        time.sleep(LOOK)
        assert not gw.westus.received and not answer.done()
        gw.clock.advance(0.2)
        assert answer.result(10).headers["x-gateway-backend"] == "westus"
        assert any("backend eastus failed (time-out)" in line for line in gw.logs.lines)


def test_most_specific_response_timeout_wins(storage: str, background: Any) -> None:
    """The deployment's response_timeout_seconds beats its backend's, which beats RESPONSE_TIMEOUT_SECONDS."""

    def slow(regions: tuple[BackendConfig, ...]) -> tuple[BackendConfig, ...]:
        east, west = regions
        return replace(east, response_timeout=20.0, deployments={"gpt-4o": "gpt-4o", "o3": "o3-east"},
                       deployment_timeouts={"o3": 60.0}), west

    with running_gateway(storage, backends=slow, response_timeout=5.0, failure_cooldown=0.0) as gw:
        for model, seconds in (("gpt-4o", 20.0), ("o3", 60.0)):
            before = len(gw.westus.received)
            gw.eastus.fail_next("hang")
            answer = background(create(gw, model))
            wait_until(lambda: len(gw.eastus.received) == before + 1)  # noqa: B023
            gw.clock.advance(seconds - 0.1)
            time.sleep(LOOK)
            assert len(gw.westus.received) == before, f"{model} failed over before {seconds} s"
            gw.clock.advance(0.2)
            assert answer.result(10).headers["x-gateway-backend"] == "westus"
        assert gw.eastus.received[-1].path == "/openai/deployments/o3-east/chat/completions"


def test_slow_headers_are_not_cut_by_the_stream_idle_timeout(storage: str, background: Any) -> None:
    """Waiting for headers longer than STREAM_IDLE_TIMEOUT_SECONDS is fine: only the header limit applies."""
    with running_gateway(storage, stream_idle_timeout=2.0, response_timeout=10.0) as gw:
        gw.eastus.first_chunk_delay = 0.5  # real seconds, while the clock moves past the idle limit
        answer = background(create(gw))
        wait_until(lambda: len(gw.eastus.received) == 1)
        gw.clock.advance(9.0)
        raw = answer.result(10)
        assert raw.headers["x-gateway-backend"] == "eastus" and not gw.westus.received


def test_request_deadline_ends_the_attempts_with_504(storage: str, background: Any) -> None:
    """REQUEST_DEADLINE_SECONDS cuts the last wait short: 504 on time, and the cut backend is not cooled."""
    with running_gateway(storage, request_deadline=30.0, response_timeout=20.0, failure_cooldown=60.0) as gw:
        gw.eastus.fail_next("hang")
        gw.westus.fail_next("hang")
        answer = background(create(gw))
        wait_until(lambda: len(gw.eastus.received) == 1)
        gw.clock.advance(20.1)  # eastus's own limit: on to westus
        wait_until(lambda: len(gw.westus.received) == 1)
        gw.clock.advance(9.7)  # westus's own limit is at 40.1, the deadline at 30
        time.sleep(LOOK)
        assert not answer.done()
        gw.clock.advance(0.3)
        with pytest.raises(openai.APIStatusError) as caught:
            answer.result(10)
        assert caught.value.status_code == 504
        error = caught.value.response.json()["error"]
        assert error["code"] == "GatewayTimeout" and "deadline" in error["message"]
        # eastus cools for a minute after its own time-out; westus, cut by the deadline, does not
        assert create(gw)().headers["x-gateway-backend"] == "westus"


def test_max_attempts_bounds_the_backends_tried(storage: str, background: Any) -> None:
    """With MAX_ATTEMPTS=1 a timed-out region gets 504 at once; the next region is never asked."""
    with running_gateway(storage, max_attempts=1, response_timeout=60.0) as gw:
        gw.eastus.fail_next("hang")
        answer = background(create(gw))
        wait_until(lambda: len(gw.eastus.received) == 1)
        gw.clock.advance(60.1)
        with pytest.raises(openai.APIStatusError) as caught:
            answer.result(10)
        assert caught.value.status_code == 504
        assert caught.value.response.json()["error"]["code"] == "GatewayTimeout"
        assert not gw.westus.received


def test_stalled_stream_is_ended_after_the_idle_timeout(storage: str, background: Any) -> None:
    """A stream that goes silent ends with an in-stream error once STREAM_IDLE_TIMEOUT_SECONDS pass on the clock."""
    with running_gateway(storage, stream_idle_timeout=30.0) as gw:
        gw.eastus.chunks = 4
        gw.eastus.fail_next("stall")  # after half its frames: filter results, role, 2 words
        stream = client(gw).chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True)
        got: list[ChatCompletionChunk] = []
        done = threading.Event()

        def read() -> None:
            try:
                for chunk in stream:
                    got.append(chunk)
            finally:
                done.set()

        reading = background(read)
        wait_until(lambda: len(got) == 4)
        gw.clock.advance(29.9)
        time.sleep(LOOK)
        assert not done.is_set()
        gw.clock.advance(0.2)
        with pytest.raises(openai.APIError, match="broke off"):
            reading.result(10)
        [record] = gw.sink.wait(1)
        assert record.outcome == "upstream_cut" and record.usage_source == "estimated"
