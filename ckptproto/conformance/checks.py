"""The conformance checks, one function each (rationale: ``spec/CONFORMANCE.md``).

Each check takes a :class:`Context` and returns a summary line, or raises
:class:`CheckFailed` (with the differing paths) or :class:`CheckSkipped`; ``ctx.warn()``
records a warning that does not fail it. The context caches what several checks share: the
straight run, the checkpoint at step N, and the in-process resume.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ckptproto import protocol
from ckptproto._child import python_command
from ckptproto.conformance.compare import Difference, compare_trees
from ckptproto.conformance.context import (
    CheckFailed,
    CheckSkipped,
    Context,
    Guarded,
    InternalError,
    TrainerRaised,
    global_rng_states,
    skeleton,
    snapshot,
    torch_defaults,
)
from ckptproto.conformance.shadow import shadow_state
from ckptproto.conformance.sweep import resume_sweep
from ckptproto.errors import UnsupportedValueError
from ckptproto.io import sync
from ckptproto.tree import encode_state, join_path

SUBPROCESS_TIMEOUT_S = 300.0

__all__ = ["CHECKS", "CHECK_NAMES", "Check", "CheckFailed", "CheckSkipped", "Context", "snapshot"]


def _fail_if(differences: list[Difference], summary: str, *, cause: str = "", fix: str = "") -> None:
    if differences:
        raise CheckFailed(f"{summary}; first: {differences[0]}", differences, cause=cause, fix=fix)


# -- the checks ------------------------------------------------------------------------------


def legal_state(ctx: Context) -> str:
    """1. ``state_dict()`` holds only legal leaves, fresh and after training."""
    trainer = ctx.create(ctx.seed)
    for label in ("a fresh trainer", f"after {ctx.n} steps"):
        if label != "a fresh trainer":
            ctx.train(trainer, ctx.n)
        state = ctx.state(trainer)
        try:
            encoded = encode_state(state)
        except UnsupportedValueError as exc:
            raise CheckFailed(
                f"state_dict() of {label} holds an illegal value at {exc.path or '<root>'}: {exc}",
                [
                    Difference(
                        exc.path, "a legal leaf (tensor, ndarray, None/bool/int/float/str/bytes)", str(exc)
                    )
                ],
            ) from None
    return f"{len(encoded.tensors)} tensors, every leaf legal"


def pure_state_dict(ctx: Context) -> str:
    """2. Calling ``state_dict()`` changes neither the trainer's trajectory nor its next result."""
    control = ctx.create(ctx.seed)
    ctx.train(control, ctx.n)
    ctx.train(control, ctx.m)
    expected = ctx.fingerprint(control)

    probed = ctx.create(ctx.seed)
    ctx.train(probed, ctx.n)
    first = snapshot(ctx.state(probed))
    for _ in range(2):
        second = ctx.state(probed)
    _fail_if(
        compare_trees(first, second, where="state"),
        "two consecutive state_dict() calls returned different states",
    )
    ctx.train(probed, ctx.m)
    _fail_if(
        ctx.compare_fingerprints(expected, ctx.fingerprint(probed)),
        f"calling state_dict() after {ctx.n} steps changed the next {ctx.m} steps",
    )
    return f"3 state_dict() calls after step {ctx.n} left the trajectory unchanged"


def round_trip(ctx: Context) -> str:
    """3. Save, load into a trainer from another seed: the loaded state equals the saved one."""
    original = ctx.create(ctx.seed)
    ctx.train(original, ctx.n)
    path = ctx.new_path("round-trip")
    ctx.save(original, path)
    target = ctx.create(ctx.seed + 1)
    ctx.load_into(path, target)
    differences = compare_trees(ctx.state(original), ctx.state(target), where="state")
    at = differences[0].path if differences else ""
    _fail_if(
        differences,
        f"after loading, a trainer created with seed {ctx.seed + 1} does not hold the saved state",
        cause=f"load_state_dict() does not restore {at} (or restores it altered, e.g. off by one), or "
        "state_dict() reports it differently than it was loaded",
        fix=f"restore {at} exactly as saved",
    )
    return "state after load equals the saved state, bit for bit"


