"""The test suites' worker process: ``devkit.worker`` (the real runtime) with the gateway's clock,
randomness, usage sink and credential injected through ``GatewayRuntime.configure``, from the paths and
switches the harness puts in the environment. Started by the local host instead of ``devkit.worker``."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from devkit import worker
from tests.fakes import CLOCK_START, FileSink, IssuingCredential, SharedClock


def main() -> int:
    import function_app  # the module the runtime indexes: the same object, already configured

    clock = SharedClock(Path(os.environ["TEST_CLOCK_FILE"]))
    function_app.runtime.configure(
        clock=clock,
        # the wall clock runs with real time plus whatever the test moved the shared clock by
        wall_clock=lambda: time.time() + (clock() - CLOCK_START),
        random=lambda: 0.0,  # of two backends of one priority, the first is chosen first
        sink=FileSink(Path(os.environ["TEST_USAGE_FILE"])),
        credential=IssuingCredential() if os.environ.get("TEST_ENTRA_CREDENTIAL") == "1" else None,
    )
    return worker.main()


if __name__ == "__main__":
    sys.exit(main())
