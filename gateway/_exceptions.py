"""The gateway's exceptions, in one tree.

    SettingsError (a ValueError, shared with ``usage``): a setting is missing or malformed

    GatewayError
    └── RequestError             the gateway answers the request itself, AOAI-shaped
        ├── BadRequest           400
        ├── Unauthorized         401
        ├── Forbidden            403, the key may not use this deployment (its scope)
        ├── NotFound             404
        ├── MethodNotAllowed     405
        ├── RequestTimedOut      408, the client's body did not arrive within BODY_READ_TIMEOUT_SECONDS
        ├── ClientClosedRequest  499, the client went away before its body was read (nobody gets it)
        ├── PayloadTooLarge      413
        ├── QuotaExceeded        429, the caller's own quota (tokens, requests, money)
        ├── QuotaUnavailable     503 with Retry-After, the shared quota could not be leased (QUOTA_FAIL_CLOSED)
        ├── NoBackendAvailable   429 (all cooling after throttling) or 503, with Retry-After
        ├── KeyStoreUnavailable  503 with Retry-After, the key could not be checked in time
        └── UpstreamFailed       502, every attempt failed without an HTTP answer
            └── UpstreamTimedOut 504, ... by time-outs, or the request deadline passed

Errors from aiohttp and the Azure SDKs are mapped to these at the edge (``raise ... from exc``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from usage._config import SettingsError

__all__ = [
    "BadRequest", "ClientClosedRequest", "Forbidden", "GatewayError", "KeyStoreUnavailable", "MethodNotAllowed",
    "NoBackendAvailable", "NotFound", "PayloadTooLarge", "QuotaExceeded", "QuotaUnavailable", "RequestError",
    "RequestTimedOut", "SettingsError", "Unauthorized", "UpstreamFailed", "UpstreamTimedOut", "retry_after_headers",
]


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class RequestError(GatewayError):
    """An error answered to the client as ``{"error": {"code", "message"}}``."""

    status: int = 400
    code: str = "BadRequest"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> bytes:
        return json.dumps({"error": {"code": self.code, "message": self.message}}).encode()


class BadRequest(RequestError):
    status = 400
    code = "BadRequest"


class Unauthorized(RequestError):
    status = 401
    code = "401"


class Forbidden(RequestError):
    status = 403
    code = "Forbidden"


class NotFound(RequestError):
    status = 404
    code = "404"


class MethodNotAllowed(RequestError):
    status = 405
    code = "MethodNotAllowed"


class ClientClosedRequest(RequestError):
    """The client disconnected while sending its body: no one is left to answer, nothing went upstream."""

    status = 499
    code = "ClientClosedRequest"


class RequestTimedOut(RequestError):
    """The client's body took too long; the connection is closed after the answer (RFC 9110 15.5.9)."""

    status = 408
    code = "RequestTimeout"

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"connection": "close"})


class PayloadTooLarge(RequestError):
    status = 413
    code = "RequestEntityTooLarge"


def retry_after_headers(seconds: float) -> dict[str, str]:
    """``Retry-After`` (whole seconds, rounded up) and ``retry-after-ms`` for a wait of ``seconds``."""
    seconds = max(seconds, 0.0)
    return {
        "Retry-After": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }


class QuotaExceeded(RequestError):
    status = 429
    code = "429"


class QuotaUnavailable(RequestError):
    """The key's shared quota could not be leased from Table Storage, and ``QUOTA_FAIL_CLOSED`` is set."""

    status = 503
    code = "QuotaUnavailable"

    def __init__(self, *, retry_after: float) -> None:
        super().__init__("The gateway could not check the key's quota in time (QUOTA_FAIL_CLOSED); please retry.",
                         headers=retry_after_headers(retry_after))


class NoBackendAvailable(RequestError):
    """No backend can take the request now; ``retry_after`` says when one can."""

    status = 429
    code = "429"

    def __init__(self, message: str, *, retry_after: float, throttled: bool) -> None:
        super().__init__(
            message,
            status=429 if throttled else 503,
            code="429" if throttled else "ServiceUnavailable",
            headers=retry_after_headers(retry_after),
        )
        self.retry_after = retry_after


class KeyStoreUnavailable(RequestError):
    """The subscription key could not be checked: Table Storage failed or did not answer in time."""

    status = 503
    code = "KeyStoreUnavailable"

    def __init__(self, *, retry_after: float) -> None:
        super().__init__("The gateway could not check the subscription key in time; please retry.",
                         headers=retry_after_headers(retry_after))


class UpstreamFailed(RequestError):
    status = 502
    code = "BadGateway"


class UpstreamTimedOut(UpstreamFailed):
    status = 504
    code = "GatewayTimeout"
