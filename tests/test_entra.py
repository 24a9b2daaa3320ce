"""Backends without an api_key are called with an Entra ID bearer token, cached until near expiry."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

import openai

from gateway import BackendConfig
from gateway._credentials import SCOPE, TokenProvider
from tests.harness import running_gateway


class IssuingCredential:
    """Stands in for DefaultAzureCredential (no Entra ID here): issues numbered tokens."""

    def __init__(self, lifetime: float = 3600.0, now: Any = time.time) -> None:
        self.scopes: list[tuple[str, ...]] = []
        self.lifetime = lifetime
        self.now = now

    async def get_token(self, *scopes: str, **_: Any) -> Any:
        from azure.core.credentials import AccessToken

        self.scopes.append(scopes)
        return AccessToken(f"entra-token-{len(self.scopes)}", int(self.now() + self.lifetime))

    async def close(self) -> None:
        return None

    async def __aenter__(self) -> IssuingCredential:
        return self

    async def __aexit__(self, *_: object) -> None:
        return None


async def test_token_is_cached_and_renewed_before_expiry() -> None:
    """One token serves until five minutes before it expires; then a new one is fetched."""
    wall = [1_000_000.0]
    credential = IssuingCredential(lifetime=3600, now=lambda: wall[0])
    provider = TokenProvider(credential, wall_clock=lambda: wall[0])
    assert await provider.authorization() == "Bearer entra-token-1"
    wall[0] += 3200
    assert await provider.authorization() == "Bearer entra-token-1"
    wall[0] += 150  # inside the 300 s margin
    assert await provider.authorization() == "Bearer entra-token-2"
    assert credential.scopes == [(SCOPE,), (SCOPE,)]


def test_backend_without_api_key_gets_a_bearer_token(storage: str) -> None:
    """The upstream sees Authorization: Bearer <Entra token>, never the client's key."""
    credential = IssuingCredential()

    def keyless(regions: tuple[BackendConfig, ...]) -> tuple[BackendConfig, ...]:
        return tuple(replace(r, api_key=None) for r in regions)

    with running_gateway(storage, backends=keyless, credential=credential) as gw:
        gw.eastus.api_key = "entra-token-1"  # the region accepts only the token the credential issued
        client = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=gw.key, api_version="2024-10-21")
        for _ in range(3):
            assert client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]).choices
        headers = gw.eastus.received[-1].headers
        assert headers["Authorization"] == "Bearer entra-token-1" and "api-key" not in {h.lower() for h in headers}
        assert credential.scopes == [(SCOPE,)]
        assert not any("entra-token" in line for line in gw.logs.lines)
