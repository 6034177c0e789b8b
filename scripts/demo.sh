#!/usr/bin/env bash
# Set up a venv (if needed) and run the demo.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0 -e ".[demo]"
.venv/bin/python examples/demo.py "$@"
