"""Entra ID tokens for backends without an ``api_key``, cached and refreshed before expiry."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from azure.core.credentials import AccessToken
from azure.core.credentials_async import AsyncTokenCredential
from azure.core.exceptions import ClientAuthenticationError

from gateway._exceptions import UpstreamFailed

SCOPE = "https://cognitiveservices.azure.com/.default"


class TokenProvider:
    """One bearer token for ``SCOPE``, fetched once and renewed ``refresh_margin`` before it expires."""

    def __init__(
        self,
        credential: AsyncTokenCredential,
        *,
        wall_clock: Callable[[], float],
        refresh_margin: float = 300.0,
    ) -> None:
        self._credential = credential
        self._wall_clock = wall_clock
        self._margin = refresh_margin
        self._token: AccessToken | None = None
        self._lock = asyncio.Lock()

    def _fresh(self) -> bool:
        return self._token is not None and self._token.expires_on - self._margin > self._wall_clock()

    async def authorization(self) -> str:
        """The ``Authorization`` header value."""
        if not self._fresh():
            async with self._lock:
                if not self._fresh():
                    try:
                        self._token = await self._credential.get_token(SCOPE)
                    except ClientAuthenticationError as exc:
                        raise UpstreamFailed(
                            "The gateway could not get an Entra ID token for the backend.",
                            code="BackendAuthenticationFailed",
                        ) from exc
        assert self._token is not None
        return "Bearer " + self._token.token
