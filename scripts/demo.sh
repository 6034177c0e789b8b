#!/usr/bin/env bash
# Set up a venv (if needed) and run the demo; its checkpoints stay in ./demo-checkpoints.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_venv.sh
ensure_venv demo
echo "==> running examples/demo.py"
.venv/bin/python examples/demo.py "$@"
