"""A bare aiohttp SSE relay: the floor a gateway's per-request CPU is compared against.

No auth, no failover, no usage: read the body, post it upstream, copy the chunks back.
``python bench/bare_relay.py PORT UPSTREAM_URL``
"""

from __future__ import annotations

import sys

import aiohttp
from aiohttp import web


async def relay(request: web.Request) -> web.StreamResponse:
    session: aiohttp.ClientSession = request.app["session"]
    body = await request.read()
    url = request.app["upstream"] + request.path_qs
    async with session.post(url, data=body, headers={"content-type": "application/json",
                                                      "api-key": request.app["key"]}) as upstream:
        response = web.StreamResponse(status=upstream.status,
                                      headers={"content-type": upstream.headers.get("content-type", "")})
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def make_app(upstream: str, key: str) -> web.Application:
    app = web.Application()
    app["upstream"], app["key"] = upstream, key

    async def session_context(app: web.Application):  # type: ignore[no-untyped-def]
        app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        yield
        await app["session"].close()

    app.cleanup_ctx.append(session_context)
    app.router.add_post("/{tail:.*}", relay)
    return app


if __name__ == "__main__":
    port, upstream, key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    web.run_app(make_app(upstream, key), host="127.0.0.1", port=port, access_log=None, print=None)
