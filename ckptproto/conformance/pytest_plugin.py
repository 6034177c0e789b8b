"""pytest plugin: ``pytest --ckptproto-adapter=mypkg.mymodule:MyAdapter`` adds one test item
per conformance check (``ckptproto-conformance::resume_equivalence`` ...).

Registered through the ``pytest11`` entry point, so it is loaded in every pytest run of an
environment with ckptproto installed; without the option it adds nothing and imports nothing
beyond this module. Select checks with ``-k``; ``--ckptproto-only`` runs the conformance
checks alone (the project's own test files are not even collected)::

    pytest --ckptproto-adapter=mypkg.mymodule:MyAdapter --ckptproto-only
    pytest --ckptproto-adapter=mypkg.mymodule:MyAdapter -k "resume or strict"
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest

OPTION = "--ckptproto-adapter"
ONLY = "--ckptproto-only"


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("ckptproto", "ckptproto conformance suite")
    group.addoption(
        OPTION,
        action="append",
        default=[],
        metavar="MODULE:ADAPTER",
        help="run the ckptproto conformance checks against this trainer adapter (repeatable)",
    )
    group.addoption(
        ONLY,
        action="store_true",
        default=False,
        help=f"with {OPTION}: run only the conformance checks, collect no test files",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("ckptproto_only") and not config.getoption("ckptproto_adapter"):
        raise pytest.UsageError(f"{ONLY} needs {OPTION}=MODULE:ADAPTER")


def pytest_ignore_collect(collection_path: Any, config: pytest.Config) -> bool | None:
    # --ckptproto-only: no test file is collected; the conformance items are added after
    return True if config.getoption("ckptproto_only") else None


class ConformanceFailure(Exception):
    """A conformance check failed; its text is the check's report."""


class ConformanceWarning(UserWarning):
    """A conformance check passed with a warning (e.g. aliasing that does not change the run)."""


class ConformanceItem(pytest.Item):
    """One check against one adapter; the adapter's Session is shared by its items."""

    def __init__(self, *, check: str, spec: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.check = check
        self.spec = spec

    def _session(self) -> Any:
        from ckptproto.conformance.runner import Session

        sessions: dict[str, Session] = self.config.stash.setdefault(_SESSIONS, {})
        if self.spec not in sessions:
            sessions[self.spec] = Session(self.spec)
        return sessions[self.spec]

    def runtest(self) -> None:
        from ckptproto.conformance.report import render_result

        result = self._session().run(self.check)
        if result.status == "skip":
            pytest.skip(result.summary)
        if result.status in ("fail", "error"):
            kind = "" if result.status == "fail" else "ckptproto internal error (not the trainer's): "
            raise ConformanceFailure(
                f"{kind}{result.number} {result.name} ({result.title}): " + render_result(result)
            )
        for warning in result.warnings:
            warnings.warn(ConformanceWarning(f"{result.name}: {warning}"), stacklevel=1)

    def repr_failure(self, excinfo: pytest.ExceptionInfo[BaseException], style: Any = None) -> str:
        if isinstance(excinfo.value, ConformanceFailure):
            return str(excinfo.value)
        return str(super().repr_failure(excinfo))

    def reportinfo(self) -> tuple[str, int | None, str]:
        return f"ckptproto-conformance[{self.spec}]", None, f"{self.spec}::{self.check}"


_SESSIONS = pytest.StashKey[dict[str, Any]]()


def pytest_collection_modifyitems(
    session: pytest.Session, config: pytest.Config, items: list[pytest.Item]
) -> None:
    specs: list[str] = config.getoption("ckptproto_adapter") or []
    if not specs:
        return
    from ckptproto.conformance.adapter import load_adapter
    from ckptproto.conformance.checks import CHECK_NAMES
    from ckptproto.errors import CheckpointError

    for spec in specs:
        try:
            load_adapter(spec)  # a bad spec stops the run at once, with a clear message
        except CheckpointError as exc:
            raise pytest.UsageError(f"{OPTION}={spec}: {exc}") from None
        for name in CHECK_NAMES:
            items.append(
                ConformanceItem.from_parent(
                    session, name=f"ckptproto-conformance[{spec}]::{name}", check=name, spec=spec
                )
            )
    deselect = config.getoption("keyword")
    if deselect:  # -k applies before this hook ran; apply it to our items too
        from _pytest.mark import deselect_by_keyword

        deselect_by_keyword(items, config)


def pytest_unconfigure(config: pytest.Config) -> None:
    for s in config.stash.get(_SESSIONS, {}).values():
        s.close()
