"""Every child process ckptproto starts runs this very ckptproto (ckptproto._child), even when
started from a directory that holds another one: ``python -m``/``-c`` put the current
directory first on the child's sys.path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ckptproto._child import child_env, python_command
from ckptproto.conformance.checks import child_environment


def _shadowed_cwd(tmp_path: Path) -> Path:
    shadow = tmp_path / "cwd" / "ckptproto"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('the wrong ckptproto')\n")
    return shadow.parent


def _run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_the_conformance_child_runs_this_ckptproto_whatever_the_current_directory_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cwd = _shadowed_cwd(tmp_path)
    monkeypatch.chdir(cwd)  # the adapter's directory: child_environment puts it on PYTHONPATH
    env = child_environment(os.environ)
    # The command checks.py used before: the shadow wins (what this test guards against).
    old = _run([sys.executable, "-m", "ckptproto.conformance.child"], cwd, env)
    assert "the wrong ckptproto" in old.stderr
    # The command it uses now: this ckptproto; with no arguments the child prints its usage.
    new = _run(python_command("ckptproto.conformance.child:start"), cwd, env)
    assert "the wrong ckptproto" not in new.stderr and new.returncode == 2, new.stderr


def test_the_writer_process_command_runs_this_ckptproto(tmp_path: Path) -> None:
    cwd = _shadowed_cwd(tmp_path)
    probe = python_command("ckptproto.format.layout:this_host")  # imports ckptproto, prints nothing
    done = _run(probe, cwd, child_env(os.environ))
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("entry", ["ckptproto.io.writer_main", "os; import x:start", "a.b:c()", "a..b:c"])
def test_an_entry_that_is_not_module_colon_function_is_refused(entry: str) -> None:
    with pytest.raises(ValueError, match="not a"):
        python_command(entry)
