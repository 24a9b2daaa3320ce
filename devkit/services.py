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


def azurite_main() -> Path:
    """Azurite's table server script, installed by scripts/setup.sh into .azurite/."""
    path = Path(os.environ.get("AZURITE_DIR", PROJECT / ".azurite")) / "node_modules/azurite/dist/src/table/main.js"
    if not path.is_file():
        raise RuntimeError(f"Azurite is not installed at {path}; run scripts/setup.sh")
    return path


@contextmanager
def azurite() -> Iterator[str]:
    """A fresh in-memory Azurite table server; yields its connection string."""
    port = free_port()
    node = shutil.which("node") or "node"
    process = subprocess.Popen(
        [node, str(azurite_main()), "--tableHost", "127.0.0.1", "--tablePort", str(port),
         "--inMemoryPersistence", "--disableTelemetry", "--skipApiVersionCheck"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        yield (f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={AZURITE_ACCOUNT_KEY};"
               f"TableEndpoint=http://127.0.0.1:{port}/devstoreaccount1;")
    finally:
        process.terminate()
        process.wait(timeout=10)
