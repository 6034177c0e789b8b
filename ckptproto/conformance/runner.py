"""Running the checks against an adapter::

report = run_conformance("examples.adapters.numpy_trainer:NumpyAdapter")
assert report.passed, render_table(report)
"""

from __future__ import annotations

import tempfile
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path

from ckptproto.conformance.adapter import TrainerAdapter, check_adapter, load_adapter, spec_of
from ckptproto.conformance.checks import CHECK_NAMES, CHECKS
from ckptproto.conformance.compare import Difference
from ckptproto.conformance.context import (
    CheckFailed,
    CheckSkipped,
    Context,
    InternalError,
    TrainerRaised,
    set_torch_flags,
    torch_flags,
)
from ckptproto.conformance.report import CAUSES, INTERNAL, CheckResult, Report
from ckptproto.errors import CheckpointError

Progress = Callable[[str, CheckResult | None], None]


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return ""
    last = frames[-1]
    return f" (at {Path(last.filename).name}:{last.lineno} in {last.name})"


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
        self._flags = torch_flags()  # put back on close: trainers may flip them for the process

    def run(self, name: str) -> CheckResult:
        """Run one check by name (``CHECK_NAMES``); never raises for a trainer's failure.

        Status: ``pass``; ``warn`` (passed, with warnings); ``fail`` (the check found a bug,
        or the trainer/adapter raised); ``skip``; ``error`` (ckptproto itself failed: an
        internal error, never blamed on the trainer)."""
        check = next((c for c in CHECKS if c.name == name), None)
        if check is None:
            raise KeyError(f"no conformance check {name!r}; checks are {', '.join(CHECK_NAMES)}")
        started = time.perf_counter()
        differences: list[Difference] = []
        ctx = self.context
        ctx.warnings = []
        cause, fix = CAUSES.get(name, ("", ""))
        try:
            summary = check.run(ctx)
            status = "warn" if ctx.warnings else "pass"
        except CheckFailed as exc:
            status, summary, differences = "fail", exc.summary, exc.differences
            cause, fix = exc.cause or cause, exc.fix or fix
        except CheckSkipped as exc:
            status, summary = "skip", str(exc)
        except TrainerRaised as exc:  # the trainer or adapter raised: that check fails
            status = "fail"
            summary = f"{exc}{_where(exc.original)}"
            cause, fix = "the trainer or the adapter raised an exception", "see the traceback location"
        except CheckpointError as exc:  # ckptproto refused what the trainer gave it
            status = "fail"
            summary = f"ckptproto refused the trainer's state: {type(exc).__qualname__}: {exc}"
        except InternalError as exc:
            status, summary, cause, fix = "error", str(exc), INTERNAL, ""
        except Exception as exc:  # raised inside ckptproto, not by the trainer
            status = "error"
            summary = f"ckptproto raised {type(exc).__qualname__}: {exc}{_where(exc)}"
            cause, fix = INTERNAL, ""
        seconds = time.perf_counter() - started
        if status in ("pass", "skip", "warn"):
            cause = fix = ""
        return CheckResult(
            check.number,
            check.name,
            check.title,
            status,  # type: ignore[arg-type]
            summary,
            differences,
            seconds,
            list(ctx.warnings),
            cause,
            fix,
        )

    def close(self) -> None:
        set_torch_flags(self._flags)
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def run_conformance(
    adapter: TrainerAdapter | str,
    *,
    only: Iterable[str] | None = None,
    workdir: str | Path | None = None,
    progress: Progress | None = None,
) -> Report:
    """Run every check (or those named in ``only``, in the suite's order) and report.

    ``progress(name, None)`` is called as a check starts and ``progress(name, result)`` as
    it ends (the CLI prints a line for each)."""
    wanted = list(CHECK_NAMES) if only is None else [n for n in CHECK_NAMES if n in set(only)]
    if only is not None:
        unknown = set(only) - set(CHECK_NAMES)
        if unknown:
            raise KeyError(f"no conformance check {sorted(unknown)}; checks are {', '.join(CHECK_NAMES)}")
    with Session(adapter, workdir) as session:
        results = []
        for name in wanted:
            if progress is not None:
                progress(name, None)
            results.append(session.run(name))
            if progress is not None:
                progress(name, results[-1])
        return Report(session.name, results)
