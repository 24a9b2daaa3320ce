"""A simulated Azure OpenAI region that speaks AOAI's wire format, for tests, benchmarks and demos.

Streams follow what AOAI sends (see the README): a first ``prompt_filter_results`` chunk with
empty ``choices``, a role chunk, content chunks with ``content_filter_results``, the
``finish_reason`` chunk, and, only with ``stream_options.include_usage``, a usage chunk with empty
``choices`` (every other chunk then carries ``"usage": null``), then ``data: [DONE]``.

The Responses API (``devkit/_sim_responses.py``): create, streamed or not, background mode, and
the by-id routes, on both path styles; a response exists only in the region that made it.
Images (``images/generations``: ``usage`` for ``gpt-image-*`` deployments) and audio
(``audio/transcriptions`` and ``translations`` take multipart forms; ``usage`` for ``gpt-4o-*``
transcriptions; ``audio/speech`` answers audio bytes, no usage).

Failures: ``429`` (with ``retry-after``/``retry-after-ms``), ``500``, ``hang`` (never answers),
``cut`` (stream broken off mid-way), ``stall`` (stream stops mid-way, connection kept), queued
per request with ``fail_next`` or set for every request with ``mode``. A prompt containing
``FILTER_ME`` is refused with AOAI's 400 ``content_filter`` error. A chat request with ``tools`` is
answered with a call of the first tool (its arguments streamed in pieces, ``finish_reason`` ``tool_calls``).

Run one: ``python -m devkit.simulator --port 8001 --region eastus``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from email.message import Message
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

from aiohttp import web

from devkit._sim_responses import ResponsesApi, Stored

log = logging.getLogger(__name__)

_WORDS = ("Hello", " from", " the", " simulated", " Azure", " OpenAI", " region", ".", " Tokens",
          " arrive", " one", " by", " one", ",", " just", " like", " the", " real", " service", "!")
_FILTER_OK = {"hate": {"filtered": False, "severity": "safe"}, "self_harm": {"filtered": False, "severity": "safe"},
              "sexual": {"filtered": False, "severity": "safe"}, "violence": {"filtered": False, "severity": "safe"}}


@dataclass(slots=True)
class Received:
    """One request as the region saw it."""

    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any  # the JSON body; for a multipart form, its text fields (a file as {"filename", "size"})
    method: str = "POST"
    raw: bytes = b""


@dataclass
class SimulatedRegion:
    """One region. Change its fields between requests to steer it; read them to check what it saw."""

    name: str = "sim"
    api_key: str | None = None
    model: str = "gpt-4o-2024-08-06"
    chunks: int = 20
    first_chunk_delay: float = 0.0
    chunk_delay: float = 0.0
    mode: str | None = None
    retry_after: str | None = "2"
    retry_after_ms: str | None = "2000"
    #: api-versions older than this answer 400 to ``stream_options``, as AOAI did in 2024.
    stream_options_since: str = "2024-09-01"
    #: the pieces of text answered (one per chunk); ``None``: ``chunks`` words of a fixed sentence
    words: tuple[str, ...] | None = None
    #: deployments that answer 400 to ``stream_options`` whatever the api-version ("on your data", say)
    stream_options_refused: set[str] = field(default_factory=set)
    #: on a 429, ``x-ratelimit-reset-tokens`` (AOAI's Responses 429s were seen with -1 or 0 and no retry-after)
    ratelimit_reset: str | None = None
    responses: ResponsesApi = field(default_factory=ResponsesApi)
    received: list[Received] = field(default_factory=list)
    streams_started: int = 0
    streams_finished: int = 0
    streams_abandoned: int = 0  # the client went away before the end
    _script: deque[str] = field(default_factory=deque)
    _runner: web.AppRunner | None = None
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    def fail_next(self, kind: str, count: int = 1) -> None:
        """Fail the next ``count`` requests with ``kind`` (429, 500, hang, cut, stall)."""
        self._script.extend([kind] * count)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for root in ("/openai/v1", "/openai"):
            app.router.add_post(root + "/responses", self._create_response)
            app.router.add_get(root + "/responses/{id}", self._retrieve_response)
            app.router.add_delete(root + "/responses/{id}", self._delete_response)
            app.router.add_post(root + "/responses/{id}/cancel", self._cancel_response)
            app.router.add_get(root + "/responses/{id}/input_items", self._input_items)
        app.router.add_post("/openai/deployments/{deployment}/{operation:.+}", self._handle)
        app.router.add_post("/openai/v1/{operation:.+}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        bound = server.sockets[0].getsockname()  # type: ignore[attr-defined]
        self.url = f"http://{host}:{bound[1]}"
        return self.url

    async def stop(self) -> None:
        self._stopping.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- wire format -----------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        return {"x-ms-region": self.name, "apim-request-id": str(uuid.uuid4()),
                "x-ratelimit-remaining-tokens": "99000", "x-ratelimit-remaining-requests": "999"}

    def _error(self, status: int, code: str, message: str, extra: dict[str, str] | None = None,
               inner: dict[str, Any] | None = None) -> web.Response:
        error: dict[str, Any] = {"code": code, "message": message}
        if inner:
            error.update(inner)
        headers = {**self._headers(), **(extra or {})}
        return web.json_response({"error": error}, status=status, headers=headers)

    def _throttled(self) -> web.Response:
        extra = {}
        if self.retry_after is not None:
            extra["retry-after"] = self.retry_after
        if self.retry_after_ms is not None:
            extra["retry-after-ms"] = self.retry_after_ms
        if self.ratelimit_reset is not None:
            extra.update({"x-ratelimit-reset-tokens": self.ratelimit_reset,
                          "x-ratelimit-reset-requests": self.ratelimit_reset,
                          "x-ratelimit-remaining-tokens": "0", "x-ratelimit-remaining-requests": "-1"})
        return self._error(429, "429", "Requests to the ChatCompletions_Create Operation under Azure OpenAI "
                           "API version 2024-10-21 have exceeded token rate limit of your current OpenAI S0 "
                           f"pricing tier. Please retry after {self.retry_after or 1} seconds.", extra)

    @staticmethod
    def prompt_tokens(body: dict[str, Any]) -> int:
        """The prompt tokens this region reports: deterministic, from the text it was sent."""
        text = json.dumps(body.get("messages") or body.get("prompt") or body.get("input") or "")
        return 7 + len(text) // 4

    def _chunk(self, base: dict[str, Any], choices: list[Any], usage_null: bool, **extra: Any) -> bytes:
        chunk = {"choices": choices, **base, **extra}
        if usage_null:
            chunk["usage"] = None
        return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"

    async def _received(self, request: web.Request) -> tuple[Any, web.Response | None]:
        """Record the request; its body, or the answer that refuses it."""
        raw = await request.read()
        body: Any = None
        refusal: web.Response | None = None
        if request.content_type == "multipart/form-data":
            body = _form_fields(request.headers["content-type"], raw)
        elif raw:
            try:
                body = json.loads(raw)
            except ValueError:
                refusal = self._error(400, "InvalidRequestBody", "The request body is not valid JSON.")
        self.received.append(Received(request.path, dict(request.query), dict(request.headers), body,
                                      method=request.method, raw=raw))
        return body, refusal

    async def _failure(self, request: web.Request) -> tuple[str | None, web.Response | None]:
        """The failure scripted for this request (by ``fail_next`` or ``mode``), and the answer it makes."""
        if self.api_key is not None:
            sent = request.headers.get("api-key") or request.headers.get("authorization", "").removeprefix("Bearer ")
            if sent != self.api_key:
                return None, self._error(401, "401", "Access denied due to invalid subscription key or wrong API "
                                         "endpoint.")
        kind = self._script.popleft() if self._script else self.mode
        if kind == "429":
            return kind, self._throttled()
        if kind == "500":
            return kind, self._error(500, "InternalServerError", "The server had an error while processing your "
                                     "request.")
        if kind == "hang":
            await self._stopping.wait()
            return kind, self._error(503, "ServiceUnavailable", "The region is shutting down.")
        return kind, None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body, refusal = await self._received(request)
        if refusal is not None:
            return refusal
        if not isinstance(body, dict):
            return self._error(400, "InvalidRequestBody", "The request body must be a JSON object.")
        operation = request.match_info["operation"]
        kind, failure = await self._failure(request)
        if failure is not None:
            return failure
        deployment = request.match_info.get("deployment") or str(body.get("model", ""))
        if operation.startswith(("images/", "audio/")):
            return self._media(operation, deployment, body)
        if "FILTER_ME" in json.dumps(body):
            return self._error(
                400, "content_filter",
                "The response was filtered due to the prompt triggering Azure OpenAI's content management policy.",
                inner={"param": "prompt", "status": 400,
                       "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
                           **_FILTER_OK, "violence": {"filtered": True, "severity": "high"}}}})
        stream = body.get("stream") is True
        options = body.get("stream_options")
        if options is not None:
            version = request.query.get("api-version", "")
            if not stream:
                return self._error(400, "invalid_request_error",
                                   "The 'stream_options' parameter is only allowed when 'stream' is enabled.")
            if (version and version[:10] < self.stream_options_since) or deployment in self.stream_options_refused:
                return self._error(400, "BadRequest", "Unrecognized request argument supplied: stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        if not stream and self.first_chunk_delay:  # a whole answer is sent when it is all generated
            await asyncio.sleep(self.first_chunk_delay)
        if operation == "embeddings":
            return self._embeddings(body)
        if stream:
            return await self._stream(request, body, operation, include_usage, kind)
        return self._complete(body, operation)

    # -- images and audio --------------------------------------------------------------------------

    def _media(self, operation: str, deployment: str, body: dict[str, Any]) -> web.Response:
        prompt = str(body.get("prompt") or body.get("input") or "")
        if operation == "audio/speech":
            return web.Response(body=b"ID3" + prompt.encode()[:64], content_type="audio/mpeg", headers=self._headers())
        if operation == "images/generations":
            n = body.get("n")
            count = n if isinstance(n, int) else 1
            document: dict[str, Any] = {"created": int(time.time()),
                                        "data": [{"b64_json": "aW1hZ2U="} for _ in range(count)]}
            if deployment.startswith("gpt-image"):
                text = 7 + len(prompt) // 4
                document["usage"] = {"input_tokens": text, "output_tokens": 272 * count,
                                     "total_tokens": text + 272 * count,
                                     "input_tokens_details": {"text_tokens": text, "image_tokens": 0}}
            return web.json_response(document, headers=self._headers())
        document = {"text": "Hello from the simulated region."}
        if operation == "audio/transcriptions" and deployment.startswith("gpt-4o"):
            audio = 10 + int(body.get("file", {}).get("size", 0)) // 1000
            document["usage"] = {"type": "tokens", "input_tokens": audio, "output_tokens": 8, "total_tokens": audio + 8,
                                 "input_token_details": {"text_tokens": 0, "audio_tokens": audio}}
        return web.json_response(document, headers=self._headers())

    # -- the Responses API ---------------------------------------------------------------------------

    def _not_found(self, response_id: str) -> web.Response:
        return self._error(404, "not_found", f"Response with id '{response_id}' not found.")

    async def _create_response(self, request: web.Request) -> web.StreamResponse:
        body, refusal = await self._received(request)
        if refusal is not None:
            return refusal
        if not isinstance(body, dict):
            return self._error(400, "InvalidRequestBody", "The request body must be a JSON object.")
        kind, failure = await self._failure(request)
        if failure is not None:
            return failure
        previous = body.get("previous_response_id")
        if previous is not None and previous not in self.responses.stored:
            return self._error(400, "previous_response_not_found",
                               f"Previous response with id '{previous}' not found.",
                               inner={"param": "previous_response_id"})
        if "FILTER_ME" in json.dumps(body):
            return self._error(400, "content_filter", "The response was filtered due to the prompt triggering "
                               "Azure OpenAI's content management policy.")
        if self.first_chunk_delay:
            await asyncio.sleep(self.first_chunk_delay)
        stored = self.responses.create(body)
        if body.get("stream") is True:
            return await self._stream_events(request, self.responses.events(stored), kind)
        if not stored.document["background"]:
            self.responses.finish(stored)
        return web.json_response(self.responses.public(stored), headers=self._headers())

    async def _stream_events(self, request: web.Request, frames: list[bytes], kind: str | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={**self._headers(), "content-type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        self.streams_started += 1
        try:
            for index, frame in enumerate(frames):
                if index and self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                if index == len(frames) // 2 and kind in ("cut", "stall"):
                    if kind == "stall":
                        await self._stopping.wait()
                    else:
                        await asyncio.sleep(0.05)
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await response.write(frame)
            await response.write_eof()
        except ConnectionError:
            self.streams_abandoned += 1
            return response
        except asyncio.CancelledError:
            self.streams_abandoned += 1
            raise
        self.streams_finished += 1
        return response

    async def _stored(self, request: web.Request) -> tuple[Stored | None, web.StreamResponse | None]:
        _, refusal = await self._received(request)
        if refusal is not None:
            return None, refusal
        _, failure = await self._failure(request)
        if failure is not None:
            return None, failure
        response_id = request.match_info["id"]
        stored = self.responses.stored.get(response_id)
        return stored, None if stored is not None else self._not_found(response_id)

    async def _retrieve_response(self, request: web.Request) -> web.StreamResponse:
        stored, answer = await self._stored(request)
        if stored is None:
            assert answer is not None
            return answer
        if request.query.get("stream") == "true":
            if not stored.events:
                return self._error(400, "invalid_request_error", "Only background responses can be streamed again.")
            after = int(request.query.get("starting_after", "-1"))
            return await self._stream_events(request, stored.events[after + 1:], None)
        return web.json_response(self.responses.retrieve(stored), headers=self._headers())

    async def _delete_response(self, request: web.Request) -> web.StreamResponse:
        stored, answer = await self._stored(request)
        if stored is None:
            assert answer is not None
            return answer
        del self.responses.stored[stored.document["id"]]
        return web.json_response({"id": stored.document["id"], "object": "response.deleted", "deleted": True},
                                 headers=self._headers())

    async def _cancel_response(self, request: web.Request) -> web.StreamResponse:
        stored, answer = await self._stored(request)
        if stored is None:
            assert answer is not None
            return answer
        if not stored.document["background"]:
            return self._error(400, "invalid_request_error", "Only background responses can be cancelled.")
        if stored.document["status"] in ("queued", "in_progress"):
            self.responses.finish(stored, "cancelled")
        return web.json_response(self.responses.public(stored), headers=self._headers())

    async def _input_items(self, request: web.Request) -> web.StreamResponse:
        stored, answer = await self._stored(request)
        if stored is None:
            assert answer is not None
            return answer
        source = stored.document.get("input")
        items = source if isinstance(source, list) else [{"role": "user", "content": source}]
        data = [{"id": f"msg_{i}", "type": "message", "status": "completed", "role": item.get("role", "user"),
                 "content": [{"type": "input_text", "text": item.get("content")}]}
                for i, item in enumerate(items) if isinstance(item, dict)]
        return web.json_response({"object": "list", "data": data, "first_id": "msg_0",
                                  "last_id": f"msg_{max(len(data) - 1, 0)}", "has_more": False},
                                 headers=self._headers())

    # -- chat and completions ------------------------------------------------------------------------

    def _usage(self, body: dict[str, Any], completion: int) -> dict[str, Any]:
        prompt = self.prompt_tokens(body)
        return {"completion_tokens": completion, "prompt_tokens": prompt, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"audio_tokens": 0, "cached_tokens": 0},
                "completion_tokens_details": {"accepted_prediction_tokens": 0, "audio_tokens": 0,
                                              "reasoning_tokens": 0, "rejected_prediction_tokens": 0}}

    def _text(self) -> list[str]:
        if self.words is not None:
            return list(self.words)
        return [_WORDS[i % len(_WORDS)] for i in range(self.chunks)]

    @staticmethod
    def tool_call(body: dict[str, Any]) -> tuple[str, str, list[str]]:
        """The call a request with ``tools`` gets: its id, the first tool's name, the arguments in pieces."""
        function = (body["tools"][0] or {}).get("function") or {}
        return "call_sim0001", str(function.get("name", "tool")), ['{"city"', ': "Par', 'is", "days', '": 3}']

    def _complete(self, body: dict[str, Any], operation: str) -> web.Response:
        words = self._text()
        text = "".join(words)
        if operation == "completions":
            choice: dict[str, Any] = {"text": text, "index": 0, "finish_reason": "stop", "logprobs": None}
            kind = "text_completion"
        else:
            choice = {"content_filter_results": _FILTER_OK, "finish_reason": "stop", "index": 0, "logprobs": None,
                      "message": {"content": text, "refusal": None, "role": "assistant"}}
            kind = "chat.completion"
        document = {"choices": [choice], "created": int(time.time()), "id": "chatcmpl-" + uuid.uuid4().hex[:24],
                    "model": self.model, "object": kind, "system_fingerprint": "fp_sim",
                    "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": _FILTER_OK}],
                    "usage": self._usage(body, len(words))}
        return web.json_response(document, headers=self._headers())

    def _embeddings(self, body: dict[str, Any]) -> web.Response:
        inputs = body.get("input")
        items = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
        prompt = self.prompt_tokens(body)
        data = [{"object": "embedding", "index": i, "embedding": [0.01 * (i + 1)] * 8} for i in range(len(items))]
        return web.json_response({"object": "list", "data": data, "model": "text-embedding-3-small",
                                  "usage": {"prompt_tokens": prompt, "total_tokens": prompt}}, headers=self._headers())

    async def _stream(self, request: web.Request, body: dict[str, Any], operation: str,
                      include_usage: bool, kind: str | None) -> web.StreamResponse:
        response = web.StreamResponse(headers={**self._headers(), "content-type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        self.streams_started += 1
        base = {"created": int(time.time()), "id": "chatcmpl-" + uuid.uuid4().hex[:24], "model": self.model,
                "object": "chat.completion.chunk" if operation != "completions" else "text_completion",
                "system_fingerprint": "fp_sim"}
        words = self._text()
        frames = [self._chunk({"created": 0, "id": "", "model": "", "object": ""}, [], include_usage,
                              prompt_filter_results=[{"prompt_index": 0, "content_filter_results": _FILTER_OK}])]
        deltas: list[dict[str, Any]]
        finish = "stop"
        if operation == "completions":
            deltas = [{"text": w, "index": 0, "finish_reason": None, "logprobs": None} for w in words]
        elif body.get("tools"):
            call_id, name, pieces = self.tool_call(body)
            first = {"index": 0, "id": call_id, "type": "function", "function": {"name": name, "arguments": ""}}
            deltas = [{"delta": {"content": None, "role": "assistant", "tool_calls": [first]}, "finish_reason": None,
                       "index": 0, "logprobs": None}]
            deltas += [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]},
                        "finish_reason": None, "index": 0, "logprobs": None} for piece in pieces]
            finish = "tool_calls"
        else:
            deltas = [{"content_filter_results": {}, "delta": {"content": "", "refusal": None, "role": "assistant"},
                       "finish_reason": None, "index": 0, "logprobs": None}]
            deltas += [{"content_filter_results": _FILTER_OK, "delta": {"content": w}, "finish_reason": None,
                        "index": 0, "logprobs": None} for w in words]
        frames += [self._chunk(base, [d], include_usage) for d in deltas]
        frames.append(self._chunk(base, [{"content_filter_results": {}, "delta": {}, "finish_reason": finish,
                                          "index": 0, "logprobs": None}], include_usage))
        if include_usage:
            frames.append(self._chunk(base, [], False, usage=self._usage(body, len(words))))
        frames.append(b"data: [DONE]\n\n")
        try:
            if self.first_chunk_delay:
                await asyncio.sleep(self.first_chunk_delay)
            for index, frame in enumerate(frames):
                if index and self.chunk_delay:
                    await asyncio.sleep(self.chunk_delay)
                if index == len(frames) // 2 and kind in ("cut", "stall"):
                    if kind == "stall":
                        await self._stopping.wait()
                    else:  # the frames sent so far arrive before the cut, as over a real network
                        await asyncio.sleep(0.05)
                    assert request.transport is not None
                    request.transport.close()
                    return response
                await response.write(frame)
            await response.write_eof()
        except ConnectionError:  # the client went away: expected, not an error of the region's
            self.streams_abandoned += 1
            return response
        except asyncio.CancelledError:
            self.streams_abandoned += 1
            raise
        self.streams_finished += 1
        return response


