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

from gateway._endpoints import Endpoint
from gateway._exceptions import BadRequest, ClientClosedRequest, PayloadTooLarge, RequestTimedOut
from gateway._multipart import Form, boundary_of, parse_form
from gateway._quota import Reservation
from gateway._settings import BackendConfig, Settings, is_deployment_name
from gateway._timing import Timer

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
TOKEN_LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
#: A stored response's id: what AOAI issues (``resp_`` and hex), kept to characters safe in a path and a table key.
RESPONSE_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")
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

    endpoint: Endpoint
    deployment: str  # for a call on a stored response: the one it was made with, once known
    body: dict[str, Any]  # the JSON body; {} for a form or no body
    raw: bytes
    stream: bool
    query: str
    api_version: str | None
    client_usage: bool  # the client asked for include_usage itself
    add_usage: bool  # the gateway asks for it on the client's behalf
    headers: dict[str, str] = field(default_factory=dict)
    reservation: Reservation | None = None  # the key's quota reservation, settled when usage is known
    response_headers: dict[str, str] = field(default_factory=dict)  # added to whatever is answered
    form: Form | None = None  # a multipart body
    response_id: str | None = None  # the stored response a call by id is on
    pinned: str | None = None  # the only backend this call may go to: the one holding its stored response
    owner: str | None = None  # the key that made that stored response

    @property
    def operation(self) -> str:
        return self.endpoint.operation

    @property
    def v1(self) -> bool:
        return self.endpoint.v1

    @property
    def model_in_body(self) -> bool:
        """Whether the deployment is named by the body's ``model`` (v1 and Responses API paths)."""
        return not self.endpoint.deployment_in_path and not self.endpoint.stored


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
        body = json.loads(text, parse_constant=_not_json)
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the parser goes
        raise BadRequest("The request body is not valid JSON.", code="InvalidRequestBody") from None
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.", code="InvalidRequestBody")
    return body, raw


def _not_json(constant: str) -> Any:
    """``NaN``, ``Infinity`` and ``-Infinity``: Python's parser takes them, RFC 8259 (and AOAI) does not."""
    raise ValueError(f"{constant} is not JSON")


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


def _checked_name(model: object) -> str:
    if not isinstance(model, str) or not model:
        raise BadRequest("The request body must name the deployment in 'model'.", code="MissingModel")
    if not is_deployment_name(model):
        raise BadRequest("The model (deployment) name must be 1 to 64 letters, digits, '.', '_' or '-'.",
                         code="InvalidDeploymentName")
    return model


def path_deployment(request: Request) -> str | None:
    """The deployment named in the path, if it is a plain name."""
    name = str(request.path_params.get("deployment", ""))
    return name if is_deployment_name(name) else None


def _headers_of(request: Request) -> dict[str, str]:
    return {name: value for name, value in request.headers.items()
            if name in _FORWARDED or name.startswith("x-stainless-")}


async def read_call(request: Request, settings: Settings, timer: Timer, *, endpoint: Endpoint) -> Call:
    """Read and check the client's request; anything wrong with it raises a ``RequestError``."""
    if endpoint.stored:
        return await _read_stored(request, settings, timer, endpoint=endpoint)
    if endpoint.deployment_in_path and path_deployment(request) is None:
        raise BadRequest("The deployment name must be 1 to 64 letters, digits, '.', '_' or '-'.",
                         code="InvalidDeploymentName")
    raw = await _read_raw(request, settings, timer)
    boundary = boundary_of(request.headers.get("content-type", "")) if endpoint.form else None
    form: Form | None = None
    if boundary is not None:
        form = parse_form(raw, boundary)
        body: dict[str, Any] = {}
        model: object = form.value("model")
        stream = form.value("stream") == "true"
    else:
        body, raw = parse_body(raw)
        model = body.get("model")
        stream = body.get("stream") is True and endpoint.operation != "embeddings"
    deployment = str(request.path_params["deployment"]) if endpoint.deployment_in_path else _checked_name(model)
    completion_reservation(body)  # a malformed token cap is refused for every key, quota or not
    query, api_version = upstream_query(request.scope.get("query_string") or b"")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object, like {\"include_usage\": true}.",
                         code="InvalidRequestBody")
    client_usage = isinstance(options, dict) and options.get("include_usage") is True
    add_usage = (endpoint.stream_options and stream and not client_usage
                 and accepts_stream_options(api_version, v1=endpoint.v1))
    return Call(
        endpoint=endpoint, deployment=deployment, body=body, raw=raw, stream=stream, query=query,
        api_version=api_version, client_usage=client_usage, add_usage=add_usage, headers=_headers_of(request),
        form=form,
    )


async def _read_stored(request: Request, settings: Settings, timer: Timer, *, endpoint: Endpoint) -> Call:
    """A call on a stored response: its id from the path; a body (cancel's, if any) passed on as it is."""
    response_id = str(request.path_params.get("response_id", ""))
    if RESPONSE_ID.fullmatch(response_id) is None:
        raise BadRequest("The response id must be 1 to 128 letters, digits, '_' or '-'.", code="InvalidResponseId")
    raw = await _read_raw(request, settings, timer) if endpoint.method == "POST" else b""
    query, api_version = upstream_query(request.scope.get("query_string") or b"")
    stream = endpoint.operation == "responses.retrieve" and request.query_params.get("stream") == "true"
    return Call(
        endpoint=endpoint, deployment="", body={}, raw=raw, stream=stream, query=query, api_version=api_version,
        client_usage=False, add_usage=False, headers=_headers_of(request), response_id=response_id,
    )


# -- rewritten for a backend --------------------------------------------------------------------


def body_for(call: Call, backend: BackendConfig, *, with_usage: bool) -> bytes:
    """The body ``backend`` gets: the client's, with its own deployment name and ``stream_options``."""
    if call.endpoint.stored:
        return call.raw
    name = backend.upstream_deployment(call.deployment)
    if call.form is not None:
        return call.form.replaced("model", name) if call.model_in_body and name != call.deployment else call.raw
    rename = call.model_in_body and name != call.body.get("model")
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
    endpoint = call.endpoint
    path = endpoint.path.replace("{id}", call.response_id or "")
    if endpoint.deployment_in_path:
        path = f"/openai/deployments/{backend.upstream_deployment(call.deployment)}/{path}"
    else:
        path = ("/openai/v1/" if endpoint.v1 else "/openai/") + path
    return backend.endpoint + path + ("?" + call.query if call.query else "")
