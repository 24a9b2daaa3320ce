"""``python -m gateway serve``: check the gateway's settings, then serve the function app in the current
folder through the local Functions host (``devkit``, not deployed) and the real runtime."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway._exceptions import SettingsError
from gateway._settings import load_settings, unknown_price_backends
from usage._config import read_environment


def main(argv: Sequence[str] | None = None) -> int:
    from devkit._serve import add_arguments, configure_logging, serve  # noqa: PLC0415 (dev machinery, on use)

    parser = argparse.ArgumentParser(prog="python -m gateway", description="The AOAI gateway.")
    commands = parser.add_subparsers(dest="command", required=True)
    add_arguments(commands.add_parser("serve", help="serve function_app.py locally through the real runtime"))
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    app_dir = Path.cwd()
    try:
        settings = load_settings(read_environment(directory=app_dir))
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for deployment, names in unknown_price_backends(settings).items():
        print(f"warning: PRICES overrides backend(s) {', '.join(names)} for {deployment}, which AOAI_BACKENDS "
              "does not have (a typo prices their events at the deployment's own rates)", file=sys.stderr)
    if not (app_dir / "function_app.py").is_file():
        print(f"error: there is no function_app.py in {app_dir}; run this from the project folder", file=sys.stderr)
        return 2
    return asyncio.run(serve(app_dir, host=args.host, port=args.port, debug=args.log_level == "debug"))


if __name__ == "__main__":
    sys.exit(main())
