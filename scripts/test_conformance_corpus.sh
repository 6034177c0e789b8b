#!/usr/bin/env bash
# The conformance corpus in CI: every correct reference trainer (numpy, torch, nanoGPT-style,
# Lightning, Hugging Face Trainer) must pass, and a sample of seeded bugs must be caught
# (~2 min on 2 cores; the default suite runs a cheaper sample). The whole corpus, with the
# "caught N/M bugs, failed K/L correct trainers" line: python -m examples.adapters.corpus
# Uses the venv scripts/test.sh made; .ci/run calls this after it.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "==> conformance corpus (correct trainers and a sample of seeded bugs)"
CKPTPROTO_CORPUS=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_conformance_corpus.py "$@"
