#!/usr/bin/env bash
# Set up a venv (if needed) and run every quality gate, then the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
ensure_venv dev
echo "==> ruff check"
.venv/bin/python -m ruff check .
echo "==> ruff format --check"
.venv/bin/python -m ruff format --check .
echo "==> mypy --strict ckptproto"
.venv/bin/python -m mypy --strict ckptproto
echo "==> pytest"
set +e
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests" >&2
  exit 1
fi
exit "$status"
