"""User-facing errors and the wrapper every command-line entry point runs under."""
from __future__ import annotations

import sys
from typing import Callable


class UserError(ValueError):
    """A problem with what the user asked for (bad config, missing shard...): message, exit 2."""


class FatalError(RuntimeError):
    """A failure of the environment rather than of the input (a stalled file system...):
    message, exit 1."""


def run_cli(main: Callable[[], int | None]) -> None:
    """Run ``main``; a UserError becomes ``error: <message>`` on stderr and exit code 2, a
    FatalError the same message and exit code 1."""
    try:
        code = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)
    except FatalError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
