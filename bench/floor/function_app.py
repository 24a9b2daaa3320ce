"""The platform floor for the benchmark: a function app that only relays a stream (one streaming HTTP
function, one shared aiohttp session, nothing else), served by the same local host as the gateway.

Settings: ``FLOOR_UPSTREAM`` (the region's URL) and ``FLOOR_API_KEY``.
"""

import os
from collections.abc import AsyncIterator

import aiohttp
import azure.functions as func
from azurefunctions.extensions.http.fastapi import Request, StreamingResponse

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)
_sessions: list[aiohttp.ClientSession] = []  # made on first use, in the worker's loop


@app.route(route="openai/deployments/{deployment}/chat/completions", methods=["POST"])
async def relay(req: Request) -> StreamingResponse:
    if not _sessions:
        _sessions.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False))
    body = await req.body()
    upstream = await _sessions[0].post(os.environ["FLOOR_UPSTREAM"] + req.url.path + "?" + req.url.query, data=body,
                                       headers={"content-type": "application/json",
                                                "api-key": os.environ["FLOOR_API_KEY"]})

    async def chunks() -> AsyncIterator[bytes]:
        try:
            async for chunk in upstream.content.iter_any():
                yield chunk
        finally:
            upstream.release()

    return StreamingResponse(chunks(), status_code=upstream.status,
                             media_type=upstream.headers.get("content-type", "text/event-stream"))
