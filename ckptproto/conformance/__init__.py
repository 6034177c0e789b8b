"""The conformance suite: proves a trainer checkpoints and resumes correctly, and that a
checkpoint follows the format specification.

::

    from ckptproto.conformance import run_conformance, render_table
    report = run_conformance("mypkg.mymodule:MyAdapter")
    print(render_table(report))

or ``ckptproto conformance mypkg.mymodule:MyAdapter`` / ``pytest --ckptproto-adapter=...``.
Checks and rationale: ``spec/CONFORMANCE.md``; adoption guide: ``docs/conformance.md``.
"""

from ckptproto.conformance.adapter import AdapterError, Capabilities, TrainerAdapter, load_adapter
from ckptproto.conformance.checks import CHECK_NAMES, CHECKS
from ckptproto.conformance.compare import Difference, compare_trees
from ckptproto.conformance.report import CheckResult, Report, render_table
from ckptproto.conformance.runner import Session, run_conformance
from ckptproto.conformance.validate import RULES, Violation, validate

__all__ = [
    "CHECKS",
    "CHECK_NAMES",
    "RULES",
    "AdapterError",
    "Capabilities",
    "CheckResult",
    "Difference",
    "Report",
    "Session",
    "TrainerAdapter",
    "Violation",
    "compare_trees",
    "load_adapter",
    "render_table",
    "run_conformance",
    "validate",
]
