"""Check 12, resume sweep: resuming at any step, not only at N, gives the straight run.

A bug often hides at one position: the checkpoint written on an epoch's last batch (Lightning
resumed from it with ``current_epoch`` one too high), the last warmup step, an eval step, or a
save inside a gradient-accumulation window. The sweep trains one trainer from ``S`` and saves
at every point, then resumes each checkpoint into a trainer from ``S + 1`` and trains on to
``T`` steps, comparing with a straight run of ``T`` steps::

    points: epoch boundaries (and the steps either side), the adapter's resume_points,
            then 1, 2, ... T - 1; with micro_steps and train_micro(), saves inside windows
    T:      sweep_steps, else two epochs + 1 (with steps_per_epoch), else N + M + 2

Resumes run in that order of priority until ``check_budget_s``; the summary says how many
points were reached.
"""

from __future__ import annotations

import time
from typing import Any

from ckptproto.conformance.compare import Difference
from ckptproto.conformance.context import CheckFailed, Context


def _plan(ctx: Context) -> tuple[int, list[int], int]:
    """(T in optimizer steps, points in micro-steps in order of priority, micro-steps per step)."""
    caps = ctx.caps
    per_epoch = caps.steps_per_epoch
    default_t = 2 * per_epoch + 1 if per_epoch else ctx.n + ctx.m + 2
    total = caps.sweep_steps or max(default_t, ctx.n + ctx.m, *(p + 1 for p in caps.resume_points))
    micro = caps.micro_steps if caps.micro_steps and hasattr(ctx.adapter, "train_micro") else 1
    first: list[int] = []
    if per_epoch:
        for boundary in range(per_epoch, total, per_epoch):
            first += [boundary, boundary - 1, boundary + 1]
    first += list(caps.resume_points)
    inside = [k * micro + j for k in (1, ctx.n) for j in range(1, micro)] if micro > 1 else []
    ordered = [p * micro for p in first] + inside + [k * micro for k in range(1, total)]
    points = [p for p in dict.fromkeys(ordered) if 0 < p < total * micro and p != ctx.n * micro]
    return total, points, micro


def _advance(ctx: Context, trainer: Any, start: int, stop: int, micro: int) -> None:
    """Train from micro-step ``start`` to ``stop``: whole steps with train(), the rest of a
    window with train_micro()."""
    at = start
    if at % micro and at < stop:
        part = min(micro - at % micro, stop - at)
        ctx.train_micro(trainer, part)
        at += part
    whole = (stop - at) // micro
    ctx.train(trainer, whole)
    at += whole * micro
    if stop > at:
        ctx.train_micro(trainer, stop - at)


def _where(point: int, micro: int) -> str:
    step, part = divmod(point, micro)
    return f"step {step}" if not part else f"step {step} + {part}/{micro} micro-steps"


def resume_sweep(ctx: Context) -> str:
    """12. Resuming at each point of a sweep, then training to T, equals T steps straight."""
    total, points, micro = _plan(ctx)
    deadline = time.monotonic() + ctx.caps.check_budget_s
    straight_trainer = ctx.create(ctx.seed)
    ctx.train(straight_trainer, total)
    expected = ctx.fingerprint(straight_trainer)
    # One trainer saves at every point, in order (check 2 makes sure saving changes nothing).
    checkpoints: dict[int, Any] = {}
    saver = ctx.create(ctx.seed)
    at = 0
    for point in sorted(points):
        _advance(ctx, saver, at, point, micro)
        at = point
        checkpoints[point] = ctx.new_path(f"sweep-{point}")
        ctx.save(saver, checkpoints[point])
        if time.monotonic() > deadline:
            break
    failed: dict[int, list[Difference]] = {}
    done = 0
    for point in points:
        if point not in checkpoints or (done and time.monotonic() > deadline):
            continue
        done += 1
        trainer = ctx.create(ctx.seed + 1)
        ctx.load_into(checkpoints[point], trainer)
        _advance(ctx, trainer, point, total * micro, micro)
        differences = ctx.compare_fingerprints(expected, ctx.fingerprint(trainer))
        if differences:
            failed[point] = differences
    budget = (
        f" (time budget {ctx.caps.check_budget_s:.0f}s reached: {done} of {len(points)} points; "
        "raise check_budget_s to sweep all)"
        if done < len(points)
        else ""
    )
    if failed:
        where = ", ".join(_where(p, micro) for p in sorted(failed))
        shown = [
            Difference(f"at {_where(p, micro)}: {d.path}", d.expected, d.got)
            for p in sorted(failed)
            for d in failed[p][:3]
        ]
        per_epoch = ctx.caps.steps_per_epoch
        on_boundary = per_epoch and any(p % (per_epoch * micro) in (0, micro) for p in failed)
        inside = any(p % micro for p in failed)
        cause = "progress is restored wrongly at some positions only"
        if inside:
            cause = (
                "a save inside a gradient-accumulation window loses the accumulated gradients or "
                "the micro-step counter"
            )
        elif on_boundary:
            cause = (
                "a checkpoint written at an epoch boundary resumes in the wrong epoch or position "
                "(current_epoch advanced twice, or the epoch's last batch replayed / skipped)"
            )
        raise CheckFailed(
            f"resuming at {where} and training to step {total} differs from {total} steps straight "
            f"(resuming at step {ctx.n} is check 4){budget}; first: {shown[0]}",
            shown,
            cause=cause,
            fix="save the counters that decide the position (epoch, batch in epoch, micro-step, "
            "accumulated gradients) and restore them exactly; test the failing positions first",
        )
    return f"resumed at {done} points up to step {total}: each {_equality(ctx)} to the straight run{budget}"


def _equality(ctx: Context) -> str:
    return "equal within tolerance" if ctx.caps.rtol or ctx.caps.atol else "bitwise equal"
