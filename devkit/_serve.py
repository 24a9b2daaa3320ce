"""``python -m devkit serve``: serve the function app in a folder, as ``func start`` does, through the real
runtime in a worker process of its own."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import uvicorn

from devkit._config import HostConfigError, HostJson, app_settings
from devkit._host import FunctionLoadFailed, FunctionsHost
from devkit._http import JsonErrorHttpProtocol

log = logging.getLogger("devkit.host")


class _Server(uvicorn.Server):
    """uvicorn, stopping gracefully on SIGINT or SIGTERM without re-raising them afterwards, so the host
    can still stop its worker in an orderly way."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in originals.items():
                signal.signal(sig, handler)


def front_options() -> dict[str, Any]:
    """uvicorn options of the host's HTTP front: JSON errors for malformed HTTP, no WebSocket upgrades
    (answered as plain HTTP), the worker's own Server and Date headers, no access log."""
    return {"log_level": "warning", "access_log": False, "lifespan": "off", "http": JsonErrorHttpProtocol,
            "ws": "none", "server_header": False, "date_header": False}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=7071)
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


async def serve(app_dir: Path, *, host: str, port: int, graceful_seconds: float = 10.0, debug: bool = False) -> int:
    """Serve until SIGINT/SIGTERM; in-flight requests finish, then the worker is stopped. Returns the exit code."""
    try:
        settings = app_settings(app_dir)
        if debug:  # the worker forwards DEBUG records too, as the Azure worker does with this setting
            settings["PYTHON_ENABLE_DEBUG_LOGGING"] = "1"
        functions = FunctionsHost(app_dir, settings, host_json=HostJson.read(app_dir))
    except HostConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        listener = _listen(host, port)
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    with listener:
        try:
            await functions.start()
        except FunctionLoadFailed as exc:
            print(f"error: the function app in {app_dir} did not load: {exc}", file=sys.stderr)
            return 1
        return await _serve_http(functions, listener, app_dir=app_dir, graceful_seconds=graceful_seconds)


def _listen(host: str, port: int) -> socket.socket:
    """The socket, bound before the worker starts so that a port in use fails at once and clearly; it
    listens (asyncio's server calls ``listen``) only once the worker is ready."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # asyncio sets TCP_NODELAY only then
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError:
        listener.close()
        raise
    return listener


async def _serve_http(functions: FunctionsHost, listener: socket.socket, *, app_dir: Path,
                      graceful_seconds: float) -> int:
    try:
        config = uvicorn.Config(functions.http_app(), **front_options(),
                                timeout_graceful_shutdown=int(graceful_seconds))
        host, port = listener.getsockname()[:2]
        log.info("serving %s on http://%s:%d", app_dir, host, port)
        await _Server(config).serve(sockets=[listener])
    finally:
        log.info("stopping the worker")
        await functions.stop()
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m devkit") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="A local Azure Functions host around the real runtime.")
    commands = parser.add_subparsers(dest="command", required=True)
    command = commands.add_parser("serve", help="serve the function app in the current folder")
    add_arguments(command)
    command.add_argument("--app-dir", type=Path, default=Path.cwd(), help="the function app's folder (default: .)")
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    return asyncio.run(serve(args.app_dir.resolve(), host=args.host, port=args.port, debug=args.log_level == "debug"))


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("azure", "grpc", "uamqp"):  # the SDKs log every call at INFO
        logging.getLogger(noisy).setLevel(logging.WARNING)
