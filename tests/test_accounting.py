"""The four accounting defects an independent accounting run found, each pinned by a test that failed before."""

from __future__ import annotations

from typing import Any

import openai
import tiktoken

from gateway import _tokens
from tests.harness import Gateway, http

# The cookbook's worked example ("How to count tokens with tiktoken"): the API billed 101 prompt tokens on
# gpt-4o and gpt-4o-mini, 105 on gpt-4 and gpt-3.5-turbo.
WEATHER_TOOLS: list[dict[str, Any]] = [{"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather in a given location",
    "parameters": {"type": "object", "required": ["location"], "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "description": "The unit of temperature to return",
                 "enum": ["celsius", "fahrenheit"]}}}}}]
WEATHER_MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant that can answer to questions about the weather."},
    {"role": "user", "content": "What's the weather like in San Francisco?"},
]


def test_tools_count_as_the_model_renders_them() -> None:
    """Function definitions by the published tool-token recipe: the cookbook's example, as billed."""
    body = {"messages": WEATHER_MESSAGES, "tools": WEATHER_TOOLS}
    assert _tokens.prompt_tokens(body, "chat/completions", "gpt-4o") == 101
    assert _tokens.prompt_tokens(body, "chat/completions", "gpt-4o-mini") == 101
    assert _tokens.prompt_tokens(body, "chat/completions", "gpt-4") == 105
    assert _tokens.prompt_tokens(body, "chat/completions", "gpt-35-turbo") == 105
    flat = [{"type": "function", **tool["function"]} for tool in WEATHER_TOOLS]  # the Responses API's shape
    assert _tokens.tools_tokens(flat, "gpt-4o") == _tokens.tools_tokens(WEATHER_TOOLS, "gpt-4o") > 0
    assert _tokens.tools_tokens([{"type": "web_search"}], "gpt-4o") == 0


def reference_count(messages: list[dict[str, str]]) -> int:
    """The cookbook's num_tokens_from_messages for gpt-4o, as published."""
    encoding = tiktoken.get_encoding("o200k_base")
    total = 3
    for message in messages:
        total += 3
        for key, value in message.items():
            total += len(encoding.encode(value))
            if key == "name":
                total += 1
    return total


def test_each_message_name_costs_one_more_token() -> None:
    """A 24-message multi-agent prompt: every message with a name costs its name's tokens plus one."""
    agents = ("planner", "researcher", "critic", "writer")
    messages = [{"role": "system", "content": "Agents take turns; keep each turn short."}]
    messages += [{"role": "assistant" if i % 2 else "user", "name": agents[i % 4],
                  "content": f"Turn {i}: the {agents[i % 4]} adds one more point about the plan."} for i in range(23)]
    _tokens.encoding("o200k_base")  # seeded offline before tiktoken is asked for it by name
    expected = reference_count(messages)
    assert _tokens.prompt_tokens({"messages": messages}, "chat/completions", "gpt-4o") == expected
    assert expected == _tokens.prompt_tokens({"messages": [{k: v for k, v in m.items() if k != "name"}
                                                           for m in messages]}, "chat/completions", "gpt-4o") + sum(
        _tokens.count(m["name"], "gpt-4o") + 1 for m in messages if "name" in m)


def test_requests_refused_after_authentication_are_counted(gateway: Gateway) -> None:
    """Every authenticated request is an event: a non-JSON body, a v1 call without model and a bad deployment name
    each give one with 0 tokens, its status and outcome refused; an unauthenticated request gives none."""
    headers = {"api-key": gateway.key, "content-type": "application/json"}
    chat = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
    sent = [
        http("POST", gateway.url + chat, headers=headers, body=b"{not json"),
        http("POST", gateway.url + "/openai/v1/chat/completions", headers=headers, body=b'{"messages": []}'),
        http("POST", gateway.url + "/openai/deployments/bad%20name/chat/completions", headers=headers, body=b"{}"),
        http("POST", gateway.url + chat, headers={"content-type": "application/json"}, body=b"{}"),
    ]
    assert [r.status for r in sent] == [400, 400, 400, 401]
    records = gateway.sink.wait(3)
    assert len(records) == 3
    assert [r.request_id for r in records] == [r.headers["x-gateway-request-id"] for r in sent[:3]]
    assert [(r.deployment, r.operation, r.status, r.outcome, r.total_tokens, r.usage_source) for r in records] == [
        ("gpt-4o", "chat/completions", 400, "refused", 0, "none"),
        ("-", "chat/completions", 400, "refused", 0, "none"),
        ("-", "chat/completions", 400, "refused", 0, "none"),
    ]
    assert all(r.key_name.startswith("team-") for r in records)


def test_stream_options_refusal_is_remembered_per_deployment(gateway: Gateway) -> None:
    """One deployment refusing stream_options (an "on your data" deployment, say) leaves exact usage on for the
    backend's other deployments with the same api-version."""
    gateway.eastus.stream_options_refused = {"grounded"}
    client = openai.AzureOpenAI(azure_endpoint=gateway.url, api_key=gateway.key, api_version="2024-10-21",
                                max_retries=0)
    for deployment in ("grounded", "gpt-4o", "grounded", "gpt-4o"):
        chunks = list(client.chat.completions.create(model=deployment, stream=True,
                                                     messages=[{"role": "user", "content": "hi"}]))
        assert chunks
    sent = [(r.path.split("/")[3], "stream_options" in r.body) for r in gateway.eastus.received]
    assert sent == [("grounded", True), ("grounded", False), ("gpt-4o", True), ("grounded", False), ("gpt-4o", True)]
    records = gateway.sink.wait(4)
    assert [(r.deployment, r.usage_source) for r in records] == [
        ("grounded", "estimated"), ("gpt-4o", "reported"), ("grounded", "estimated"), ("gpt-4o", "reported")]
