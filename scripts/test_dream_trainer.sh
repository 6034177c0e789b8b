#!/usr/bin/env bash
# The Dream Trainer integration tests, with the real dream-trainer package, in a venv of their
# own (.venv-dream-trainer): dream-trainer's metrics and wandb extras pull in ~60 packages
# (wandb, torchmetrics, pydantic, opentelemetry, ...), more than a minute to install on a cold
# machine, so the main test venv does not carry them. .ci/run calls this after scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-dream-trainer
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
# torch is pinned (its CPU wheel is on local disk here); dream-trainer 0.3.0 accepts it.
"$venv/bin/python" -m pip install -q --disable-pip-version-check torch==2.13.0 -e . "pytest>=8" "hypothesis>=6.100" \
  "dream-trainer[metrics,wandb]==0.3.0"
CKPTPROTO_DREAM_TRAINER=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider \
  tests/test_dream_trainer.py "$@"
