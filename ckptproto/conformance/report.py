"""Conformance results and their two renderings: a text table and JSON.

::

    report = run_conformance("mypkg.mymodule:MyAdapter")
    print(render_table(report))
    Path("report.json").write_text(json.dumps(report.to_json(), indent=2))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ckptproto.conformance.compare import Difference

Status = Literal["pass", "warn", "fail", "skip", "error"]
STATUSES: tuple[Status, ...] = ("pass", "warn", "fail", "skip", "error")

# check -> (what is usually wrong, what to do): the report carries it, so a failure reads
# without the docs. A check may give a more precise cause for one failure.
CAUSES: dict[str, tuple[str, str]] = {
    "legal_state": (
        "the state holds a value the format cannot store (a numpy scalar, a custom object, a set)",
        "convert it in state_dict(): .item() for numpy scalars, a dict for an object",
    ),
    "pure_state_dict": (
        "state_dict() changes the trainer: it draws random numbers, advances an iterator or flushes a buffer",
        "make state_dict() read only; take what it needs without consuming it",
    ),
    "round_trip": (
        "load_state_dict() ignores a section, or state_dict() reports it differently than loaded",
        "restore every key state_dict() returns, and return what was loaded",
    ),
    "resume_equivalence": (
        "something that decides the next steps is not in the state or not restored: RNG, data "
        "position / shuffle order, scheduler, a step counter, a scaler, an EMA",
        "add it to state_dict() and restore it in load_state_dict(); the first differing "
        "fingerprint key names it",
    ),
    "resume_across_processes": (
        "state kept outside state_dict() that survives in this process but not a restart",
        "move it into state_dict()/load_state_dict()",
    ),
    "async_resume": (
        "state_dict() returns live containers (the trainer's own dict, updated in place)",
        "build fresh dicts/lists in state_dict() (tensors may stay the live ones)",
    ),
    "strict_loading": (
        "load_state_dict() accepts a state with a missing or unexpected key and trains differently",
        "check the keys in load_state_dict() (torch.optim optimizers and LR schedulers do not): "
        "compare with the keys of self.state_dict() and raise on a difference",
    ),
    "repeated_load": (
        "load_state_dict() depends on what it loads into, or keeps the given buffers in a way "
        "that changes the run",
        "replace every restored value; copy.deepcopy what load_state_dict() keeps",
    ),
    "trainer_metadata": (
        "trainer.global_step / current_epoch missing or counting something else",
        "keep {'trainer': {'global_step': optimizer steps, 'current_epoch': epochs}} in the state",
    ),
    "format_conformance": (
        "the trainer's checkpoint breaks FORMAT.md",
        "see the violations' ids in spec/FORMAT.md",
    ),
    "shadow_state": (
        "state that changes the future lives outside state_dict() (scaler, EMA, callback)",
        "add it to state_dict() and restore it in load_state_dict()",
    ),
    "resume_sweep": (
        "progress is restored wrongly at some resume positions (epoch boundary, warmup end, "
        "inside an accumulation window)",
        "save and restore the counters that decide the position exactly",
    ),
}
INTERNAL = (
    "an internal error of ckptproto, not a fault of the trainer: please report it with this "
    "output (https://github.com/ckptproto/ckptproto/issues)"
)


@dataclass
class CheckResult:
    """The outcome of one check; ``differences`` name each path or fingerprint key at fault."""

    number: int
    name: str
    title: str
    status: Status
    summary: str
    differences: list[Difference] = field(default_factory=list)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    cause: str = ""
    fix: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "name": self.name,
            "title": self.title,
            "status": self.status,
            "summary": self.summary,
            "cause": self.cause,
            "fix": self.fix,
            "warnings": list(self.warnings),
            "differences": [d.to_json() for d in self.differences],
            "seconds": round(self.seconds, 3),
        }


@dataclass
class Report:
    """Every check run against one adapter."""

    adapter: str
    results: list[CheckResult]

    @property
    def passed(self) -> bool:
        """No check failed and ckptproto itself did not fail (warnings pass)."""
        return all(r.status not in ("fail", "error") for r in self.results)

    def result(self, name: str) -> CheckResult:
        for r in self.results:
            if r.name == name:
                return r
        raise KeyError(name)

    def statuses(self) -> dict[str, Status]:
        return {r.name: r.status for r in self.results}

    def to_json(self) -> dict[str, Any]:
        return {
            "adapter": self.adapter,
            "passed": self.passed,
            "counts": {s: sum(r.status == s for r in self.results) for s in STATUSES},
            "checks": [r.to_json() for r in self.results],
        }


def render_result(result: CheckResult, *, max_differences: int = 10) -> str:
    """One check's summary, its cause and fix, and its differences, for a failure message."""
    lines = [result.summary]
    if result.cause:
        lines.append(f"  likely cause: {result.cause}")
    if result.fix:
        lines.append(f"  fix: {result.fix}")
    for diff in result.differences[:max_differences]:
        lines.append(f"    {diff}")
    if len(result.differences) > max_differences:
        lines.append(f"    ... and {len(result.differences) - max_differences} more")
    for warning in result.warnings:
        lines.append(f"  warning: {warning}")
    return "\n".join(lines)


def render_line(r: CheckResult, width: int = 24) -> str:
    """The table row of one result (also the progress line printed as each check ends)."""
    first = r.summary.splitlines()[0] if r.summary else ""
    first = first if len(first) <= 100 or r.status not in ("fail", "error") else first[:97] + "..."
    return f"{r.number:>2}  {r.name:<{width}}  {r.status.upper():<6}  {r.seconds:>5.1f}s  {first}"


def render_table(report: Report) -> str:
    """A fixed-width table: number, check, status, time, summary; failures then detailed."""
    width = max(len(r.name) for r in report.results) if report.results else 10
    lines = [f"ckptproto conformance: {report.adapter}", ""]
    lines.append(f"{'#':>2}  {'check':<{width}}  {'result':<6}  {'time':>6}  summary")
    for r in report.results:
        lines.append(render_line(r, width))
    for r in report.results:
        if r.status in ("fail", "error", "warn"):
            lines.append("")
            lines.append(f"{r.status.upper()} {r.number} {r.name}: {r.title}")
            lines.append("  " + render_result(r).replace("\n", "\n  "))
    counts = report.to_json()["counts"]
    lines.append("")
    lines.append(
        f"{counts['pass']} passed, {counts['warn']} passed with warnings, {counts['fail']} failed, "
        f"{counts['skip']} skipped"
        + (f", {counts['error']} internal errors of ckptproto" if counts["error"] else "")
        + ("" if report.passed else "  -- NOT CONFORMANT" if counts["fail"] else "  -- NOT CHECKED")
    )
    return "\n".join(lines)
