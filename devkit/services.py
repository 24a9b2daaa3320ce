"""Local stand-ins for the services the gateway uses, for tests and benchmarks: free ports and Azurite."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
AZURITE_ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, *, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def azurite_main(service: str = "table") -> Path:
    """Azurite's ``table`` (or ``blob``) server script, installed by scripts/setup.sh into .azurite/."""
    root = Path(os.environ.get("AZURITE_DIR", PROJECT / ".azurite"))
    path = root / f"node_modules/azurite/dist/src/{service}/main.js"
    if not path.is_file():
        raise RuntimeError(f"Azurite is not installed at {path}; run scripts/setup.sh")
    return path


@contextmanager
def azurite() -> Iterator[str]:
    """Fresh in-memory Azurite table and blob servers; yields one connection string naming both.

    Both skip Azurite's API-version check: the SDKs pinned here speak versions newer than Azurite 3.35.0 knows.
    """
    node = shutil.which("node") or "node"
    ports = {"table": free_port(), "blob": free_port()}
    processes = [subprocess.Popen(
        [node, str(azurite_main(service)), f"--{service}Host", "127.0.0.1", f"--{service}Port", str(port),
         "--inMemoryPersistence", "--disableTelemetry", "--skipApiVersionCheck"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    ) for service, port in ports.items()]
    try:
        for port in ports.values():
            wait_for_port(port)
        yield (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_ACCOUNT_KEY};"
               f"TableEndpoint=http://127.0.0.1:{ports['table']}/devstoreaccount1;"
               f"BlobEndpoint=http://127.0.0.1:{ports['blob']}/devstoreaccount1;")
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)