def _form_fields(content_type: str, raw: bytes) -> dict[str, Any]:
    """A multipart form's fields: text as text, a file as its name and size."""
    message = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + raw)
    fields: dict[str, Any] = {}
    for part in message.iter_parts() if message.is_multipart() else ():
        assert isinstance(part, Message)
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        data = payload if isinstance(payload, bytes) else b""
        if part.get_filename() is not None:
            fields[str(name)] = {"filename": part.get_filename(), "size": len(data)}
        else:
            fields[str(name)] = data.decode()
    return fields


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m devkit.simulator", description="Run a simulated AOAI region.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--region", default="sim", help="the x-ms-region it answers with")
    parser.add_argument("--api-key", default=None, help="require this api-key")
    parser.add_argument("--chunks", type=int, default=20, help="content chunks per answer")
    parser.add_argument("--chunk-delay-ms", type=float, default=20.0)
    parser.add_argument("--mode", choices=["429", "500", "hang", "cut", "stall"], default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    region = SimulatedRegion(name=args.region, api_key=args.api_key, chunks=args.chunks,
                             chunk_delay=args.chunk_delay_ms / 1000, mode=args.mode)

    async def run() -> None:
        url = await region.start(args.host, args.port)
        log.info("simulated region %s listening on %s", args.region, url)
        try:
            await asyncio.Event().wait()
        finally:
            await region.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())


if __name__ == "__main__":
    main()
