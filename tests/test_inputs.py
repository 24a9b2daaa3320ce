"""Bad input gets an AOAI-shaped error with the right status; secrets stay where they belong."""

from __future__ import annotations

import json
from collections.abc import Iterator

import openai
import pytest

from tests.harness import Gateway, backend_key, http, running_gateway
from usage import KeyStore, open_table_service

CHAT = "/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21"
GOOD = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()


def chunked(body: bytes, size: int = 1024) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start:start + size]


@pytest.fixture
def small_gateway(storage: str) -> Iterator[Gateway]:
    with running_gateway(storage, max_request_bytes=4096) as running:
        yield running


def revoked_key(gw: Gateway) -> str:
    async def make() -> str:
        async with open_table_service(gw.settings.storage) as service:
            store = KeyStore(service, secret=gw.settings.key_hash_secret)
            key = await store.create("revoked-team")
            await store.revoke("revoked-team")
            return key

    return gw.loop.run(make())


CASES = [
    # (what, method, path, headers, body, status, code)
    ("no key", "POST", CHAT, {}, GOOD, 401, None),
    ("unknown key", "POST", CHAT, {"api-key": "gw-not-a-real-key"}, GOOD, 401, None),
    ("bearer of unknown key", "POST", CHAT, {"authorization": "Bearer nope"}, GOOD, 401, None),
    ("body not JSON", "POST", CHAT, "KEY", b"{not json", 400, "InvalidRequestBody"),
    ("empty body", "POST", CHAT, "KEY", b"", 400, "InvalidRequestBody"),
    ("body is an array", "POST", CHAT, "KEY", b"[1, 2]", 400, "InvalidRequestBody"),
    ("body over the limit", "POST", CHAT, "KEY", b'{"x": "' + b"a" * 8000 + b'"}', 413, "RequestEntityTooLarge"),
    ("chunked body over the limit", "POST", CHAT, "KEY", "CHUNKED", 413, "RequestEntityTooLarge"),
    ("unknown route", "POST", "/openai/deployments/gpt-4o/images/generations", "KEY", GOOD, 404, "404"),
    ("not openai at all", "GET", "/admin/secrets", {}, None, 404, "404"),
    ("wrong method", "GET", CHAT, "KEY", None, 405, "MethodNotAllowed"),
    ("v1 without model", "POST", "/openai/v1/chat/completions", "KEY", GOOD, 400, "MissingModel"),
    ("v1 model not a plain name", "POST", "/openai/v1/chat/completions", "KEY",
     b'{"model": "../../x", "messages": []}', 400, "InvalidDeploymentName"),
    ("deployment with an encoded slash", "POST",
     "/openai/deployments/a%2F..%2Fb/chat/completions?api-version=2024-10-21", "KEY", GOOD, 400,
     "InvalidDeploymentName"),
    ("deployment with a space", "POST", "/openai/deployments/gpt%204o/chat/completions", "KEY", GOOD, 400,
     "InvalidDeploymentName"),
]


@pytest.mark.parametrize(("what", "method", "path", "headers", "body", "status", "code"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_input_gets_aoai_shaped_error(
    small_gateway: Gateway, what: str, method: str, path: str, headers: object, body: object,
    status: int, code: str | None,
) -> None:
    """Each bad request gets its status and a JSON {"error": {"code", "message"}} body."""
    sent_headers = {"api-key": small_gateway.key} if headers == "KEY" else dict(headers)  # type: ignore[call-overload]
    sent_headers["content-type"] = "application/json"
    payload = chunked(b'{"x": "' + b"a" * 9000 + b'"}') if body == "CHUNKED" else body
    response = http(method, small_gateway.url + path, headers=sent_headers, body=payload)  # type: ignore[arg-type]
    assert response.status == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    assert "Traceback" not in response.text
    assert small_gateway.eastus.received == [] and small_gateway.westus.received == []


def test_revoked_key_is_refused(gateway: Gateway) -> None:
    """A revoked key gets openai.AuthenticationError."""
    client = openai.AzureOpenAI(azure_endpoint=gateway.url, api_key=revoked_key(gateway),
                                api_version="2024-10-21", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_no_key_is_forwarded_logged_or_leaked(storage: str) -> None:
    """Client keys never go upstream; backend keys never reach the client; no key reaches a log, even DEBUG."""
    with running_gateway(storage, env={"PYTHON_ENABLE_DEBUG_LOGGING": "1"}) as gateway:
        _check_no_key_leaks(gateway)


def _check_no_key_leaks(gateway: Gateway) -> None:
    styles = [{"api-key": gateway.key}, {"authorization": f"Bearer {gateway.key}"},
              {"ocp-apim-subscription-key": gateway.key}]
    responses = []
    for headers in styles:
        for stream in (False, True):
            body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": stream}).encode()
            responses.append(http("POST", f"{gateway.url}{CHAT}&api-key={gateway.key}",
                                  headers={**headers, "content-type": "application/json"}, body=body))
    assert [r.status for r in responses] == [200] * 6
    gateway.sink.wait(6)
    secrets = [gateway.key, backend_key(gateway.eastus), backend_key(gateway.westus)]
    for seen in gateway.eastus.received:
        assert gateway.key not in json.dumps(seen.headers) + json.dumps(seen.query) + json.dumps(seen.body)
        assert seen.headers["api-key"] == backend_key(gateway.eastus)
        lowered = {k.lower() for k in seen.headers}
        assert not lowered & {"authorization", "ocp-apim-subscription-key", "cookie"}
    for response in responses:
        everything = json.dumps(response.headers) + response.text
        assert backend_key(gateway.eastus) not in everything and backend_key(gateway.westus) not in everything
    log = "\n".join(gateway.logs.lines)
    assert "usage {" in log  # the worker's DEBUG usage records were forwarded, and the logs were really captured
    for secret in secrets:
        assert secret not in log


def test_hostile_bodies_get_400_not_500(gateway: Gateway) -> None:
    """JSON nested past the parser's depth, and lone surrogates, are client errors, not crashes."""
    deep = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = http("POST", gateway.url + CHAT, headers={"api-key": gateway.key, "content-type": "application/json"},
                    body=deep)
    assert response.status == 400 and response.json()["error"]["code"] == "InvalidRequestBody"
    surrogate = (b'{"messages": [{"role": "user", "content": "\\ud800"}], "stream": true, '
                 b'"stream_options": {"include_usage": false}}')
    response = http("POST", gateway.url + CHAT, headers={"api-key": gateway.key, "content-type": "application/json"},
                    body=surrogate)
    assert response.status == 200  # re-serialised with the gateway's stream_options, escapes intact
    assert gateway.eastus.received[-1].body["messages"][0]["content"] == "\ud800"