def resume_equivalence(ctx: Context) -> str:
    """4. N + M steps straight equals N steps, save, load into another seed, M steps."""
    differences = ctx.compare_fingerprints(ctx.straight(), ctx.resumed())
    cause, fix = _global_rng_cause(ctx) if differences else ("", "")
    if differences and not cause:
        cause, fix = _resume_cause(differences)
    _fail_if(
        differences,
        f"training {ctx.n} + {ctx.m} steps straight and resuming at step {ctx.n} "
        f"(into a trainer created with seed {ctx.seed + 1}) give different fingerprints",
        cause=cause,
        fix=fix,
    )
    return f"resumed at step {ctx.n} into seed {ctx.seed + 1}: fingerprint {_equality(ctx)}"


# fingerprint key words -> (cause, fix) of a resume difference, most specific first
_RESUME_CAUSES: tuple[tuple[tuple[str, ...], str, str], ...] = (
    (
        ("rng", "random", "generator", "seed", "dropout"),
        "an RNG is not saved or not restored (dropout / augmentation / sampling draws differ)",
        "save torch.get_rng_state() (numpy, random, CUDA, generators you own) in state_dict() and "
        "set them back in load_state_dict() -- in Lightning, in on_save/on_load_checkpoint",
    ),
    (
        ("scale", "scaler"),
        "the GradScaler is not saved or not restored",
        "put scaler.state_dict() in the state and call scaler.load_state_dict() on resume",
    ),
    (
        ("ema", "average", "swa"),
        "the EMA / averaged weights are not saved or not restored",
        "put the EMA's state_dict() in the state and restore it",
    ),
    (
        ("batch", "data", "sample", "index", "order", "position"),
        "the data loader's position or shuffle order is not restored",
        "save the sampler/loader state (torchdata StatefulDataLoader with generator=, or your "
        "sampler's epoch and position) and restore it",
    ),
    (
        ("lr", "learning_rate", "sched"),
        "the LR scheduler (or the counter the LR is computed from) is not restored",
        "save scheduler.state_dict() / the iteration counter and restore it",
    ),
    (
        ("step", "epoch", "iter", "micro", "accum"),
        "a progress counter is not restored, or restored off by one",
        "save the counter in state_dict() and restore it exactly",
    ),
)


def _resume_cause(differences: list[Difference]) -> tuple[str, str]:
    for diff in differences:
        if diff.expected == "the same RNG state":
            return _RESUME_CAUSES[0][1], _RESUME_CAUSES[0][2]
    for diff in differences:
        key = diff.path.lower()
        for words, cause, fix in _RESUME_CAUSES:
            if any(w in key for w in words):
                return cause, fix
    return "", ""


def resume_across_processes(ctx: Context) -> str:
    """5. Save in one subprocess, resume in another: equal to the in-process resume."""
    if ctx.spec is None:
        raise CheckSkipped(
            "the adapter was given as an object with no importable module:Class spec; "
            "pass it as 'package.module:Class' to run this check"
        )
    ckpt = ctx.new_path("subprocess-save")
    out = ctx.new_path("subprocess-fingerprint")
    _child(ctx, "save", ctx.spec, str(ctx.seed), str(ctx.n), str(ckpt))
    _child(ctx, "resume", ctx.spec, str(ctx.seed + 1), str(ckpt), str(ctx.m), str(out))
    got = sync.load(out)["fingerprint"]
    differences = ctx.compare_fingerprints(ctx.resumed(), got)
    if not differences:
        return f"saved in one process, resumed in another: fingerprint {_equality(ctx)}"
    cause, fix = _global_rng_cause(ctx)
    if cause:
        _fail_if(
            differences,
            "resuming in a fresh process differs from resuming in this one, and so does resuming "
            "here with the global RNGs (torch/numpy/random) in another state",
            cause=cause,
            fix=fix,
        )
    _fail_if(
        differences,
        "resuming in a fresh process differs from resuming in the same process",
        cause="state kept outside state_dict() that survives in this process but not a restart: "
        "a module global, a cache (functools.lru_cache), a class attribute",
        fix="move that state into state_dict()/load_state_dict(), or key the cache by "
        "everything it depends on",
    )
    return ""  # unreachable: _fail_if raised


