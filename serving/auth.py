"""Bearer-token auth for every /v1/* route: the token comes from a file or the environment, and
the comparison is constant-time (hmac.compare_digest), so response timing leaks nothing about it."""

from __future__ import annotations

import hmac
import os
import stat
from pathlib import Path

from serving.errors import ApiError

MIN_TOKEN_CHARS = 16  # refuse guessable tokens at start-up rather than serve behind one


class TokenError(RuntimeError):
    """No usable token: the gateway refuses to start (fail closed, never serve unauthenticated)."""


class TokenFileModeError(TokenError, ValueError):
    """The token file is open to other users: a usage error, which the CLI reports in one line."""


def check_token_file(path: Path) -> None:
    """Refuse a token file that group or others can open: anyone on the machine could use the token."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # reading it reports the problem
    if mode & 0o077:
        raise TokenFileModeError(f"token file {path} is open to group or others (mode "
                                 f"{stat.S_IMODE(mode):04o}); run `chmod 600 {path}`")


def load_token(token_file: str, token_env: str) -> str:
    """The token from `token_file` when given, else from `$token_env`."""
    if token_file:
        path = Path(token_file).expanduser()
        check_token_file(path)
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise TokenError(f"gateway.token_file: cannot read {path}: {exc}") from None
        source = f"token file {path}"
    else:
        token = os.environ.get(token_env, "").strip()
        source = f"${token_env}"
    if not token:
        raise TokenError(f"no serving token: set {source} (or gateway.token_file) to a secret of at "
                         f"least {MIN_TOKEN_CHARS} characters, e.g. `python -c 'import secrets; "
                         f"print(secrets.token_urlsafe(32))'`")
    if len(token) < MIN_TOKEN_CHARS:
        raise TokenError(f"the token from {source} has {len(token)} characters; use at least {MIN_TOKEN_CHARS}")
    return token


def check_bearer(header: str | None, token: str) -> None:
    """Raise a 401 ApiError unless `header` is `Bearer <token>`."""
    challenge = {"WWW-Authenticate": 'Bearer realm="raybind"'}
    if not header:
        raise ApiError(401, "unauthorized", "missing Authorization: Bearer <token> header",
                       "Authorization", challenge)
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise ApiError(401, "unauthorized", "Authorization must be 'Bearer <token>'", "Authorization", challenge)
    if not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise ApiError(401, "unauthorized", "invalid token", "Authorization", challenge)
