"""Issue 13: the suite neither fails correct trainers (false positives of checks 5, 7, 8, 10,
the child's environment) nor misses real resume bugs (global RNG masking, shadow state, one
resume point, saves inside an accumulation window); its reports name causes and fixes."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ckptproto.cli import main
from ckptproto.conformance import render_table, run_conformance
from ckptproto.conformance.checks import child_environment
from ckptproto.conformance.compare import compare_trees
from ckptproto.conformance.context import scramble_global_rngs

# -- false positives ---------------------------------------------------------------------------


def test_check7_ignoring_unknown_keys_is_a_warning_not_a_failure() -> None:
    """torch.optim's load_state_dict ignores unknown keys: harmless unless training changes."""
    report = run_conformance("_broken_trainers:LenientUnknown", only=["strict_loading"])
    result = report.result("strict_loading")
    assert result.status == "warn", render_table(report)
    assert "ckptproto_conformance_unexpected" in result.warnings[0]
    assert report.passed


def test_check7_probes_every_key_not_only_the_first_leaf() -> None:
    """A load lenient about dataloaders.train.position only (not the section's first leaf)."""
    report = run_conformance("_broken_trainers:LenientPosition", only=["strict_loading"])
    result = report.result("strict_loading")
    assert result.status == "fail", render_table(report)
    assert [d.path for d in result.differences] == ["dataloaders.train.position"]
    assert "accepted, then after 4 steps fingerprint.next_batch" in result.differences[0].got


def test_check8_keeping_the_given_tensors_is_a_warning() -> None:
    """A plain optimizer.load_state_dict(ckpt["optimizer"]) keeps the tensors: harmless."""
    report = run_conformance("_broken_trainers:Aliasing", only=["repeated_load"])
    result = report.result("repeated_load")
    assert result.status == "warn", render_table(report)
    assert "keeps the given tensors" in result.warnings[0]


def test_check8_emptying_the_given_dict_is_diagnosed_as_such() -> None:
    report = run_conformance("_broken_trainers:EmptiesGivenDict", only=["repeated_load"])
    result = report.result("repeated_load")
    assert result.status == "warn", render_table(report)
    assert "changed the dict it was given while loading" in result.warnings[0]
    assert "keeps the given tensors" not in result.warnings[0]


@pytest.fixture
def deterministic_flag() -> Iterator[None]:
    torch = pytest.importorskip("torch")
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_check10_runs_with_torch_defaults_whatever_the_trainer_sets(deterministic_flag: None) -> None:
    """Lightning's Trainer(deterministic=True) turned on torch.use_deterministic_algorithms,
    under which ckptproto's own reader failed on the golden sub-byte dtypes: check 10 blamed
    the trainer."""
    import torch

    from examples.adapters.torch_trainer import TorchAdapter, TorchTrainer

    class Deterministic(TorchAdapter):
        def create(self, seed: int) -> TorchTrainer:
            torch.use_deterministic_algorithms(True)
            return TorchTrainer(seed)

    report = run_conformance(Deterministic(), only=["legal_state", "format_conformance"])
    assert report.statuses() == {"legal_state": "pass", "format_conformance": "pass"}, render_table(report)
    assert "3 golden checkpoints decode" in report.result("format_conformance").summary
    # ...and the session leaves this process's flags as it found them (the trainer's flag
    # leaked into every later test of the process: test_roundtrip failed on sub-byte dtypes)
    assert not torch.are_deterministic_algorithms_enabled()