def _global_rng_cause(ctx: Context) -> tuple[str, str]:
    """(cause, fix) naming a global RNG (torch/numpy/random) when one explains a resume
    difference, else ("", "").

    Resuming once more with the global RNGs scrambled differently before create(): if the
    result changes, the trainer draws from a global RNG it neither seeds nor restores. If it
    does not, a global RNG that training draws from, whose end state the trainer decides
    (equal in both resumes) but which ends elsewhere than after the straight run, is saved or
    restored wrongly."""
    again = ctx.create(ctx.seed + 1, salt=ctx.seed + 101)
    ctx.load_into(ctx.checkpoint_at_n(), again)
    before_training = global_rng_states()
    ctx.train(again, ctx.m)
    fix = (
        "save torch.get_rng_state() (numpy, random, CUDA states if used) in state_dict() and set "
        "them back in load_state_dict(), or draw from a generator kept in the state"
    )
    if ctx.compare_fingerprints(ctx.resumed(), ctx.fingerprint(again)):
        return (
            "the resumed run depends on the state of the global RNGs (torch/numpy/random) it "
            "starts with: the trainer draws from a global RNG that load_state_dict() does not "
            "restore",
            fix,
        )
    again_rngs = global_rng_states()
    resumed, straight = ctx.global_rngs_after("resumed"), ctx.global_rngs_after("straight")
    for name in resumed:
        if compare_trees(resumed[name], again_rngs.get(name)):
            continue  # the trainer does not decide this RNG's state
        if not compare_trees(before_training.get(name), again_rngs.get(name)):
            continue  # training does not draw from it (seeded in create() and left alone)
        differences = compare_trees(straight.get(name), resumed[name], where=f"the global {name} RNG")
        if differences:
            how = (
                differences[0].got
                if differences[0].expected == "the same RNG state"
                else "an unrelated state"
            )
            return (
                f"the global {name} RNG ends in another state after the resume than after the "
                f"straight run ({how}): it is not saved, or restored at the wrong moment",
                fix,
            )
    return "", ""


# What a child process does not inherit: launcher variables of this process (a torchrun,
# SLURM or Lightning job running the suite) would make the child join that job's process
# group, or bind its MASTER_PORT (EADDRINUSE). docs/conformance.md lists them.
CHILD_ENV_DROPPED = (
    "MASTER_ADDR",
    "MASTER_PORT",
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "NODE_RANK",
    "PL_GLOBAL_SEED",
    "PL_SEED_WORKERS",
)
CHILD_ENV_DROPPED_PREFIXES = ("TORCHELASTIC_", "SLURM_", "OMPI_", "PMI_", "PMIX_")


def child_environment(parent: Mapping[str, str]) -> dict[str, str]:
    """The environment of a check's subprocess: ``parent`` without launcher variables, with
    PYTHONPATH set so the child imports the adapter as this process does."""
    env = {
        k: v
        for k, v in parent.items()
        if k not in CHILD_ENV_DROPPED and not k.startswith(CHILD_ENV_DROPPED_PREFIXES)
    }
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([os.getcwd(), *paths]))
    return env


