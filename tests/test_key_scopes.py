"""Key scopes (``keys create --deployments a,b``): a key calls only its deployments, on every route, however the
deployment is spelled; anything else is a 403 that names the deployment and reaches no backend."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import openai
import pytest

from gateway._auth import check_scope
from gateway._exceptions import Forbidden
from gateway._settings import BackendConfig
from tests.harness import Gateway, http, running_gateway
from usage import KeyRecord

MESSAGES: Any = [{"role": "user", "content": "Say hello"}]
PREVIEW = "2025-04-01-preview"
_EPOCH = datetime(2026, 1, 1, tzinfo=UTC)
SERVED = {"gpt-4o": "gpt-4o", "gpt-35": "gpt-35", "embed": "embed"}


def make_key(gw: Gateway, deployments: frozenset[str] | None) -> tuple[str, str]:
    name = f"team-{uuid.uuid4().hex[:10]}"
    return name, gw.create_key(name, deployments=deployments)


def with_deployments(backends: tuple[BackendConfig, ...]) -> tuple[BackendConfig, ...]:
    return tuple(replace(b, deployments=SERVED) for b in backends)


def refused(error: openai.APIStatusError, deployment: str, key: str) -> None:
    """A 403 in AOAI's error shape, naming the deployment and never the key."""
    assert error.status_code == 403
    body = error.response.json()
    assert body["error"]["code"] == "DeploymentNotAllowed"
    assert f"'{deployment}'" in body["error"]["message"] and key not in error.response.text


def sent(gw: Gateway) -> int:
    return sum(len(region.received) for region in gw.regions)


def test_a_scoped_key_calls_only_its_deployments_on_every_route(storage: str) -> None:
    with running_gateway(storage, backends=with_deployments) as gw:
        name, key = make_key(gw, frozenset({"gpt-4o", "embed"}))
        azure = openai.AzureOpenAI(azure_endpoint=gw.url, api_key=key, api_version=PREVIEW, max_retries=0)
        v1 = openai.OpenAI(base_url=gw.url + "/openai/v1", api_key=key, max_retries=0)
        assert azure.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices
        assert v1.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices
        assert azure.embeddings.create(model="embed", input="hello").data
        assert v1.responses.create(model="gpt-4o", input="hello").output_text
        assert azure.responses.create(model="gpt-4o", input="hello").output_text
        before = sent(gw)

        calls: list[Callable[[], object]] = [
            lambda: azure.chat.completions.create(model="gpt-35", messages=MESSAGES),  # deployment in the path
            lambda: azure.chat.completions.create(model="gpt-35", messages=MESSAGES, stream=True),
            lambda: azure.embeddings.create(model="gpt-35", input="hello"),
            lambda: azure.images.generate(model="gpt-35", prompt="a cat"),
            lambda: v1.chat.completions.create(model="gpt-35", messages=MESSAGES),  # deployment in the body
            lambda: v1.embeddings.create(model="gpt-35", input="hello"),
            lambda: v1.responses.create(model="gpt-35", input="hello"),  # /openai/v1/responses
            lambda: azure.responses.create(model="gpt-35", input="hello"),  # /openai/responses
        ]
        for call in calls:
            with pytest.raises(openai.PermissionDeniedError) as caught:
                call()
            refused(caught.value, "gpt-35", key)
        assert sent(gw) == before  # nothing refused went upstream

        records = gw.sink.wait(5 + len(calls))
        mine = [r for r in records if r.key_name == name]
        assert sorted(r.status for r in mine) == [200] * 5 + [403] * len(calls)
        assert {r.deployment for r in mine if r.status == 403} == {"gpt-35"}

        listed = v1.models.list()
        assert [m.id for m in listed.data] == ["embed", "gpt-4o"]  # only what the key may call
        unscoped = openai.OpenAI(base_url=gw.url + "/openai/v1", api_key=gw.key, max_retries=0)
        assert [m.id for m in unscoped.models.list().data] == ["embed", "gpt-35", "gpt-4o"]
        assert unscoped.chat.completions.create(model="gpt-35", messages=MESSAGES).choices