def test_an_internal_error_is_reported_as_ckptproto_s_not_the_trainer_s(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ckptproto.conformance import golden

    def broken(name: str) -> list[object]:
        raise RuntimeError("reader bug")

    monkeypatch.setattr(golden, "check_decoded", broken)
    report = run_conformance("examples.adapters.numpy_trainer:NumpyAdapter", only=["format_conformance"])
    result = report.result("format_conformance")
    assert result.status == "error", render_table(report)
    assert "RuntimeError: reader bug" in result.summary and "internal error of ckptproto" in result.cause
    assert not report.passed
    assert "1 internal errors of ckptproto" in render_table(report)
    status = main(
        ["conformance", "examples.adapters.numpy_trainer:NumpyAdapter", "--check", "format_conformance"]
    )
    assert status == 3, capsys.readouterr().out


def test_the_child_gets_no_launcher_variables() -> None:
    parent = {
        "PATH": "/bin",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "TORCHELASTIC_RUN_ID": "x",
        "SLURM_PROCID": "3",
        "PL_GLOBAL_SEED": "7",
        "CUDA_VISIBLE_DEVICES": "0",
    }
    env = child_environment(parent)
    assert set(env) == {"PATH", "CUDA_VISIBLE_DEVICES", "PYTHONPATH"}


def test_check5_does_not_blame_a_module_global_for_the_global_rng() -> None:
    """A trainer drawing dropout from numpy's global RNG without seeding or saving it: the
    in-process resume ran after other trainers, the child's in a fresh process, and check 5
    blamed "a module global or cache". Now both start from RNGs scrambled from the seed, and
    check 4 fails naming the global RNG."""
    report = run_conformance(
        "_broken_trainers:UnseededGlobalRng", only=["resume_equivalence", "resume_across_processes"]
    )
    assert report.statuses() == {"resume_equivalence": "fail", "resume_across_processes": "pass"}, (
        render_table(report)
    )
    assert "global RNG" in report.result("resume_equivalence").cause


# -- blind spots -------------------------------------------------------------------------------


def test_global_rngs_are_scrambled_from_the_seed() -> None:
    torch = pytest.importorskip("torch")
    states = []
    for salt in (5, 5, 6):
        scramble_global_rngs(salt)
        states.append((random.random(), float(np.random.random()), float(torch.rand(()))))
    assert states[0] == states[1] != states[2]
    assert all(a != b for a, b in zip(states[0], states[2], strict=True))


def test_shadow_state_outside_state_dict_fails_check_11() -> None:
    """An EMA kept outside state_dict() and outside the adapter's fingerprint: check 4 passes."""
    report = run_conformance("_broken_trainers:EmaOutsideState", only=["resume_equivalence", "shadow_state"])
    assert report.statuses() == {"resume_equivalence": "pass", "shadow_state": "fail"}, render_table(report)
    assert report.result("shadow_state").differences[0].path.startswith("trainer.ema.")


def test_a_bug_at_the_epoch_boundary_only_fails_the_sweep() -> None:
    report = run_conformance("_broken_trainers:EpochBoundary", only=["resume_equivalence", "resume_sweep"])
    assert report.statuses() == {"resume_equivalence": "pass", "resume_sweep": "fail"}, render_table(report)
    result = report.result("resume_sweep")
    assert result.summary.startswith("resuming at step 6, step 12 and training to step 13 differs"), (
        result.summary
    )
    assert "epoch boundary" in result.cause


def test_a_save_inside_an_accumulation_window_is_checked() -> None:
    pytest.importorskip("torch")
    from examples.adapters.corpus import NanoDropsAccumulatedGrads

    class Short(NanoDropsAccumulatedGrads):  # type: ignore[misc, valid-type]
        sweep_steps = 3

    report = run_conformance(Short(), only=["resume_sweep"])
    result = report.result("resume_sweep")
    assert result.status == "fail", render_table(report)
    assert "micro-steps" in result.summary and "accumulation window" in result.cause


def test_an_rng_difference_is_reported_as_draws() -> None:
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(1)
    before = g.get_state()
    torch.rand(3, generator=g)
    (diff,) = compare_trees({"rng": before}, {"rng": g.get_state()}, where="fingerprint")
    assert diff.path == "fingerprint.rng" and "3 draws ahead: 3 extra draws" in diff.got
    state = np.random.default_rng(2).bit_generator.state
    gen = np.random.default_rng(2)
    assert compare_trees({"rng": gen.bit_generator.state}, {"rng": state}) == []
    gen.random(2)
    (diff,) = compare_trees({"rng": gen.bit_generator.state}, {"rng": state})
    assert "2 draws behind: 2 missing draws" in diff.got


# -- reports -----------------------------------------------------------------------------------


def test_progress_lines_and_json_carry_cause_and_fix(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report.json"
    status = main(
        [
            "conformance",
            "_broken_trainers:ForgetsScheduler",
            "--check",
            "resume_equivalence",
            "--json",
            str(out),
        ]
    )
    captured = capsys.readouterr()
    assert status == 1
    assert "[1/1] resume_equivalence ..." in captured.err
    assert "FAIL" in captured.err.splitlines()[-1]
    assert "likely cause: the LR scheduler" in captured.out
    (check,) = json.loads(out.read_text())["checks"]
    assert check["cause"].startswith("the LR scheduler") and check["fix"] and check["warnings"] == []


class _HostileSummary(dict):  # type: ignore[type-arg]
    """Like wandb's disabled-run summary (found on a real Dream Trainer): every attribute
    lookup is an item lookup, so a missing attribute raises KeyError, not AttributeError."""

    def __getattr__(self, key: str) -> object:
        return self[key]


class _RaisingList(list):  # type: ignore[type-arg]
    def __iter__(self) -> Iterator[object]:
        raise RuntimeError("not iterable today")


def test_shadow_walk_survives_objects_whose_attribute_lookup_raises() -> None:
    torch = pytest.importorskip("torch")
    from ckptproto.conformance.shadow import collect

    class Holder:
        def __init__(self) -> None:
            self.summary = _HostileSummary(loss=1.0)
            self.odd = _RaisingList([1])
            self.weights = torch.ones(3)

    found = collect(Holder())
    assert list(found) == ["trainer.weights"]
