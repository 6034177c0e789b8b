"""``ckptproto conformance MODULE:ADAPTER [--json REPORT] [--check NAME]...``: run the
conformance suite against a trainer adapter; exit status 1 when any check fails."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "conformance",
        help="check that a trainer checkpoints and resumes correctly",
        description="Run the conformance checks (spec/CONFORMANCE.md) against a trainer adapter.",
    )
    parser.add_argument("adapter", metavar="MODULE:ADAPTER", help="e.g. mypkg.mymodule:MyAdapter")
    parser.add_argument("--json", metavar="REPORT", help="also write the report as JSON to this file")
    parser.add_argument(
        "--check", action="append", metavar="NAME", help="run only this check (repeatable); default: all"
    )
    parser.add_argument("--workdir", metavar="DIR", help="keep the checkpoints written by the checks here")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """0 when nothing failed (warnings pass), 1 when a check failed, 2 for an unusable adapter
    or check name, 3 when only internal errors of ckptproto stopped a check."""
    from ckptproto.conformance.checks import CHECK_NAMES
    from ckptproto.conformance.report import CheckResult, render_line, render_table
    from ckptproto.conformance.runner import run_conformance

    total = len(args.check) if args.check else len(CHECK_NAMES)
    done = [0]

    def progress(name: str, result: CheckResult | None) -> None:
        # On stderr as each check starts and ends: some take tens of seconds.
        if result is None:
            done[0] += 1
            print(f"[{done[0]}/{total}] {name} ...", file=sys.stderr, flush=True)
        else:
            print(f"[{done[0]}/{total}] {render_line(result)}", file=sys.stderr, flush=True)

    # Like `python -m`, find adapters in the current directory.
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        report = run_conformance(
            args.adapter, only=args.check, workdir=args.workdir, progress=None if args.quiet else progress
        )
    except KeyError as exc:
        print(f"ckptproto conformance: {exc.args[0]}", file=sys.stderr)
        return 2
    print(render_table(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    return 0 if report.passed else 1 if any(r.status == "fail" for r in report.results) else 3
