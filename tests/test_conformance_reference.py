"""The reference adapters pass every check; the numpy one never imports torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ckptproto.conformance import CHECK_NAMES, render_table, run_conformance


@pytest.mark.parametrize(
    "spec",
    ["examples.adapters.numpy_trainer:NumpyAdapter", "examples.adapters.torch_trainer:TorchAdapter"],
)
def test_reference_adapter_passes_every_check(spec: str) -> None:
    report = run_conformance(spec)
    assert [r.name for r in report.results] == list(CHECK_NAMES)
    # warn: a harmless leniency of torch's own optimizer/scheduler loading, reported as such
    assert set(report.statuses().values()) <= {"pass", "warn"}, render_table(report)
    assert report.passed


def test_numpy_trainer_runs_without_torch() -> None:
    code = (
        "import sys, examples.adapters.numpy_trainer as m\n"
        "a = m.NumpyAdapter(); t = a.create(0); a.train(t, 2); a.fingerprint(t)\n"
        "import ckptproto.conformance.child, ckptproto.conformance.checks\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_adapter_object_without_spec_skips_only_the_process_check() -> None:
    from examples.adapters.numpy_trainer import NumpyAdapter

    class Local(NumpyAdapter):  # defined in a function: no importable module:Class spec
        pass

    report = run_conformance(Local(), only=["resume_across_processes", "round_trip"])
    assert report.statuses() == {"round_trip": "pass", "resume_across_processes": "skip"}
    assert "module:Class" in report.result("resume_across_processes").summary
