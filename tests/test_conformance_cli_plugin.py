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

pytest_plugins = ["pytester"]

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def test_cli_passes_reference_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.json"
    status = main(["conformance", "examples.adapters.numpy_trainer:NumpyAdapter", "--json", str(report)])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "12 passed, 0 passed with warnings, 0 failed, 0 skipped" in out
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


def _pytest(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run pytest in this process (no interpreter start-up), loading the plugin as ``-p`` does."""
    return pytester.runpytest_inprocess(
        "-p", "ckptproto.conformance.pytest_plugin", "-p", "no:cacheprovider", *args
    )


def test_plugin_adds_one_item_per_check_and_fails_the_broken_one(pytester: pytest.Pytester) -> None:
    done = _pytest(
        pytester,
        "--ckptproto-adapter=_broken_trainers:NonStrict",
        "-q",
        "-rfs",
        "-k",
        "strict_loading or round_trip or legal_state",
    )
    out = done.stdout.str()
    assert done.ret == 1, out
    assert "1 failed, 2 passed, 9 deselected" in out  # 12 items, one per check
    assert "FAILED ::ckptproto-conformance[_broken_trainers:NonStrict]::strict_loading" in out
    assert "accepted, then after 4 steps" in out


def test_plugin_selects_with_k_and_leaves_plain_runs_alone(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_user="def test_user():\n    assert True\n")
    plain = _pytest(pytester, "-q")
    assert plain.ret == 0 and "1 passed" in plain.stdout.str(), plain.stdout.str()
    selected = _pytest(
        pytester,
        "--ckptproto-adapter=examples.adapters.numpy_trainer:NumpyAdapter",
        "-q",
        "-k",
        "round_trip or user",
    )
    assert selected.ret == 0, selected.stdout.str()
    assert "2 passed, 11 deselected" in selected.stdout.str()


def test_plugin_rejects_a_bad_spec_as_a_usage_error(pytester: pytest.Pytester) -> None:
    done = _pytest(pytester, "--ckptproto-adapter=no_such_module_xyz:A", "-q")
    assert done.ret == 4
    assert "cannot import 'no_such_module_xyz'" in done.stderr.str()


@pytest.mark.skipif(
    os.environ.get("CKPTPROTO_TEST_WHEEL") != "1",
    reason="builds a wheel and a venv (~1 min): set CKPTPROTO_TEST_WHEEL=1",
)
def test_cli_and_plugin_work_from_a_wheel_outside_the_repo() -> None:
    import site

    deps = next(p for p in site.getsitepackages() if Path(p, "numpy").exists())
    env = dict(os.environ, DEPS_SITE=deps, PYTHON=sys.executable)
    done = subprocess.run(
        ["bash", str(ROOT / "conformance" / "check_wheel.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0 and "wheel OK" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]


def test_plugin_only_runs_the_conformance_checks(pytester: pytest.Pytester) -> None:
    """A user's project has failing tests of its own: --ckptproto-only never collects them."""
    pytester.makepyfile(test_user="raise SystemExit('the project test files must not be imported')\n")
    done = _pytest(
        pytester,
        "--ckptproto-adapter=examples.adapters.numpy_trainer:NumpyAdapter",
        "--ckptproto-only",
        "-q",
        "-k",
        "round_trip",
    )
    assert done.ret == 0, done.stdout.str()
    assert "1 passed, 11 deselected" in done.stdout.str()
    lonely = _pytest(pytester, "--ckptproto-only", "-q")
    assert lonely.ret == 4 and "needs --ckptproto-adapter" in lonely.stderr.str()


def test_cli_explains_the_adapter_when_given_a_trainer_class(tmp_path: Path) -> None:
    (tmp_path / "my_trainer.py").write_text(
        "class Trainer:\n    def state_dict(self):\n        return {}\n    def fit(self):\n        pass\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "ckptproto", "conformance", "my_trainer:Trainer"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])},
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "looks like a trainer itself" in done.stderr and "create(seed)" in done.stderr