def _child(ctx: Context, *args: str) -> None:
    # This very ckptproto first, the adapter's directory next (child_environment).
    command = python_command("ckptproto.conformance.child:start", *args)
    try:
        done = subprocess.run(
            command,
            env=child_environment(os.environ),
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise CheckFailed(
            f"subprocess {' '.join(args[:2])} did not finish in {SUBPROCESS_TIMEOUT_S:.0f}s"
        ) from None
    if done.returncode == 0:
        return
    tail = "\n  ".join((done.stderr or done.stdout).strip().splitlines()[-8:])
    from ckptproto.conformance.child import INTERNAL_EXIT

    if done.returncode == INTERNAL_EXIT:
        raise InternalError(f"ckptproto failed in subprocess '{args[0]}':\n  {tail}")
    raise CheckFailed(f"subprocess '{args[0]}' failed (exit {done.returncode}):\n  {tail}")


def async_resume(ctx: Context) -> str:
    """6. An async save taken while training continues resumes as well as a sync one; the
    snapshot it was handed does not change as training goes on."""
    trainer = ctx.create(ctx.seed)
    ctx.train(trainer, ctx.n)
    # What state_dict() itself returned: ctx.state() would rebuild the containers.
    handed = ctx.call("state_dict()", protocol.state_of, trainer)
    before = snapshot(skeleton(handed))
    ctx.train(trainer, 1)
    _fail_if(
        compare_trees(before, skeleton(handed), where="state"),
        "one more training step changed a state_dict() snapshot taken earlier (state_dict() "
        "returns live containers or values, so a save still in flight records a later step)",
    )
    try:
        from ckptproto.io.async_save import AsyncSaver
    except ImportError:
        raise CheckSkipped("this ckptproto has no AsyncSaver") from None
    trainer = ctx.create(ctx.seed)
    ctx.train(trainer, ctx.n)
    path = ctx.new_path("async")
    with AsyncSaver(staging="background") as saver:
        future = saver.save(Guarded(ctx, trainer), path)
        future.wait_staged()
        ctx.train(trainer, ctx.m)  # training goes on while the checkpoint is written
        future.result()
    _fail_if(
        ctx.compare_fingerprints(ctx.straight(), ctx.fingerprint(trainer)),
        "the trainer that kept training during an async save diverged from the straight run",
    )
    resumed = ctx.create(ctx.seed + 1)
    ctx.load_into(path, resumed)
    ctx.train(resumed, ctx.m)
    _fail_if(
        ctx.compare_fingerprints(ctx.resumed(), ctx.fingerprint(resumed)),
        "resuming from an async checkpoint differs from resuming from a sync one",
    )
    return f"async save at step {ctx.n} while training on: resume {_equality(ctx)}"


UNEXPECTED_KEY = "ckptproto_conformance_unexpected"


@dataclass(frozen=True)
class _Probe:
    path: str  # the key removed, or the key / element added
    what: str  # "missing" or "unexpected"
    keys: tuple[Any, ...]  # the path to the container changed


def _probes(tree: Any, keys: tuple[Any, ...] = ()) -> Iterator[_Probe]:
    """One probe per key and per list element (removed), one per dict and list (an extra
    entry), depth first."""
    where = ".".join(str(k) for k in keys)
    if isinstance(tree, Mapping):
        yield _Probe(join_path(where, UNEXPECTED_KEY), "unexpected", keys)
        for key, value in tree.items():
            yield _Probe(join_path(where, key), "missing", (*keys, key))
            yield from _probes(value, (*keys, key))
    elif isinstance(tree, list):
        yield _Probe(join_path(where, len(tree)), "unexpected", keys)
        for i, value in enumerate(tree):
            yield _Probe(join_path(where, i), "missing", (*keys, i))
            yield from _probes(value, (*keys, i))


def _apply(state: Any, probe: _Probe) -> Any:
    mutated = snapshot(state)
    node = mutated
    keys = probe.keys if probe.what == "unexpected" else probe.keys[:-1]
    for key in keys:
        node = node[key]
    if probe.what == "missing":
        del node[probe.keys[-1]]
    elif isinstance(node, list):
        node.append(snapshot(node[-1]) if node else 0)
    else:
        node[UNEXPECTED_KEY] = 0
    return mutated


def _interleave(probes: list[_Probe]) -> list[_Probe]:
    """Round-robin over top-level sections, shallow probes first, so a time budget that runs
    out still probed every section."""
    by_section: dict[str, list[_Probe]] = {}
    for p in sorted(probes, key=lambda p: len(p.keys)):
        by_section.setdefault(str(p.keys[0]) if p.keys else "", []).append(p)
    out: list[_Probe] = []
    queues = list(by_section.values())
    while any(queues):
        for q in queues:
            if q:
                out.append(q.pop(0))
    return out


def strict_loading(ctx: Context) -> str:
    """7. A state missing a key, or holding an unexpected one, is refused -- or at least the
    trainer that accepts it trains exactly like a correct resume (else: failure)."""
    if not ctx.caps.strict_loading:
        raise CheckSkipped("the adapter declares strict_loading = False")
    saved = sync.load(ctx.checkpoint_at_n())
    reference = ctx.resumed()
    probes = _interleave(list(_probes(saved)))
    deadline = time.monotonic() + ctx.caps.check_budget_s
    refused = late = 0
    accepted: list[str] = []
    diverged: list[Difference] = []
    done = 0
    for probe in probes:
        if done and time.monotonic() > deadline:
            break
        done += 1
        trainer = ctx.create(ctx.seed + 2)
        try:
            ctx.load_state(trainer, _apply(saved, probe))
        except TrainerRaised:  # any refusal counts; its type is the trainer's business
            refused += 1
            continue
        try:
            ctx.train(trainer, ctx.m)
            fp = ctx.fingerprint(trainer)
        except TrainerRaised:  # accepted, but training then stopped loudly: not silent
            late += 1
            continue
        differences = ctx.compare_fingerprints(reference, fp)
        if differences:
            diverged.append(
                Difference(
                    probe.path,
                    f"refused ({probe.what} key) or a run equal to a correct resume",
                    f"accepted, then after {ctx.m} steps {differences[0]}",
                )
            )
        else:
            accepted.append(f"{probe.path} ({probe.what})")
    budget = (
        f" (time budget {ctx.caps.check_budget_s:.0f}s reached: probed {done} of {len(probes)}; "
        "raise check_budget_s to probe all)"
        if done < len(probes)
        else ""
    )
    _fail_if(
        diverged,
        f"load_state_dict() accepted {len(diverged)} of {done} states with a missing or unexpected "
        f"key and then trained differently from a correct resume{budget}",
    )
    if accepted:
        shown = ", ".join(accepted[:5]) + (f" and {len(accepted) - 5} more" if len(accepted) > 5 else "")
        ctx.warn(
            f"load_state_dict() accepted {len(accepted)} states with a missing or unexpected key "
            f"(training then matched a correct resume, so this is harmless here): {shown}"
        )
    return (
        f"probed {done} states with a missing or unexpected key: {refused} refused, "
        f"{late} raised in training, {len(accepted)} accepted without effect{budget}"
    )


def repeated_load(ctx: Context) -> str:
    """8. Loading twice equals loading once; keeping (aliasing) the loaded buffers is a
    warning unless it changes the resumed run."""
    path = ctx.checkpoint_at_n()
    trainer = ctx.create(ctx.seed + 1)
    ctx.load_into(path, trainer)
    once = snapshot(ctx.state(trainer))
    ctx.load_into(path, trainer)
    _fail_if(
        compare_trees(once, ctx.state(trainer), where="state"),
        "loading twice differs from loading once",
        cause="load_state_dict() depends on the state it loads into (it adds to counters, "
        "appends to lists or merges dicts instead of replacing them)",
        fix="make load_state_dict() replace every value it restores",
    )

    # The same resume twice, from the same seed: through load_into, and through
    # load_state_dict() of a dict the caller still holds (and might load again).
    control = ctx.resume(path, ctx.seed + 2, ctx.m)
    loaded = sync.load(path)
    pristine = snapshot(loaded)
    trainer = ctx.create(ctx.seed + 2)
    ctx.load_state(trainer, loaded)
    right_after = compare_trees(pristine, loaded, where="state")
    ctx.train(trainer, ctx.m)
    _fail_if(
        ctx.compare_fingerprints(ctx.fingerprint(control), ctx.fingerprint(trainer)),
        "a trainer loaded with load_state_dict(ckptproto.load(path)) trains differently from "
        "one loaded with ckptproto.load_into(path, trainer)",
        cause="load_state_dict() keeps (aliases) or consumes the dict it is given, and that "
        "changes the resumed run",
        fix="copy what load_state_dict() keeps (copy.deepcopy for torch.optim state)",
    )
    after = compare_trees(pristine, loaded, where="state")
    if right_after:
        ctx.warn(
            f"load_state_dict() changed the dict it was given while loading (first: "
            f"{right_after[0]}): it pops or replaces entries; harmless in a job that drops the "
            "dict, wrong for a caller that loads the same dict again"
        )
    elif after:
        ctx.warn(
            f"training {ctx.m} steps after load_state_dict() changed the dict it was loaded from "
            f"(first: {after[0]}): the trainer keeps the given tensors instead of copying them "
            "(torch.optim.Optimizer.load_state_dict does); harmless in a job that drops the dict"
        )
    if right_after or after:
        return "loading twice equals once; the loaded dict is kept or changed (warning)"
    return "loading twice equals once; loaded buffers are not aliased"


def trainer_metadata(ctx: Context) -> str:
    """9. ``trainer.global_step`` and ``trainer.current_epoch`` are present and advance."""
    trainer = ctx.create(ctx.seed)

    def progress(when: str) -> tuple[int, int]:
        section = ctx.state(trainer).get(protocol.TRAINER)
        if not isinstance(section, Mapping):
            raise CheckFailed(
                f"state_dict() of {when} has no 'trainer' section",
                [Difference("trainer", "a dict with global_step and current_epoch", repr(section))],
            )
        values = []
        for key in (protocol.GLOBAL_STEP, protocol.CURRENT_EPOCH):
            value = section.get(key)
            if type(value) is not int or value < 0:
                raise CheckFailed(
                    f"{when}: trainer.{key} must be a non-negative int, got {value!r}",
                    [Difference(f"trainer.{key}", "a non-negative int", repr(value))],
                )
            values.append(value)
        return values[0], values[1]

    step0, epoch0 = progress("a fresh trainer")
    ctx.train(trainer, ctx.n)
    step1, epoch1 = progress(f"the trainer after {ctx.n} steps")
    if step1 != step0 + ctx.n:
        raise CheckFailed(
            f"trainer.global_step went from {step0} to {step1} over {ctx.n} optimizer steps",
            [Difference("trainer.global_step", str(step0 + ctx.n), str(step1))],
        )
    if epoch1 < epoch0:
        raise CheckFailed(
            "trainer.current_epoch went backwards",
            [Difference("trainer.current_epoch", f">= {epoch0}", str(epoch1))],
        )
    detail = ""
    per_epoch = ctx.caps.steps_per_epoch
    if per_epoch is not None:
        ctx.train(trainer, per_epoch)
        _step2, epoch2 = progress(f"the trainer after {ctx.n + per_epoch} steps")
        if epoch2 != epoch1 + 1:
            raise CheckFailed(
                f"trainer.current_epoch went from {epoch1} to {epoch2} over one epoch ({per_epoch} steps)",
                [Difference("trainer.current_epoch", str(epoch1 + 1), str(epoch2))],
            )
        detail = f", current_epoch {epoch1} -> {epoch2} over one epoch"
    info = sync.read_info(ctx.checkpoint_at_n())
    if info.step != step0 + ctx.n:
        raise CheckFailed(
            "the checkpoint's metadata does not record the trainer's step",
            [Difference("metadata.step", str(step0 + ctx.n), repr(info.step))],
        )
    return f"global_step {step0} -> {step1}{detail}"


def format_conformance(ctx: Context) -> str:
    """10. The golden checkpoints decode to their expected values and pass ``validate``; so
    does this trainer's own checkpoint. Run with torch's global flags at their defaults: the
    trainer's (e.g. deterministic algorithms) are its own business, not the format's."""
    from ckptproto.conformance import golden
    from ckptproto.conformance.validate import validate

    checkpoint = ctx.checkpoint_at_n()  # the trainer's run, under the trainer's flags
    problems: list[Difference] = []
    decoded = 0
    skipped: list[str] = []
    try:
        with torch_defaults():
            for name in golden.names():
                for v in validate(golden.path(name)):
                    problems.append(Difference(f"golden/{name}", "no violation", str(v)))
                try:
                    problems.extend(golden.check_decoded(name))
                    decoded += 1
                except golden.NeedsTorch:
                    skipped.append(name)
            for v in validate(checkpoint):
                problems.append(Difference("trainer checkpoint", "no violation", str(v)))
    except Exception as exc:
        raise InternalError(
            f"ckptproto's own golden decoding or validate raised {type(exc).__qualname__}: {exc}"
        ) from exc
    golden_problems = [p for p in problems if p.path.startswith("golden/")]
    if golden_problems:
        raise InternalError(
            f"{len(golden_problems)} golden checkpoints do not decode to their expected values with "
            f"this ckptproto; first: {golden_problems[0]}"
        )
    _fail_if(problems, f"the trainer's checkpoint has {len(problems)} format problems")
    note = f" ({', '.join(skipped)} need torch to decode: skipped)" if skipped else ""
    return f"{decoded} golden checkpoints decode and validate; the trainer's checkpoint validates{note}"


def _equality(ctx: Context) -> str:
    if ctx.caps.rtol or ctx.caps.atol:
        return f"equal within rtol={ctx.caps.rtol}, atol={ctx.caps.atol}"
    return "bitwise equal"


@dataclass(frozen=True)
class Check:
    number: int
    name: str
    title: str
    run: Callable[[Context], str]


CHECKS: tuple[Check, ...] = (
    Check(1, "legal_state", "state_dict() holds only legal leaves", legal_state),
    Check(2, "pure_state_dict", "state_dict() does not change training", pure_state_dict),
    Check(3, "round_trip", "save then load into another seed: state equal", round_trip),
    Check(4, "resume_equivalence", "train N+M == train N, resume, train M", resume_equivalence),
    Check(5, "resume_across_processes", "save and resume in separate processes", resume_across_processes),
    Check(6, "async_resume", "async save while training resumes like a sync one", async_resume),
    Check(7, "strict_loading", "missing or unexpected keys refused, or without effect", strict_loading),
    Check(8, "repeated_load", "loading twice == once; aliasing does not change the run", repeated_load),
    Check(
        9, "trainer_metadata", "trainer.global_step / current_epoch present and advancing", trainer_metadata
    ),
    Check(10, "format_conformance", "golden checkpoints decode; outputs validate", format_conformance),
    Check(11, "shadow_state", "no state outside state_dict() differs after a resume", shadow_state),
    Check(12, "resume_sweep", "resuming at every step of a sweep equals the straight run", resume_sweep),
)
CHECK_NAMES = tuple(c.name for c in CHECKS)
