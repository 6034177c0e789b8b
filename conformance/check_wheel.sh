#!/usr/bin/env bash
# Build the wheel, install it into a fresh venv outside the repository, and run the
# conformance CLI, the pytest plugin (loaded through its pytest11 entry point) and validate
# from there. Dependencies (numpy, pytest; torch for the golden torch tensors) come from an
# existing environment through a .pth file so nothing is downloaded:
#
#   DEPS_SITE=/work/main/.venv/lib/python3.11/site-packages bash conformance/check_wheel.sh
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
DEPS_SITE="${DEPS_SITE:?set DEPS_SITE to a site-packages holding numpy, pytest (and torch)}"
WORK="$(mktemp -d /tmp/ckptproto-wheel-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
"$PY" -m pip wheel --no-deps --no-build-isolation -q "$REPO" -w "$WORK/wheel"
"$PY" -m venv "$WORK/venv"
"$WORK/venv/bin/python" -m pip install -q --no-deps --disable-pip-version-check "$WORK"/wheel/ckptproto-*.whl
site="$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$DEPS_SITE" > "$site/zz_deps.pth"
mkdir "$WORK/outside"
cp "$REPO/examples/adapters/numpy_trainer.py" "$WORK/outside/my_trainer.py"
cd "$WORK/outside"
unset PYTHONPATH
"$WORK/venv/bin/python" -c 'import ckptproto, sys; assert ckptproto.__file__.startswith(sys.prefix), ckptproto.__file__'
"$WORK/venv/bin/ckptproto" conformance my_trainer:NumpyAdapter --json report.json
"$WORK/venv/bin/python" -m pytest -q -p no:cacheprovider --ckptproto-adapter=my_trainer:NumpyAdapter
"$WORK/venv/bin/ckptproto" validate "$site/ckptproto/conformance/golden/sharded"
echo "wheel OK"
