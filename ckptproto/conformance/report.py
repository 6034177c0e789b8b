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

Status = Literal["pass", "fail", "skip"]


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

    def to_json(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "name": self.name,
            "title": self.title,
            "status": self.status,
            "summary": self.summary,
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
        return all(r.status != "fail" for r in self.results)

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
            "counts": {s: sum(r.status == s for r in self.results) for s in ("pass", "fail", "skip")},
            "checks": [r.to_json() for r in self.results],
        }


def render_result(result: CheckResult, *, max_differences: int = 10) -> str:
    """One check's summary and its differences, indented, for a failure message."""
    lines = [result.summary]
    for diff in result.differences[:max_differences]:
        lines.append(f"    {diff}")
    if len(result.differences) > max_differences:
        lines.append(f"    ... and {len(result.differences) - max_differences} more")
    return "\n".join(lines)


def render_table(report: Report) -> str:
    """A fixed-width table: number, check, status, time, summary; failures then detailed."""
    width = max(len(r.name) for r in report.results) if report.results else 10
    lines = [f"ckptproto conformance: {report.adapter}", ""]
    lines.append(f"{'#':>2}  {'check':<{width}}  {'result':<6}  {'time':>6}  summary")
    for r in report.results:
        first = r.summary.splitlines()[0] if r.summary else ""
        first = first if len(first) <= 100 or r.status != "fail" else first[:97] + "..."
        lines.append(f"{r.number:>2}  {r.name:<{width}}  {r.status.upper():<6}  {r.seconds:>5.1f}s  {first}")
    failed = [r for r in report.results if r.status == "fail"]
    for r in failed:
        lines.append("")
        lines.append(f"FAIL {r.number} {r.name}: {r.title}")
        lines.append("  " + render_result(r).replace("\n", "\n  "))
    counts = report.to_json()["counts"]
    lines.append("")
    lines.append(
        f"{counts['pass']} passed, {counts['fail']} failed, {counts['skip']} skipped"
        + ("" if report.passed else "  -- NOT CONFORMANT")
    )
    return "\n".join(lines)
