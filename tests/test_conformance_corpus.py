"""The seeded-bug corpus (examples/adapters/corpus.py): correct trainers pass, planted bugs
are caught by a check that names their cause.

The default run takes a cheap sample; ``CKPTPROTO_CORPUS=1`` runs every correct trainer
(nanoGPT-style, Lightning, Hugging Face: minutes) and the CI sample of bugs. The whole corpus, with its
figures, is ``python -m examples.adapters.corpus`` (docs/conformance.md)."""

from __future__ import annotations

import os

import pytest

pytest.importorskip("torch")

from examples.adapters.corpus import BUGS, CORRECT, Entry, run_entry

FULL = bool(os.environ.get("CKPTPROTO_CORPUS"))
needs_switch = pytest.mark.skipif(not FULL, reason="set CKPTPROTO_CORPUS=1 (minutes)")

# bug -> (the check that catches it first, a word of the cause it reports)
CHEAP: dict[str, tuple[str, str]] = {
    "NanoIterNumOffByOne": ("round_trip", "load_state_dict()"),
    "TorchSamplerEpochNotSaved": ("resume_sweep", "epoch boundary"),
    "TorchDropoutRngNotRestored": ("round_trip", "state.rng.torch"),
}


def _entry(name: str) -> Entry:
    return next(e for e in BUGS if e.spec.endswith(f":{name}"))


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_cheap_bug_is_caught_naming_its_cause(name: str) -> None:
    check, word = CHEAP[name]
    result = run_entry(_entry(name), all_checks=False)
    assert result["failed"], result
    assert result["failed"][0]["check"] == check and word in result["failed"][0]["cause"], result


@needs_switch
@pytest.mark.parametrize("entry", CORRECT, ids=lambda e: e.spec.rpartition(":")[2])
def test_correct_trainer_passes(entry: Entry) -> None:
    for module, word in (("lightning", "lightning_"), ("transformers", "hf_")):
        if word in entry.spec:
            pytest.importorskip(module)
    result = run_entry(entry, all_checks=True)
    assert not result["failed"] and not result["errors"], result


@needs_switch
@pytest.mark.parametrize("entry", [e for e in BUGS if e.sample], ids=lambda e: e.spec.rpartition(":")[2])
def test_sample_bug_is_caught(entry: Entry) -> None:
    result = run_entry(entry, all_checks=False)
    assert result["failed"] and result["failed"][0]["cause"], result
    assert not result["errors"], result