def test_other_spellings_of_a_deployment_do_not_pass_the_scope(gateway: Gateway) -> None:
    """Percent-encoding reaches the deployment it decodes to, and is judged as it; another case is another name."""
    _, key = make_key(gateway, frozenset({"gpt-4o"}))
    headers = {"api-key": key, "content-type": "application/json"}
    body = json.dumps({"messages": MESSAGES}).encode()

    def chat(path_name: str) -> int:
        url = f"{gateway.url}/openai/deployments/{path_name}/chat/completions?api-version={PREVIEW}"
        return http("POST", url, headers=headers, body=body).status

    assert chat("%67pt-4o") == 200  # "gpt-4o", encoded: the deployment the key may call
    before = sent(gateway)
    statuses = {spelling: chat(spelling) for spelling in ("%67pt-35", "gpt%2D35", "GPT-4o", "Gpt-4O", "gpt-4o.",
                                                          "gpt-4o%20")}
    assert statuses == {"%67pt-35": 403, "gpt%2D35": 403, "GPT-4o": 403, "Gpt-4O": 403, "gpt-4o.": 403,
                        "gpt-4o%20": 400}  # not a deployment name at all
    assert sent(gateway) == before
    answer = http("POST", f"{gateway.url}/openai/deployments/%67pt-35/chat/completions?api-version={PREVIEW}",
                  headers=headers, body=body)
    assert answer.status == 403 and "'gpt-35'" in answer.json()["error"]["message"]

    v1 = json.dumps({"model": "GPT-4o", "messages": MESSAGES}).encode()
    answer = http("POST", f"{gateway.url}/openai/v1/chat/completions", headers=headers, body=v1)
    assert answer.status == 403 and answer.json()["error"]["code"] == "DeploymentNotAllowed"
    escaped = b'{"model": "gpt-\\u0033\\u0035", "messages": [{"role": "user", "content": "hi"}]}'
    answer = http("POST", f"{gateway.url}/openai/v1/chat/completions", headers=headers, body=escaped)
    assert answer.status == 403 and "'gpt-35'" in answer.json()["error"]["message"]
    assert sent(gateway) == before


def test_a_stored_response_is_reached_only_by_keys_scoped_to_the_deployment_that_made_it(gateway: Gateway) -> None:
    _, maker = make_key(gateway, frozenset({"gpt-4o"}))
    _, other = make_key(gateway, frozenset({"gpt-35"}))
    made = openai.OpenAI(base_url=gateway.url + "/openai/v1", api_key=maker, max_retries=0).responses.create(
        model="gpt-4o", input="hello")
    for client in (openai.OpenAI(base_url=gateway.url + "/openai/v1", api_key=maker, max_retries=0),
                   openai.OpenAI(base_url=gateway.url + "/openai/v1", api_key=gateway.key, max_retries=0)):
        assert client.responses.retrieve(made.id).id == made.id
    before = sent(gateway)
    outsider = openai.AzureOpenAI(azure_endpoint=gateway.url, api_key=other, api_version=PREVIEW, max_retries=0)
    stored: list[Callable[[], object]] = [
        lambda: outsider.responses.retrieve(made.id), lambda: outsider.responses.delete(made.id),
        lambda: outsider.responses.cancel(made.id), lambda: outsider.responses.input_items.list(made.id)]
    for call in stored:
        with pytest.raises(openai.PermissionDeniedError) as caught:
            call()
        refused(caught.value, "gpt-4o", other)
        assert made.id in caught.value.response.json()["error"]["message"]
    assert sent(gateway) == before
    # naming it as the previous response of a call on its own deployment is that deployment's business
    follow = openai.OpenAI(base_url=gateway.url + "/openai/v1", api_key=other, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        follow.responses.create(model="gpt-4o", input="more", previous_response_id=made.id)
    with pytest.raises(openai.PermissionDeniedError):  # refused before any backend is asked where it lives
        follow.responses.create(model="gpt-4o", input="more", previous_response_id="resp_nobody_knows")
    assert sent(gateway) == before


def test_a_scoped_key_is_refused_a_stored_response_whose_deployment_is_unknown() -> None:
    scoped = KeyRecord("team", True, created_at=_EPOCH, deployments=frozenset({"gpt-4o"}))
    with pytest.raises(Forbidden) as caught:
        check_scope(scoped, "-", response_id="resp_1")
    assert caught.value.status == 403 and "resp_1" in caught.value.message
    check_scope(replace(scoped, deployments=None), "-", response_id="resp_1")  # an unscoped key is not limited
    check_scope(scoped, "gpt-4o", response_id="resp_1")
