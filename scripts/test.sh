#!/usr/bin/env bash
# Set up a venv (if needed) and run every quality gate, then the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# torch is pinned for development: that CPU wheel is on local disk here; the package itself
# accepts torch>=2.3.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -e ".[dev]"
.venv/bin/python -m ruff check .
.venv/bin/python -m ruff format --check .
.venv/bin/python -m mypy --strict ckptproto
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$status"
