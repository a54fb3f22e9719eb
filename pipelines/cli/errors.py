"""The one map from exceptions to exit codes, used by every command.

Usage errors exit 2 and operational failures exit 1, each with one `raybind: error: ...` line on
stderr; `RAYBIND_DEBUG=1` shows the traceback instead.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from pipelines.core.errors import OperationalError

EXIT_OK = 0
EXIT_FAILED = 1  # the environment or a job failed: cluster not up, job failed, night locked
EXIT_USAGE = 2  # the command line or a config was wrong
EXIT_INTERRUPTED = 130

EXIT_CODES: tuple[tuple[tuple[type[BaseException], ...], int], ...] = (
    ((OperationalError, TimeoutError, ConnectionError), EXIT_FAILED),
    ((ValueError, FileNotFoundError), EXIT_USAGE),  # ConfigError is a ValueError
)


def exit_code(exc: BaseException) -> int | None:
    """The exit code for an exception the CLI reports in one line, or None to let it propagate."""
    for kinds, code in EXIT_CODES:
        if isinstance(exc, kinds):
            return code
    return None


def run_guarded(handler: Callable[[], int]) -> int:
    try:
        return handler()
    except KeyboardInterrupt:
        print("raybind: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        code = exit_code(exc)
        if code is None or os.environ.get("RAYBIND_DEBUG"):
            raise
        print(f"raybind: error: {exc}", file=sys.stderr)
        return code
