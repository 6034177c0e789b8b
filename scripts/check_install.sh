#!/usr/bin/env bash
# Install ckptproto as a user would, into a fresh venv outside the repository, and try it:
# a wheel is built, installed with the given extras (default: torch), then `ckptproto
# --version`, a save from Python and `ckptproto ls`/`verify` run from that venv's PATH.
# Prints the time each phase took.   bash scripts/check_install.sh [EXTRAS]   ('' : no extra)
set -euo pipefail
cd "$(dirname "$0")/.."
extras=${1-torch}
work=$(mktemp -d /tmp/ckptproto-install.XXXXXX)
trap 'rm -rf "$work"' EXIT
phase() { echo "==> $1 ($((SECONDS - started)) s so far)"; }
started=$SECONDS
phase "python3 -m venv $work/venv"
python3 -m venv "$work/venv"
phase "pip wheel --no-deps . -w $work/dist"
"$work/venv/bin/python" -m pip wheel --disable-pip-version-check --no-deps . -w "$work/dist"
wheel=$(ls "$work"/dist/ckptproto-*.whl)
spec=$wheel
if [ -n "$extras" ]; then
  spec="$wheel[$extras]"
fi
pins=()
if [[ ",$extras," == *,torch,* || ",$extras," == *,all,* || ",$extras," == *,torchdata,* || ",$extras," == *,lightning,* ]]; then
  pins=(torch==2.13.0)  # the CPU wheel on local disk here; the package accepts torch>=2.3
fi
phase "pip install $(basename "$spec") ${pins[*]}"
"$work/venv/bin/python" -m pip install --disable-pip-version-check "$spec" "${pins[@]}"
phase "first steps"
export PATH="$work/venv/bin:$PATH"
cd "$work"
ckptproto --version
python -c 'import ckptproto, numpy as np; ckptproto.save({"w": np.ones(3)}, "checkpoints/checkpoint_step_1")'
ckptproto ls checkpoints
ckptproto verify checkpoints/checkpoint_step_1
phase "done"
