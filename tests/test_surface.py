"""The rest of the AOAI surface through the openai SDK: models, images and audio, with failover and usage."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from dataclasses import replace

import openai
import pytest

from gateway import BackendConfig
from tests.harness import Gateway, http, running_gateway

PREVIEW = "2025-04-01-preview"
AUDIO = b"RIFF" + bytes(range(256)) * 40 + b"\r\n--not-a-boundary\r\n"  # bytes a form must carry unchanged


def mapped(regions: tuple[BackendConfig, ...]) -> tuple[BackendConfig, ...]:
    east, west = regions
    return (replace(east, deployments={"gpt-image-1": "gpt-image-1", "gpt-4o-transcribe": "gpt-4o-transcribe-east",
                                       "whisper": "whisper", "tts": "tts", "gpt-4o": "gpt-4o", "chat": "gpt-4o-east"}),
            replace(west, deployments={"gpt-image-1": "gpt-image-1-west", "gpt-4o-transcribe": "gpt-4o-transcribe",
                                       "whisper": "whisper", "tts": "tts", "o3": "o3"}))


@pytest.fixture
def gw(storage: str) -> Iterator[Gateway]:
    with running_gateway(storage, backends=mapped) as running:
        yield running


def v1_client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/openai/v1", api_key=gw.key, max_retries=0)


def azure_client(gw: Gateway) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(azure_endpoint=gw.url, api_key=gw.key, api_version=PREVIEW, max_retries=0)


def test_models_lists_the_deployments_the_backends_serve(storage: str) -> None:
    """GET /openai/v1/models is the union of the backends' deployment lists; a backend without one adds nothing."""
    def one_listed(regions: tuple[BackendConfig, ...]) -> tuple[BackendConfig, ...]:
        east, west = mapped(regions)
        return east, replace(west, deployments=None)

    with running_gateway(storage, backends=one_listed) as gateway:
        models = v1_client(gateway).models.list()
        assert [m.id for m in models.data] == ["chat", "gpt-4o", "gpt-4o-transcribe", "gpt-image-1", "tts", "whisper"]
        assert all(m.object == "model" for m in models.data)
        [record] = gateway.sink.wait(1)
        assert (record.operation, record.status, record.total_tokens, record.usage_source) == ("models", 200, 0, "none")
        assert gateway.eastus.received == [] and gateway.westus.received == []
        assert http("GET", gateway.url + "/openai/v1/models").status == 401


def test_images_report_usage_and_fail_over(gw: Gateway) -> None:
    """images.generate works on both paths; gpt-image-1's usage is recorded as reported; a 500 fails over, and the
    v1 body's model becomes the backend's own name."""
    image = azure_client(gw).images.generate(model="gpt-image-1", prompt="A lighthouse")
    assert image.usage is not None and image.data
    assert gw.eastus.received[-1].path == "/openai/deployments/gpt-image-1/images/generations"
    gw.eastus.fail_next("500")
    raw = v1_client(gw).images.with_raw_response.generate(model="gpt-image-1", prompt="A lighthouse", n=2)
    assert raw.headers["x-gateway-backend"] == "westus"
    assert gw.westus.received[-1].path == "/openai/v1/images/generations"
    assert gw.westus.received[-1].body["model"] == "gpt-image-1-west"
    records = gw.sink.wait(2)
    for record, usage in zip(records, (image.usage, raw.parse().usage), strict=True):
        assert usage is not None
        assert (record.operation, record.deployment, record.usage_source) == ("images", "gpt-image-1", "reported")
        assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (
            usage.input_tokens, usage.output_tokens, usage.total_tokens)


