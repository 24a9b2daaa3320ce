"""Bad input gets an AOAI-shaped error with the right status; secrets stay where they belong."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import time
import uuid
from collections.abc import Iterator

import openai
import pytest

from tests.harness import Gateway, RawResponse, backend_key, http, running_gateway
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
    ("unknown route", "POST", "/openai/deployments/gpt-4o/images/edits", "KEY", GOOD, 404, "404"),
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
    sent = len(gateway.eastus.received)
    for body in (b'{"messages": [], "temperature": NaN}', b'{"messages": [], "top_p": -Infinity}',
                 b'{"messages": [], "stream": true, "stream_options": [1]}',
                 b'{"messages": [], "stream": true, "stream_options": "yes"}'):
        response = http("POST", gateway.url + CHAT, headers={"api-key": gateway.key}, body=body)
        assert response.status == 400 and response.json()["error"]["code"] == "InvalidRequestBody", body
    assert len(gateway.eastus.received) == sent  # none of them went upstream


KEY_SPELLINGS = ["api-key", "API-Key", "api-%6Bey", "api-%256Bey", "api%252Dkey", "api-key%00", "api+key",
                 "subscription-key", "Ocp-Apim-Subscription-Key", "subscription_key", "key", "code"]


def test_query_key_is_never_forwarded_however_encoded(gateway: Gateway) -> None:
    """A key in the query is dropped in any spelling, encoded or double-encoded; other pairs arrive intact."""
    for name in KEY_SPELLINGS:
        response = http("POST", f"{gateway.url}{CHAT}&{name}={gateway.key}&note=a%3Bb%00%FF%zz",
                        headers={"api-key": gateway.key, "content-type": "application/json"}, body=GOOD)
        assert response.status == 200, (name, response.text)
        seen = gateway.eastus.received[-1]
        assert gateway.key not in json.dumps(seen.query) + seen.path, name
        assert seen.query == {"api-version": "2024-10-21", "note": "a;b\x00\ufffd%zz"}, name


QUOTA_DODGES = [
    b'{"max_tokens": 5000, "max_completion_tokens": null}',
    b'{"max_completion_tokens": 5000, "max_tokens": null}',
    b'{"max_tokens": 5000, "max_completion_tokens": 10}',
    b'{"max_tokens": 10, "max_completion_tokens": 5000}',
    b'{"max_tokens": 2000, "n": 3}',
]
BAD_CAPS = [b'{"max_tokens": 5000.0}', b'{"max_tokens": -1}', b'{"max_completion_tokens": true}',
            b'{"max_completion_tokens": "5000"}', b'{"max_tokens": 10, "n": 0}']


def test_token_caps_cannot_dodge_the_quota(gateway: Gateway) -> None:
    """The largest cap a body sets is reserved (null is not set); a cap that is not a whole number is a 400."""
    from usage._keys import Limits

    key = gateway.create_key(f"team-{uuid.uuid4().hex[:8]}", Limits(tokens_per_minute=1000))
    headers = {"api-key": key, "content-type": "application/json"}
    messages = b'"messages": [{"role": "user", "content": "hi"}], '
    for caps in QUOTA_DODGES:
        response = http("POST", gateway.url + CHAT, headers=headers, body=b"{" + messages + caps[1:])
        assert response.status == 400, (caps, response.text)
        assert response.json()["error"]["code"] == "QuotaTooSmall"
    for caps in BAD_CAPS:
        response = http("POST", gateway.url + CHAT, headers=headers, body=b"{" + messages + caps[1:])
        assert response.status == 400, (caps, response.text)
        error = response.json()["error"]
        assert error["code"] == "InvalidRequestBody" and "whole number" in error["message"]
    assert gateway.eastus.received == [] and gateway.westus.received == []
    fits = http("POST", gateway.url + CHAT, headers=headers, body=b"{" + messages + b'"max_tokens": 100}')
    assert fits.status == 200


def test_bodies_not_in_utf8_get_400_naming_the_encoding(gateway: Gateway) -> None:
    """UTF-16 and Latin-1 bodies are refused before anything is spliced into them; a UTF-8 BOM is dropped."""
    document = {"messages": [{"role": "user", "content": "café"}], "stream": True}
    headers = {"api-key": gateway.key, "content-type": "application/json"}
    text = json.dumps(document, ensure_ascii=False)
    for encoding, named in (("utf-16", "UTF-16"), ("utf-16-le", "UTF-16"), ("latin-1", "not valid UTF-8")):
        response = http("POST", gateway.url + CHAT, headers=headers, body=text.encode(encoding))
        assert response.status == 400, (encoding, response.text)
        error = response.json()["error"]
        assert error["code"] == "UnsupportedEncoding" and named in error["message"] and "UTF-8" in error["message"]
    assert gateway.eastus.received == []
    response = http("POST", gateway.url + CHAT, headers=headers, body=b"\xef\xbb\xbf" + text.encode())
    assert response.status == 200 and response.text.endswith("data: [DONE]\n\n")
    assert gateway.eastus.received[-1].body == {**document, "stream_options": {"include_usage": True}}


def send_slowly(gw: Gateway, body: bytes, *, bytes_per_second: int) -> tuple[int, RawResponse]:
    """POST ``body`` over a raw socket, ``bytes_per_second`` per second of the gateway's clock
    (0: it goes silent after its first byte; -1: not even that); the clock seconds it took, and the answer."""
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        first = 1 if bytes_per_second >= 0 else 0
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nhost: gateway\r\napi-key: {gw.key}\r\n"
                     f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body[:first])
        sent, seconds, bytes_per_second = first, 0, max(bytes_per_second, 0)
        # after each clock second, wait long enough for an answer that is due: a byte sent after the gateway
        # answered and closed would be refused with a reset, which can swallow the answer itself
        while not select.select([sock], [], [], 0.02 if seconds < 25 else 0.3)[0]:
            assert seconds < 100, "no answer"
            sock.sendall(body[sent:sent + bytes_per_second])
            sent += bytes_per_second
            gw.clock.advance(1)
            seconds += 1
        received = b""
        with contextlib.suppress(ConnectionResetError):  # the close after a 408 may come as a reset
            while chunk := sock.recv(65536):
                received += chunk
    head, _, payload = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return seconds, RawResponse(int(status_line.split()[1]), headers, payload)


@pytest.mark.parametrize("bytes_per_second", [1, 0, -1], ids=["1 byte a second", "silent", "no body at all"])
def test_slow_body_gets_408_after_the_body_read_timeout(gateway: Gateway, bytes_per_second: int) -> None:
    """A body that trickles in or stops gets 408 once BODY_READ_TIMEOUT_SECONDS pass; the gateway serves on."""
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 200}]}).encode()
    seconds, response = send_slowly(gateway, body, bytes_per_second=bytes_per_second)
    assert response.status == 408
    assert response.json()["error"]["code"] == "RequestTimeout"
    assert response.headers["connection"] == "close"
    assert seconds >= 30  # never before the limit (a few more: the clock moved before the read began)
    assert gateway.eastus.received == []
    assert http("POST", gateway.url + CHAT, headers={"api-key": gateway.key}, body=GOOD).status == 200


def test_client_gone_mid_body_is_no_gateway_failure(gateway: Gateway) -> None:
    """A client that hangs up halfway through its body is not logged as a gateway failure; serving goes on."""
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nhost: gateway\r\napi-key: {gateway.key}\r\n"
                     "content-type: application/json\r\ncontent-length: 1000\r\n\r\n{\"messages\": [".encode())
        time.sleep(0.3)  # the gateway is waiting for the rest
    time.sleep(0.5)
    assert http("POST", gateway.url + CHAT, headers={"api-key": gateway.key}, body=GOOD).status == 200
    assert not any("failed inside the gateway" in line for line in gateway.logs.lines)
    assert gateway.eastus.received[-1].body == json.loads(GOOD)  # only the whole request went upstream
    assert len(gateway.eastus.received) == 1


def test_declared_oversize_body_gets_413_before_any_byte(gateway: Gateway) -> None:
    """A Content-Length over MAX_REQUEST_BYTES is refused at once, without waiting for the body."""
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nhost: gateway\r\napi-key: {gateway.key}\r\n"
                     f"content-type: application/json\r\ncontent-length: {64 * 1024 * 1024}\r\n\r\n".encode())
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 413")
