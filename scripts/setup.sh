#!/usr/bin/env bash
# Create .venv/ in the repo and install raybind (editable) with its pinned dependencies.
# Re-running when pyproject.toml and requirements.lock are unchanged takes about a second.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "raybind needs Python 3.11 ($PY is $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 2
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv

stamp=.venv/.raybind-install-stamp
want=$(cat pyproject.toml requirements.lock | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "==> installing raybind and its pinned dependencies into .venv (first time: a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  # requirements.lock pins every transitive dependency to the set tested here.
  .venv/bin/python -m pip install -q -c requirements.lock -e ".[dev]"
  echo "$want" > "$stamp"
fi