def test_transcription_form_passes_unchanged_but_its_model(gw: Gateway) -> None:
    """A multipart transcription reaches the backend byte for byte, its model field renamed for that backend;
    gpt-4o-transcribe's usage is recorded, whisper's absence of usage is usage source none."""
    text = v1_client(gw).audio.transcriptions.create(model="gpt-4o-transcribe", file=("a.wav", io.BytesIO(AUDIO)))
    assert text.text
    sent = gw.eastus.received[-1]
    assert sent.path == "/openai/v1/audio/transcriptions"
    assert sent.body["model"] == "gpt-4o-transcribe-east" and sent.body["file"]["size"] == len(AUDIO)
    azure_client(gw).audio.translations.create(model="whisper", file=("b.wav", io.BytesIO(AUDIO)))
    assert gw.eastus.received[-1].path == "/openai/deployments/whisper/audio/translations"
    records = gw.sink.wait(2)
    assert (records[0].operation, records[0].usage_source, records[0].prompt_tokens) == (
        "audio.transcriptions", "reported", 10 + len(AUDIO) // 1000)
    assert (records[1].operation, records[1].usage_source, records[1].total_tokens) == (
        "audio.translations", "none", 0)

    boundary = "gatewayboundary"
    form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"c.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode() + AUDIO + (
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\ngpt-4o-transcribe"
            f"\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"language\"\r\n\r\nen\r\n--{boundary}--\r\n"
            ).encode()
    answer = http("POST", gw.url + "/openai/v1/audio/transcriptions", body=form,
                  headers={"api-key": gw.key, "content-type": f"multipart/form-data; boundary={boundary}"})
    assert answer.status == 200, answer.text
    assert gw.eastus.received[-1].raw == form.replace(b"\r\n\r\ngpt-4o-transcribe\r\n",
                                                       b"\r\n\r\ngpt-4o-transcribe-east\r\n")


def test_responses_model_is_renamed_for_the_backend(gw: Gateway) -> None:
    """On /openai/responses the deployment is the body's model, renamed for the backend as on the v1 path."""
    made = azure_client(gw).responses.create(model="chat", input="Hi")
    sent = gw.eastus.received[-1]
    assert (sent.path, sent.body["model"]) == ("/openai/responses", "gpt-4o-east")
    azure_client(gw).responses.retrieve(made.id)
    records = gw.sink.wait(2)
    assert [(r.operation, r.deployment) for r in records] == [("responses", "chat"), ("responses.retrieve", "chat")]


def test_speech_answers_audio_without_usage(gw: Gateway) -> None:
    """audio.speech passes the audio bytes through; no usage is reported, so the event says none."""
    audio = azure_client(gw).audio.speech.create(model="tts", voice="alloy", input="Hello there")
    assert audio.content.startswith(b"ID3")
    [record] = gw.sink.wait(1)
    assert (record.operation, record.status, record.usage_source, record.total_tokens) == (
        "audio.speech", 200, "none", 0)


def test_media_routes_refuse_what_they_cannot_route(gw: Gateway) -> None:
    """A v1 form without model is 400 MissingModel; a malformed form is 400; a deployment no backend lists, 404;
    a wrong method on a gateway path, 405 naming the right ones."""
    headers = {"api-key": gw.key, "content-type": "multipart/form-data; boundary=x"}
    no_model = b'--x\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc\r\n--x--\r\n'
    cases = [
        (http("POST", gw.url + "/openai/v1/audio/transcriptions", headers=headers, body=no_model), 400, "MissingModel"),
        (http("POST", gw.url + "/openai/v1/audio/transcriptions", headers=headers, body=b"--y\r\n"), 400,
         "InvalidRequestBody"),
        (http("POST", gw.url + "/openai/v1/images/generations", headers={"api-key": gw.key},
              body=json.dumps({"model": "dall-e-3", "prompt": "x"}).encode()), 404, "DeploymentNotFound"),
        (http("GET", gw.url + "/openai/v1/responses", headers={"api-key": gw.key}), 405, "MethodNotAllowed"),
        (http("PUT", gw.url + "/openai/responses/resp_1", headers={"api-key": gw.key}), 405, "MethodNotAllowed"),
        (http("GET", gw.url + "/openai/v1/responses/bad%20id", headers={"api-key": gw.key}), 400, "InvalidResponseId"),
        (http("POST", gw.url + "/openai/v1/completions", headers={"api-key": gw.key}, body=b"{}"), 404, "404"),
    ]
    for response, status, code in cases:
        assert (response.status, response.json()["error"]["code"]) == (status, code), response.text
    assert cases[4][0].headers["allow"] == "GET, DELETE"
    assert gw.eastus.received == [] and gw.westus.received == []
