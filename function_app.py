"""Azure Functions entry point (Python v2 model): wires triggers to the gateway's plain functions.

HTTP functions take and return the ``azurefunctions-extensions-http-fastapi`` types, so streams
reach the client chunk by chunk; ``host.json`` sets ``routePrefix`` to "" so paths are AOAI's.
Nothing here does I/O at import: the runtime builds its clients on first use, in the worker's loop.
"""

import logging
import typing

import azure.functions as func
from azurefunctions.extensions.http.fastapi import Request, StreamingResponse

from gateway import (
    GatewayRuntime,
    UsagePage,
    check_health,
    check_ready,
    list_models,
    not_routed,
    proxy_request,
    setup_telemetry,
    stored_response_request,
)
from usage import AggregatorRuntime, aggregate_messages, clean_ledger

# The worker forwards every log record to the host; the Azure SDKs log each storage, Service Bus and
# token call at INFO, which would cost every request; the runtime's HTTP server (uvicorn) would write an
# access line per request (the host and Application Insights already record requests).
for _sdk in ("azure.core", "azure.identity", "azure.data.tables", "azure.servicebus", "azure.monitor"):
    logging.getLogger(_sdk).setLevel(logging.WARNING)
logging.getLogger("uvicorn.access").addFilter(lambda _record: False)  # a filter survives uvicorn's dictConfig
logging.getLogger("uvicorn.error").addFilter(lambda record: record.levelno >= logging.WARNING)  # its start-up lines

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
runtime = GatewayRuntime()
aggregator = AggregatorRuntime()
team_usage = UsagePage(runtime)


@app.route(route="openai/deployments/{deployment}/chat/completions", methods=["POST"])
async def chat_completions(req: Request) -> StreamingResponse:
    return await proxy_request(runtime, req, operation="chat/completions", v1=False)


@app.route(route="openai/deployments/{deployment}/completions", methods=["POST"])
async def completions(req: Request) -> StreamingResponse:
    return await proxy_request(runtime, req, operation="completions", v1=False)


@app.route(route="openai/deployments/{deployment}/embeddings", methods=["POST"])
async def embeddings(req: Request) -> StreamingResponse:
    return await proxy_request(runtime, req, operation="embeddings", v1=False)


@app.route(route="openai/v1/chat/completions", methods=["POST"])
async def v1_chat_completions(req: Request) -> StreamingResponse:
    return await proxy_request(runtime, req, operation="chat/completions", v1=True)


@app.route(route="openai/v1/embeddings", methods=["POST"])
async def v1_embeddings(req: Request) -> StreamingResponse:
    return await proxy_request(runtime, req, operation="embeddings", v1=True)


@app.route(route="openai/v1/models", methods=["GET"])
async def v1_models(req: Request) -> StreamingResponse:
    return await list_models(runtime, req)


# -- the Responses API: v1 (no api-version, or "preview") and /openai/responses?api-version=... --------------


@app.route(route="openai/v1/responses", methods=["POST"])
async def v1_responses(req: Request) -> StreamingResponse:
    return await proxy_request(runtime, req, operation="responses", v1=True)


@app.route(route="openai/responses", methods=["POST"])
async def responses(req: Request) -> StreamingResponse:
    return await proxy_request(runtime, req, operation="responses", v1=False)


@app.route(route="openai/v1/responses/{response_id}", methods=["GET", "DELETE"])
async def v1_response(req: Request) -> StreamingResponse:
    return await stored_response_request(runtime, req, action=None, v1=True)


@app.route(route="openai/responses/{response_id}", methods=["GET", "DELETE"])
async def response(req: Request) -> StreamingResponse:
    return await stored_response_request(runtime, req, action=None, v1=False)


@app.route(route="openai/v1/responses/{response_id}/cancel", methods=["POST"])
async def v1_response_cancel(req: Request) -> StreamingResponse:
    return await stored_response_request(runtime, req, action="cancel", v1=True)


@app.route(route="openai/responses/{response_id}/cancel", methods=["POST"])
async def response_cancel(req: Request) -> StreamingResponse:
    return await stored_response_request(runtime, req, action="cancel", v1=False)


