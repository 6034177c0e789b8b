"""``ckptproto validate PATH... [--json REPORT]``: check checkpoints written by any
implementation against every MUST of spec/FORMAT.md, naming the requirement each breaks."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: Any) -> None:
    parser = sub.add_parser(
        "validate",
        help="check any writer's checkpoint against the format specification",
        description="Report every violation of spec/FORMAT.md, each with its requirement id.",
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint directories")
    parser.add_argument("--json", metavar="REPORT", help="also write the findings as JSON to this file")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """0 when every checkpoint conforms, 1 otherwise."""
    from ckptproto.conformance.validate import RULES, validate
    from ckptproto.policy.locations import local_only

    if args.json:
        local_only(args.json, "--json REPORT")  # refused before any checkpoint is read

    findings: dict[str, list[dict[str, str]]] = {}
    for path in args.paths:
        violations = validate(path)
        findings[path] = [v.to_json() for v in violations]
        if not violations:
            print(f"VALID   {path}")
            continue
        print(f"INVALID {path}  ({len(violations)} violations)")
        for v in violations:
            print(f"  {v}")
        for rule in sorted({v.rule for v in violations}, key=lambda r: int(r.split("-")[1])):
            print(f"  {rule}: {RULES[rule]}")
    if args.json:
        local_only(args.json, "--json REPORT").write_text(
            json.dumps(findings, indent=2) + "\n", encoding="utf-8"
        )
    return 1 if any(findings.values()) else 0
