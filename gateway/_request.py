"""The client's request: read and checked into a ``Call``, and rewritten for a backend.

Everything here decides on what the backend will see, not on the raw text: the query string is
decoded before its names are judged and re-encoded from the pairs that pass; the body is read
as UTF-8 (RFC 8259) or refused, so the bytes the gateway splices into stay well-formed.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_from_bytes, unquote_to_bytes

from fastapi import Request
from starlette.requests import ClientDisconnect

from gateway._exceptions import BadRequest, ClientClosedRequest, PayloadTooLarge, RequestTimedOut
from gateway._quota import Reservation
from gateway._settings import BackendConfig, Settings, is_deployment_name
from gateway._timing import Timer

OPERATIONS = ("chat/completions", "completions", "embeddings")
#: Client headers passed upstream (plus ``x-stainless-*``, the openai SDK's own); nothing else.
_FORWARDED = frozenset({
    "content-type", "accept", "user-agent", "x-ms-client-request-id", "x-ms-useragent", "openai-beta",
})
_VERSION = re.compile(r"(\d{4}-\d{2}-\d{2})(-preview)?")

#: Query parameter names that carry a secret, compared as ``_name_key`` makes them: the client's
#: own key (AOAI's ``api-key``, APIM's ``subscription-key``), a Functions key (``code``), tokens.
SECRET_PARAMS = frozenset({
    "apikey", "key", "subscriptionkey", "ocpapimsubscriptionkey", "code", "authorization", "accesstoken",
})
#: A name still changing after this many rounds of percent-decoding is dropped, not judged.
_DECODE_ROUNDS = 8
_NOT_ALNUM = re.compile(r"[\W_]+")
#: The completion caps a request may set; the largest is what it may generate (per choice).
TOKEN_LIMITS = ("max_tokens", "max_completion_tokens")
_UTF8_BOM = b"\xef\xbb\xbf"


def accepts_stream_options(api_version: str | None, *, v1: bool) -> bool:
    """Whether an api-version takes ``stream_options``: 2024-09-01-preview and later, and v1."""
    if v1:
        return True
    if not api_version:
        return False
    match = _VERSION.fullmatch(api_version.strip())
    if match is None:  # "preview", "latest" and other names newer than dated versions
        return api_version.strip().isalpha()
    return match.group(1) >= "2024-09-01"


@dataclass(slots=True)
class Call:
    """A validated client request."""

    operation: str
    v1: bool
    deployment: str
    body: dict[str, Any]
    raw: bytes
    stream: bool
    query: str
    api_version: str | None
    client_usage: bool  # the client asked for include_usage itself
    add_usage: bool  # the gateway asks for it on the client's behalf
    headers: dict[str, str] = field(default_factory=dict)
    reservation: Reservation | None = None  # the key's quota reservation, settled when usage is known
    response_headers: dict[str, str] = field(default_factory=dict)  # added to whatever is answered


# -- the query string ---------------------------------------------------------------------------


def _name_key(raw: bytes) -> str | None:
    """A parameter name as any server could end up reading it: percent-decoded until it stops
    changing, NFKC-folded, letters and digits only; ``None`` if it never stops changing."""
    name = raw
    for _ in range(_DECODE_ROUNDS):
        decoded = unquote_to_bytes(name)
        if decoded == name:
            text = unicodedata.normalize("NFKC", name.decode("utf-8", "replace")).casefold()
            return _NOT_ALNUM.sub("", text)
        name = decoded
    return None


def is_secret_param(raw_name: bytes) -> bool:
    """Whether a raw (still encoded) query parameter name names a secret, however it is spelled."""
    key = _name_key(raw_name)
    return key is None or key in SECRET_PARAMS


def upstream_query(raw: bytes) -> tuple[str, str | None]:
    """The query string to send upstream, and the client's ``api-version``.

    ``raw`` is the query as received. Each ``&``-separated pair is decoded once (as a backend
    would, ``+`` as a space), dropped if its name names a secret, and re-encoded, so the backend
    reads exactly the pairs judged here whatever separators or escapes the client used.
    """
    pairs: list[str] = []
    api_version: str | None = None
    for piece in raw.split(b"&"):
        if not piece:
            continue
        name, equals, value = piece.partition(b"=")
        name = name.replace(b"+", b" ")
        if is_secret_param(name):
            continue
        name_bytes = unquote_to_bytes(name)
        value_bytes = unquote_to_bytes(value.replace(b"+", b" "))
        if api_version is None and name_bytes.lower() == b"api-version":
            api_version = value_bytes.decode("utf-8", "replace")
        encoded = quote_from_bytes(name_bytes, safe="")
        pairs.append(encoded + "=" + quote_from_bytes(value_bytes, safe="") if equals else encoded)
    return "&".join(pairs), api_version


# -- the body -----------------------------------------------------------------------------------


def _not_utf8(raw: bytes) -> str | None:
    """The encoding a JSON text is in when it is plainly not UTF-8 (a BOM, or the NUL pattern
    RFC 4627 section 3 reads the encoding from); ``None`` otherwise."""
    if raw.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "UTF-32"
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    head = raw[:4]
    if len(head) == 4 and (head[:3] == b"\x00\x00\x00" or head[1:] == b"\x00\x00\x00"):
        return "UTF-32"
    if len(head) >= 2 and (head[0] == 0 or head[1] == 0):
        return "UTF-16"
    return None


def parse_body(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """The JSON object in ``raw``, and the bytes to send on (without a UTF-8 byte order mark)."""
    encoding = _not_utf8(raw)
    if encoding is not None:
        raise BadRequest(f"The request body is {encoding}; JSON must be sent as UTF-8 (RFC 8259).",
                         code="UnsupportedEncoding")
    raw = raw.removeprefix(_UTF8_BOM)  # RFC 8259 lets a parser ignore it; a backend may not
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"The request body is not valid UTF-8 (byte {exc.start}); JSON must be sent as "
                         "UTF-8 (RFC 8259).", code="UnsupportedEncoding") from exc
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise BadRequest("The request body is not valid JSON.", code="InvalidRequestBody") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="InvalidRequestBody")
    return body, raw


def _whole(body: dict[str, Any], name: str, *, minimum: int) -> int | None:
    """``body[name]`` as a whole number of at least ``minimum``; ``None`` when absent or null."""
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BadRequest(f"'{name}' must be a whole number of at least {minimum}, not {json.dumps(value)}.",
                         code="InvalidRequestBody")
    return value


def completion_reservation(body: dict[str, Any]) -> int:
    """The completion tokens a request may use: the largest cap it sets, times ``n``; 0 without a cap.

    A cap that is null counts as not set; one that is not a whole number >= 0 (``5000.0`` and
    ``true`` included: AOAI refuses them too) is a 400, so no value can lower the reservation.
    """
    caps = [cap for name in TOKEN_LIMITS if (cap := _whole(body, name, minimum=0)) is not None]
    choices = _whole(body, "n", minimum=1) or 1
    return max(caps, default=0) * choices


async def _read_raw(request: Request, settings: Settings, timer: Timer) -> bytes:
    limit = settings.max_request_bytes
    too_large = PayloadTooLarge(f"The request body is larger than the limit of {limit} bytes.")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large
        except ValueError:
            raise BadRequest("The Content-Length header is not a number.") from None
    parts: list[bytes] = []
    size = 0
    seconds = settings.body_read_timeout
    try:
        async with timer.deadline(timer.clock() + seconds):
            async for part in request.stream():
                size += len(part)
                if size > limit:
                    raise too_large
                parts.append(part)
    except TimeoutError as exc:
        raise RequestTimedOut(f"The request body did not arrive within {seconds:g} seconds.") from exc
    except ClientDisconnect as exc:
        raise ClientClosedRequest("The client went away while sending its body.") from exc
    return b"".join(parts)


def _deployment_of(body: dict[str, Any], request: Request, *, v1: bool) -> str:
    if not v1:
        return str(request.path_params.get("deployment", ""))
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("The request body must name the deployment in 'model'.", code="MissingModel")
    if not is_deployment_name(model):
        raise BadRequest("The model (deployment) name must be 1 to 64 letters, digits, '.', '_' or '-'.",
                         code="InvalidDeploymentName")
    return model


async def read_call(request: Request, settings: Settings, timer: Timer, *, operation: str, v1: bool) -> Call:
    """Read and check the client's request; anything wrong with it raises a ``RequestError``."""
    if not v1 and not is_deployment_name(request.path_params.get("deployment", "")):
        raise BadRequest("The deployment name must be 1 to 64 letters, digits, '.', '_' or '-'.",
                         code="InvalidDeploymentName")
    body, raw = parse_body(await _read_raw(request, settings, timer))
    deployment = _deployment_of(body, request, v1=v1)
    completion_reservation(body)  # a malformed token cap is refused for every key, quota or not
    query, api_version = upstream_query(request.scope.get("query_string") or b"")
    stream = body.get("stream") is True and operation != "embeddings"
    options = body.get("stream_options")
    client_usage = isinstance(options, dict) and options.get("include_usage") is True
    headers = {
        name: value for name, value in request.headers.items()
        if name in _FORWARDED or name.startswith("x-stainless-")
    }
    return Call(
        operation=operation, v1=v1, deployment=deployment, body=body, raw=raw, stream=stream,
        query=query, api_version=api_version, client_usage=client_usage,
        add_usage=stream and not client_usage and accepts_stream_options(api_version, v1=v1),
        headers=headers,
    )


# -- rewritten for a backend --------------------------------------------------------------------


def body_for(call: Call, backend: BackendConfig, *, with_usage: bool) -> bytes:
    """The body ``backend`` gets: the client's, with its own deployment name and ``stream_options``."""
    name = backend.upstream_deployment(call.deployment)
    rename = call.v1 and name != call.body.get("model")
    if not rename and not with_usage:
        return call.raw
    if not rename and "stream_options" not in call.body:
        start = call.raw.index(b"{") + 1  # UTF-8 object: "stream" is in it, and "{" is its first byte
        return call.raw[:start] + b'"stream_options":{"include_usage":true},' + call.raw[start:]
    body = dict(call.body)
    if rename:
        body["model"] = name
    if with_usage:
        options = body.get("stream_options")
        body["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return json.dumps(body).encode()  # ASCII escapes: safe for lone surrogates the client sent


def url_for(call: Call, backend: BackendConfig) -> str:
    """The URL ``backend`` gets: its endpoint, its deployment name, the client's filtered query."""
    if call.v1:
        path = f"/openai/v1/{call.operation}"
    else:
        path = f"/openai/deployments/{backend.upstream_deployment(call.deployment)}/{call.operation}"
    return backend.endpoint + path + ("?" + call.query if call.query else "")
