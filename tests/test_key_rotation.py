"""Rotating KEY_HASH_SECRET: with the old secret as KEY_HASH_SECRET_PREVIOUS, keys hashed with it keep working and
are moved to the new secret's hash as they are used; once moved, they work without the previous secret."""

from __future__ import annotations

import uuid
from typing import Any

import openai
import pytest

from tests.harness import eventually, running_gateway
from usage import KeyStore, StorageConfig, hash_key, open_table_service
from usage._keys import PARTITION
from usage._tables import KEYS_TABLE

OLD, NEW = b"the-old-secret", b"the-new-secret"
MESSAGES: Any = [{"role": "user", "content": "Say hello"}]


def test_keys_move_to_the_new_secret_as_they_are_used(storage: str) -> None:
    config = StorageConfig(connection_string=storage)
    used, unused = f"team-{uuid.uuid4().hex[:8]}", f"team-{uuid.uuid4().hex[:8]}"

    async def create(name: str) -> str:
        async with open_table_service(config) as service:
            return await KeyStore(service, secret=OLD).create(name)

    async def rows(name: str) -> tuple[str, set[str]]:
        """The name row's hash, and the key's hash rows."""
        async with open_table_service(config) as service:
            table = service.get_table_client(KEYS_TABLE)
            name_row = await table.get_entity(PARTITION, f"name-{name}")
            hashes = {str(e["RowKey"])[5:] async for e in table.query_entities(
                "PartitionKey eq @p and Name eq @n", parameters={"p": PARTITION, "n": name})}
            return str(name_row["Hash"]), hashes

    with running_gateway(storage, key_hash_secret=NEW, key_hash_previous_secret=OLD) as gw:
        used_key, unused_key = gw.loop.run(create(used)), gw.loop.run(create(unused))
        client = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=used_key, api_version="2024-10-21", max_retries=0)
        assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices
        moved = (hash_key(used_key, NEW), {hash_key(used_key, NEW)})
        eventually(lambda: gw.loop.run(rows(used)) == moved, timeout=10, message=lambda: gw.loop.run(rows(used)))
        assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices  # served from the new hash
        assert gw.loop.run(rows(unused)) == (hash_key(unused_key, OLD), {hash_key(unused_key, OLD)})
        stranger = openai.AzureOpenAI(azure_endpoint=gw.url, api_key="gw-not-a-key", api_version="2024-10-21",
                                      max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            stranger.chat.completions.create(model="gpt-4o", messages=MESSAGES)
        assert "the-old-secret" not in "\n".join(gw.logs.lines) and "the-new-secret" not in "\n".join(gw.logs.lines)

    with running_gateway(storage, key_hash_secret=NEW) as gw:  # the rotation is over
        moved_client = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=used_key, api_version="2024-10-21",
                                          max_retries=0)
        assert moved_client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices
        left_behind = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=unused_key, api_version="2024-10-21",
                                         max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            left_behind.chat.completions.create(model="gpt-4o", messages=MESSAGES)
