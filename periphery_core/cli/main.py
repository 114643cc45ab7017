"""`periphery`: every step headless, so a plan made in the app runs in a script.

Exit codes: 0 success, 1 a check failed (verify found a difference), 2 bad input. Errors are one
line on stderr; set PERIPHERY_DEBUG=1 to see a traceback for unexpected failures.

Each subcommand module registers its commands on `common.cli` when imported; this module imports
them all, so `periphery` (and `python -m periphery_core.cli.main`) sees every command.
"""

from __future__ import annotations

from periphery_core.cli import (  # noqa: F401  (register commands)
    cluster,
    generate,
    partition,
    quantize,
    run,
    serve,
)
from periphery_core.cli.common import cli, run_click


def main() -> None:
    """The `periphery` entry point."""
    run_click(cli, "periphery")


if __name__ == "__main__":
    main()
