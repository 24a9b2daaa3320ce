"""An OTLP/HTTP endpoint that accepts every export and keeps nothing: what the benchmark's gateway exports to.

``python bench/otlp_sink.py PORT``. It answers each POST with an empty protobuf message (a valid
``Export*ServiceResponse``), so the exporters in the gateway's worker do their whole work.
"""

from __future__ import annotations

import sys

from aiohttp import web


async def accept(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b"", content_type="application/x-protobuf")


def main() -> None:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/{signal}", accept)
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)


if __name__ == "__main__":
    main()
