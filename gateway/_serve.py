"""``python -m gateway serve``: run ``function_app.py``'s functions locally, without Core Tools."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from gateway._exceptions import SettingsError
from gateway._host import LocalHost
from gateway._settings import load_settings
from usage._config import read_environment

log = logging.getLogger(__name__)
PROJECT = Path(__file__).resolve().parent.parent


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m gateway", description="The AOAI gateway.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve function_app.py's HTTP functions locally")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=7071)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)  # the SDKs log every storage call at INFO
    env = read_environment()
    try:
        settings = load_settings(env)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if str(PROJECT) not in sys.path:
        sys.path.insert(0, str(PROJECT))
    functions = importlib.import_module("function_app")
    runtime, aggregator = functions.runtime, functions.aggregator

    async def shutdown() -> None:
        await runtime.close()
        await aggregator.close()

    host = LocalHost(functions.app, startup=lambda: runtime.start(settings), shutdown=shutdown, env=env)
    config = uvicorn.Config(host, host=args.host, port=args.port, log_level="warning",
                            access_log=False, lifespan="on", timeout_graceful_shutdown=5)
    log.info("serving function_app.py on http://%s:%d", args.host, args.port)
    with contextlib.suppress(KeyboardInterrupt):  # uvicorn re-raises Ctrl-C after its graceful shutdown
        uvicorn.Server(config).run()
    log.info("stopped")
    return 0
