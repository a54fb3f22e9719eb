"""Error kinds the CLI maps to exit codes (`pipelines/cli/errors.py`).

Usage errors (a bad config value, a missing file) are `ValueError`s such as `ConfigError`; an
`OperationalError` is something that went wrong outside the user's input: the cluster is not up,
a submitted job failed, another night holds the lock.
"""

from __future__ import annotations


class OperationalError(RuntimeError):
    """A failure of the environment or of a job, not of the command line; exits 1 with one line."""