@app.route(route="openai/v1/responses/{response_id}/input_items", methods=["GET"])
async def v1_response_input_items(req: Request) -> StreamingResponse:
    return await stored_response_request(runtime, req, action="input_items", v1=True)


@app.route(route="openai/responses/{response_id}/input_items", methods=["GET"])
async def response_input_items(req: Request) -> StreamingResponse:
    return await stored_response_request(runtime, req, action="input_items", v1=False)


# -- images and audio: the deployment in the path, or (v1) the JSON body's or the form's "model" -------------


@app.route(route="openai/deployments/{deployment}/images/generations", methods=["POST"])
async def images_generations(req: Request) -> StreamingResponse:
    return await proxy_request(runtime, req, operation="images", v1=False)


@app.route(route="openai/v1/images/generations", methods=["POST"])
async def v1_images_generations(req: Request) -> StreamingResponse:
    return await proxy_request(runtime, req, operation="images", v1=True)


@app.route(route="openai/deployments/{deployment}/audio/transcriptions", methods=["POST"])
async def audio_transcriptions(req: Request) -> StreamingResponse:
    return await proxy_request(runtime, req, operation="audio.transcriptions", v1=False)


@app.route(route="openai/v1/audio/transcriptions", methods=["POST"])
async def v1_audio_transcriptions(req: Request) -> StreamingResponse:
    return await proxy_request(runtime, req, operation="audio.transcriptions", v1=True)


@app.route(route="openai/deployments/{deployment}/audio/translations", methods=["POST"])
async def audio_translations(req: Request) -> StreamingResponse:
    return await proxy_request(runtime, req, operation="audio.translations", v1=False)


@app.route(route="openai/v1/audio/translations", methods=["POST"])
async def v1_audio_translations(req: Request) -> StreamingResponse:
    return await proxy_request(runtime, req, operation="audio.translations", v1=True)


@app.route(route="openai/deployments/{deployment}/audio/speech", methods=["POST"])
async def audio_speech(req: Request) -> StreamingResponse:
    return await proxy_request(runtime, req, operation="audio.speech", v1=False)


@app.route(route="openai/v1/audio/speech", methods=["POST"])
async def v1_audio_speech(req: Request) -> StreamingResponse:
    return await proxy_request(runtime, req, operation="audio.speech", v1=True)


@app.route(route="health", methods=["GET"])
async def health(req: Request) -> StreamingResponse:
    return await check_health(req)


@app.route(route="health/ready", methods=["GET"])
async def health_ready(req: Request) -> StreamingResponse:
    return await check_ready(runtime, req)


# -- the teams' usage page: their own key's usage, read from the usage table (no AOAI call, no quota) ----------


@app.route(route="usage", methods=["GET"])
async def usage_page(req: Request) -> StreamingResponse:
    return await team_usage.page(req)


@app.route(route="usage/data", methods=["GET"])
async def usage_data(req: Request) -> StreamingResponse:
    return await team_usage.data(req)


@app.route(route="usage/statement.csv", methods=["GET"])
async def usage_statement(req: Request) -> StreamingResponse:
    return await team_usage.statement(req)


@app.route(route="{*path}")
async def not_found(req: Request) -> StreamingResponse:
    return await not_routed(req)


# The worker accepts typing.List here and refuses the builtin list[...] (FunctionLoadError).
@app.service_bus_queue_trigger(arg_name="messages", queue_name="%USAGE_QUEUE_NAME%",
                               connection="ServiceBusConnection", cardinality="many")
async def aggregate_usage(messages: typing.List[func.ServiceBusMessage]) -> None:  # noqa: UP006
    setup_telemetry()  # once per process: an instance may count usage before it serves a request
    await aggregate_messages(aggregator, messages)


# Hourly, at minute 17 (UTC): ledger rows past LEDGER_RETENTION_DAYS can no longer stop a double count.
@app.timer_trigger(schedule="0 17 * * * *", arg_name="timer", run_on_startup=False)
async def clean_usage_ledger(timer: func.TimerRequest) -> None:
    await clean_ledger(aggregator)
