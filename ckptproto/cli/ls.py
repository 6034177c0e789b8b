"""``ckptproto ls ROOT``: the checkpoints under a directory, read from their manifests."""

from __future__ import annotations

import argparse
import math
from typing import Any

from ckptproto.cli.paths import root_problem
from ckptproto.errors import CheckpointNotFoundError
from ckptproto.policy.discovery import CheckpointRecord, order, scan


def register(sub: Any) -> None:
    parser = sub.add_parser("ls", help="list the checkpoints under a directory (step, epoch, metric, size)")
    parser.add_argument("root", metavar="ROOT", help="directory holding checkpoint directories")
    parser.add_argument("--monitor", help="metric to show and rank by (default: the one each manifest names)")
    parser.add_argument("--mode", choices=("min", "max"), help="whether a smaller or larger metric is better")
    parser.set_defaults(run=run)


def human_size(n: int) -> str:
    """``1536 -> '1.5 KiB'``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


def _metric_text(record: CheckpointRecord) -> str:
    if record.monitor is None:
        return "-"
    value = record.metrics.get(record.monitor)
    if isinstance(value, float) and not math.isfinite(value):
        return f"{record.monitor}={value}"
    return f"{record.monitor}={record.metric:.6g}" if record.metric is not None else f"{record.monitor}=-"


def run(args: argparse.Namespace) -> int:
    """Newest first; ``best`` marks the best by the monitored metric, ``last`` the newest.
    Exit status 1 when a directory with a manifest could not be read; 2 (one line on stderr)
    when ROOT is missing, a file, or a checkpoint itself."""
    problem = root_problem(args.root)
    if problem is not None:
        raise CheckpointNotFoundError(problem)
    records, problems = scan(args.root, args.monitor)
    latest = order(records, "latest")
    best = [r for r in order(records, "best", args.mode) if r.metric is not None and math.isfinite(r.metric)]
    rows = [("NAME", "STEP", "EPOCH", "METRIC", "SIZE", "")]
    for r in latest:
        marks = []
        if best and r.path == best[0].path:
            marks.append("best")
        if r.path == latest[0].path:
            marks.append("last")
        rows.append(
            (
                r.name,
                "-" if r.step is None else str(r.step),
                "-" if r.epoch is None else str(r.epoch),
                _metric_text(r),
                human_size(r.nbytes),
                ",".join(marks),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"{len(latest)} checkpoint(s) in {args.root}")
    unreadable = [p for p in problems if "no manifest" not in p]
    for problem in problems:
        print(f"skipped: {problem}")
    return 1 if unreadable else 0
