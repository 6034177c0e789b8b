"""``ckptproto conformance`` and the pytest plugin, run as a user runs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckptproto.cli import main
from ckptproto.conformance import CHECK_NAMES

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def test_cli_passes_reference_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.json"
    status = main(["conformance", "examples.adapters.numpy_trainer:NumpyAdapter", "--json", str(report)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "10 passed, 0 failed, 0 skipped" in out
    doc = json.loads(report.read_text())
    assert doc["passed"] is True and [c["name"] for c in doc["checks"]] == list(CHECK_NAMES)


def test_cli_fails_a_broken_trainer_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "report.json"
    status = main(
        [
            "conformance",
            "_broken_trainers:ForgetsScheduler",
            "--check",
            "resume_equivalence",
            "--json",
            str(report),
        ]
    )
    out = capsys.readouterr().out
    assert status == 1
    assert " 4  resume_equivalence  FAIL" in out
    assert "fingerprint.lr: expected 0.02449" in out
    doc = json.loads(report.read_text())
    assert doc["checks"][0]["differences"][0]["path"] == "fingerprint.lr"


def test_cli_rejects_a_bad_spec(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["conformance", "no_such_module_xyz:Adapter"]) == 2
    assert "cannot import 'no_such_module_xyz'" in capsys.readouterr().err
    assert main(["conformance", "examples.adapters.numpy_trainer:NumpyAdapter", "--check", "nope"]) == 2


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "ckptproto.conformance.pytest_plugin",
            "-p",
            "no:cacheprovider",
            *args,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_plugin_adds_one_item_per_check_and_fails_the_broken_one(tmp_path: Path) -> None:
    done = _pytest(tmp_path, "--ckptproto-adapter=_broken_trainers:NonStrict", "-q", "-rfs")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed, 9 passed" in done.stdout
    assert "FAILED ::ckptproto-conformance[_broken_trainers:NonStrict]::strict_loading" in done.stdout
    assert "accepted by load_state_dict()" in done.stdout


def test_plugin_selects_with_k_and_leaves_plain_runs_alone(tmp_path: Path) -> None:
    (tmp_path / "test_user.py").write_text("def test_user():\n    assert True\n")
    plain = _pytest(tmp_path, "-q")
    assert plain.returncode == 0 and "1 passed" in plain.stdout, plain.stdout
    selected = _pytest(
        tmp_path,
        "--ckptproto-adapter=examples.adapters.numpy_trainer:NumpyAdapter",
        "-q",
        "-k",
        "round_trip or user",
    )
    assert selected.returncode == 0, selected.stdout
    assert "2 passed, 9 deselected" in selected.stdout
