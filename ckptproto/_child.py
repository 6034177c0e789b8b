"""Starting a Python child process that runs this very ckptproto.

``python -m`` and ``python -c`` put the current directory first on the child's ``sys.path``: a
job started from a directory holding another ckptproto (a checkout, an older copy) would run a
child of that other version, which misreads what this one sends it. Every child ckptproto
starts (the async writer process, the conformance checks' subprocesses) is started by
:func:`python_command`, which puts the root of the package this process imported in that
place instead; the current directory stays reachable through ``PYTHONPATH`` where the caller
puts it there::

    command = python_command("ckptproto.io.writer_main:start", "7", "9")
    subprocess.Popen(command, env=child_env(os.environ))
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


def python_command(entry: str, *args: str) -> list[str]:
    """The command line that runs ``entry`` (``"package.module:function"``, a function taking
    no arguments that reads ``sys.argv[1:]``, which are ``args``) with this ckptproto first on
    ``sys.path``."""
    module, _, function = entry.partition(":")
    if not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(f"not a module name: {module!r}")
    if not function.isidentifier():
        raise ValueError(f"not a function name: {function!r}")
    boot = f"import sys; sys.path[0] = sys.argv.pop(1); from {module} import {function}; {function}()"
    return [sys.executable, "-c", boot, PACKAGE_ROOT, *args]


def child_env(parent: Mapping[str, str]) -> dict[str, str]:
    """``parent`` with this ckptproto's root first on ``PYTHONPATH`` (for what the child's
    own children import; :func:`python_command` already puts it first for the child)."""
    env = dict(parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, env.get("PYTHONPATH")) if p)
    return env
