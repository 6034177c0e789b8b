"""Running the checks against an adapter::

report = run_conformance("examples.adapters.numpy_trainer:NumpyAdapter")
assert report.passed, render_table(report)
"""

from __future__ import annotations

import tempfile
import time
import traceback
from collections.abc import Iterable
from pathlib import Path

from ckptproto.conformance.adapter import TrainerAdapter, check_adapter, load_adapter, spec_of
from ckptproto.conformance.checks import CHECK_NAMES, CHECKS, CheckFailed, CheckSkipped, Context
from ckptproto.conformance.compare import Difference
from ckptproto.conformance.report import CheckResult, Report


class Session:
    """One adapter under test; runs checks one at a time (the pytest plugin runs each as its
    own test item) and shares intermediate results between them. Close it to remove the
    scratch directory."""

    def __init__(self, adapter: TrainerAdapter | str, workdir: str | Path | None = None) -> None:
        if isinstance(adapter, str):
            self.spec: str | None = adapter
            self.adapter = load_adapter(adapter)
        else:
            self.adapter = check_adapter(adapter)
            self.spec = spec_of(adapter)
        self.name = self.spec or type(self.adapter).__qualname__
        self._tmp = tempfile.TemporaryDirectory(prefix="ckptproto-conformance-") if workdir is None else None
        root = Path(self._tmp.name if self._tmp is not None else workdir)  # type: ignore[arg-type]
        root.mkdir(parents=True, exist_ok=True)
        self.context = Context(self.adapter, root, self.spec)

    def run(self, name: str) -> CheckResult:
        """Run one check by name (``CHECK_NAMES``); never raises for a trainer's failure."""
        check = next((c for c in CHECKS if c.name == name), None)
        if check is None:
            raise KeyError(f"no conformance check {name!r}; checks are {', '.join(CHECK_NAMES)}")
        started = time.perf_counter()
        differences: list[Difference] = []
        try:
            summary = check.run(self.context)
            status = "pass"
        except CheckFailed as exc:
            status, summary, differences = "fail", exc.summary, exc.differences
        except CheckSkipped as exc:
            status, summary = "skip", str(exc)
        except Exception as exc:  # the trainer or adapter raised: that check fails
            status = "fail"
            where = traceback.extract_tb(exc.__traceback__)[-1]
            summary = (
                f"raised {type(exc).__qualname__}: {exc} "
                f"(at {Path(where.filename).name}:{where.lineno} in {where.name})"
            )
        seconds = time.perf_counter() - started
        return CheckResult(check.number, check.name, check.title, status, summary, differences, seconds)  # type: ignore[arg-type]

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_conformance(
    adapter: TrainerAdapter | str, *, only: Iterable[str] | None = None, workdir: str | Path | None = None
) -> Report:
    """Run every check (or those named in ``only``, in the suite's order) and report."""
    wanted = list(CHECK_NAMES) if only is None else [n for n in CHECK_NAMES if n in set(only)]
    if only is not None:
        unknown = set(only) - set(CHECK_NAMES)
        if unknown:
            raise KeyError(f"no conformance check {sorted(unknown)}; checks are {', '.join(CHECK_NAMES)}")
    with Session(adapter, workdir) as session:
        return Report(session.name, [session.run(name) for name in wanted])
