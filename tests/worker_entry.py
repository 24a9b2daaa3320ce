"""The test suites' worker process: ``devkit.worker`` (the real runtime) with the gateway's clock,
randomness, usage sink and credential injected through ``GatewayRuntime.configure``, from the paths and
switches the harness puts in the environment. Started by the local host instead of ``devkit.worker``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from devkit import worker
from tests.fakes import FileSink, IssuingCredential, SharedClock


def main() -> int:
    import function_app  # the module the runtime indexes: the same object, already configured

    function_app.runtime.configure(
        clock=SharedClock(Path(os.environ["TEST_CLOCK_FILE"])),
        random=lambda: 0.0,  # of two backends of one priority, the first is chosen first
        sink=FileSink(Path(os.environ["TEST_USAGE_FILE"])),
        credential=IssuingCredential() if os.environ.get("TEST_ENTRA_CREDENTIAL") == "1" else None,
    )
    return worker.main()


if __name__ == "__main__":
    sys.exit(main())
