"""Backends without an api_key are called with an Entra ID bearer token, cached until near expiry."""

from __future__ import annotations

from dataclasses import replace

import openai

from gateway import BackendConfig
from gateway._credentials import SCOPE, TokenProvider
from tests.fakes import IssuingCredential
from tests.harness import running_gateway


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
    """The upstream sees Authorization: Bearer <Entra token>, never the client's key; one token serves all."""

    def keyless(regions: tuple[BackendConfig, ...]) -> tuple[BackendConfig, ...]:
        return tuple(replace(r, api_key=None) for r in regions)

    with running_gateway(storage, backends=keyless, entra=True) as gw:
        gw.eastus.api_key = "entra-token-1"  # the region accepts only the token the credential issued
        client = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=gw.key, api_version="2024-10-21")
        for _ in range(3):
            assert client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}]).choices
        for received in gw.eastus.received:  # a token fetched per request would be numbered 2, 3 and refused
            assert received.headers["Authorization"] == "Bearer entra-token-1"
            assert "api-key" not in {h.lower() for h in received.headers}
        assert len(gw.eastus.received) == 3
        assert not any("entra-token" in line for line in gw.logs.lines)
