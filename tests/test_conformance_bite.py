"""Proof that the checks bite: each deliberately broken trainer fails exactly the check that
names its bug, every other check passes, and the report names the path at fault."""

from __future__ import annotations

import pytest
from _broken_trainers import BUGS

from ckptproto.conformance import CHECK_NAMES, render_table, run_conformance


@pytest.mark.parametrize("adapter", sorted(BUGS))
def test_broken_trainer_fails_exactly_its_check(adapter: str) -> None:
    check, mentioned, also = BUGS[adapter]
    # check 5 starts two processes: only for the bug it is about (the suite budget)
    only = [n for n in CHECK_NAMES if n != "resume_across_processes" or check == n]
    report = run_conformance(f"_broken_trainers:{adapter}", only=only)
    failed = {name for name, status in report.statuses().items() if status != "pass"}
    assert check in failed and failed <= {check, *also}, render_table(report)
    assert all(report.result(name).status == "fail" for name in failed), render_table(report)
    failure = report.result(check)
    assert failure.cause and failure.fix, render_table(report)
    assert any(d.path.startswith(mentioned) or mentioned in str(d) for d in failure.differences), (
        f"{check} should name {mentioned}:\n{render_table(report)}"
    )


def test_adapter_may_declare_non_strict_loading() -> None:
    from _broken_trainers import NonStrict

    class Declared(NonStrict):  # type: ignore[misc, valid-type]
        strict_loading = False

    report = run_conformance(Declared(), only=["strict_loading"])
    assert report.statuses() == {"strict_loading": "skip"}


def test_a_crashing_adapter_fails_with_the_exception_named() -> None:
    from examples.adapters.numpy_trainer import NumpyAdapter

    class Crashes(NumpyAdapter):
        def fingerprint(self, trainer: object) -> dict[str, object]:
            raise RuntimeError("boom in fingerprint")

    report = run_conformance(Crashes(), only=["resume_equivalence", "legal_state"])
    assert report.statuses() == {"legal_state": "pass", "resume_equivalence": "fail"}
    assert "RuntimeError: boom in fingerprint" in report.result("resume_equivalence").summary


@pytest.mark.parametrize(
    ("adapter", "check", "mentioned"),
    [
        ("NumpyScalar", "legal_state", "trainer.best_loss"),
        ("DrawingStateDict", "pure_state_dict", "state.rng.dropout"),
        ("Miscounting", "trainer_metadata", "trainer.global_step"),
    ],
)
def test_other_bugs_fail_their_check(adapter: str, check: str, mentioned: str) -> None:
    report = run_conformance(f"_broken_trainers:{adapter}", only=[check])
    result = report.result(check)
    assert result.status == "fail", render_table(report)
    assert result.differences[0].path.startswith(mentioned), render_table(report)


def test_statefuls_nested_in_the_state_are_legal() -> None:
    """PROTOCOL.md [P-2]: a state may hold Stateful objects in its dicts, as save accepts."""
    from examples.adapters.numpy_trainer import NumpyAdapter, NumpyTrainer, check_same_keys

    class Nested(NumpyTrainer):
        def state_dict(self) -> dict[str, object]:
            state = super().state_dict()
            state["dataloaders"] = {"train": self.loader}  # the loader object itself
            return state

        def load_state_dict(self, state: object) -> None:
            assert isinstance(state, dict)
            check_same_keys(NumpyTrainer.state_dict(self), state)
            self.apply_state(state)

    class NestedAdapter(NumpyAdapter):
        trainer_class = Nested

    report = run_conformance(NestedAdapter(), only=["legal_state", "round_trip", "resume_equivalence"])
    assert set(report.statuses().values()) == {"pass"}, render_table(report)
