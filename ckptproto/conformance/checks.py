"""The ten conformance checks, one function each (rationale: ``spec/CONFORMANCE.md``).

Each check takes a :class:`Context` and returns a summary line, or raises
:class:`CheckFailed` (with the differing paths) or :class:`CheckSkipped`. The context caches
what several checks share: the straight run's fingerprint, the checkpoint at step N, and the
in-process resume.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ckptproto import arrays, protocol
from ckptproto.conformance.adapter import Capabilities, TrainerAdapter
from ckptproto.conformance.compare import Difference, compare_trees, describe_array, is_array
from ckptproto.errors import UnsupportedValueError
from ckptproto.io import sync
from ckptproto.io.prepare import resolve_statefuls
from ckptproto.tree import encode_state

SUBPROCESS_TIMEOUT_S = 300.0


class CheckFailed(Exception):
    """A check found the trainer misbehaving; ``differences`` name the paths at fault."""

    def __init__(self, summary: str, differences: list[Difference] | None = None) -> None:
        super().__init__(summary)
        self.summary = summary
        self.differences = list(differences or [])


class CheckSkipped(Exception):
    """A check does not apply (the adapter declared so, or something it needs is missing)."""


class Context:
    """One adapter under test, a scratch directory, and results shared between checks."""

    def __init__(self, adapter: TrainerAdapter, workdir: Path, spec: str | None) -> None:
        self.adapter = adapter
        self.caps = Capabilities.of(adapter)
        self.workdir = workdir
        self.spec = spec
        self._cache: dict[str, Any] = {}
        self._counter = 0

    @property
    def seed(self) -> int:
        return self.caps.seed

    @property
    def n(self) -> int:
        return self.caps.resume_steps[0]

    @property
    def m(self) -> int:
        return self.caps.resume_steps[1]

    def create(self, seed: int) -> Any:
        return self.adapter.create(seed)

    def train(self, trainer: Any, steps: int) -> None:
        self.adapter.train(trainer, steps)

    def fingerprint(self, trainer: Any) -> dict[str, Any]:
        """A copy of the adapter's fingerprint, so later training cannot change it."""
        fp = self.adapter.fingerprint(trainer)
        if not isinstance(fp, Mapping):
            raise CheckFailed(f"fingerprint() returned {type(fp).__qualname__}, not a mapping")
        copied: dict[str, Any] = snapshot(dict(fp))
        return copied

    def new_path(self, label: str) -> Path:
        self._counter += 1
        return self.workdir / f"{self._counter:02d}-{label}"

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    # -- shared runs -------------------------------------------------------------------------

    def straight(self) -> dict[str, Any]:
        """Fingerprint after N + M steps in one go, from ``seed``."""

        def run() -> dict[str, Any]:
            trainer = self.create(self.seed)
            self.train(trainer, self.n + self.m)
            return self.fingerprint(trainer)

        result: dict[str, Any] = self.cached("straight", run)
        return result

    def checkpoint_at_n(self) -> Path:
        """A checkpoint (ckptproto.save) of a trainer from ``seed`` after N steps."""

        def run() -> Path:
            trainer = self.create(self.seed)
            self.train(trainer, self.n)
            path = self.new_path(f"step{self.n}")
            sync.save(trainer, path)
            return path

        path: Path = self.cached("checkpoint", run)
        return path

    def resumed(self) -> dict[str, Any]:
        """Fingerprint of a trainer from another seed, loaded from step N and trained M steps."""

        def run() -> dict[str, Any]:
            trainer = self.create(self.seed + 1)
            sync.load_into(self.checkpoint_at_n(), trainer)
            self.train(trainer, self.m)
            return self.fingerprint(trainer)

        result: dict[str, Any] = self.cached("resumed", run)
        return result

    def compare_fingerprints(self, expected: Any, got: Any) -> list[Difference]:
        return compare_trees(expected, got, where="fingerprint", rtol=self.caps.rtol, atol=self.caps.atol)


def snapshot(tree: Any) -> Any:
    """A deep copy of a state tree: containers rebuilt, tensors and arrays cloned."""
    if isinstance(tree, np.ndarray):
        return tree.copy()
    if arrays.is_torch_tensor(tree):
        return tree.detach().clone()
    if isinstance(tree, Mapping):
        copied = type(tree)() if type(tree) is not dict and isinstance(tree, MutableMapping) else {}
        for k, v in tree.items():
            copied[k] = snapshot(v)
        return copied
    if isinstance(tree, list):
        return [snapshot(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(snapshot(v) for v in tree)
    return tree


def skeleton(tree: Any) -> Any:
    """A tree's structure and plain values, with each tensor replaced by its dtype and shape."""
    if is_array(tree):
        return f"<{describe_array(tree)}>"
    if isinstance(tree, Mapping):
        return {k: skeleton(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(skeleton(v) for v in tree)
    return tree


def _state(trainer: Any) -> Mapping[str, Any]:
    """The trainer's state as ``save`` sees it: Statefuls nested in its dicts (PROTOCOL.md
    [P-2]) replaced by their own ``state_dict()``."""
    try:
        return resolve_statefuls(protocol.state_of(trainer))
    except UnsupportedValueError as exc:
        raise CheckFailed(str(exc)) from None


def _fail_if(differences: list[Difference], summary: str) -> None:
    if differences:
        raise CheckFailed(f"{summary}; first: {differences[0]}", differences)


# -- the checks ------------------------------------------------------------------------------


def legal_state(ctx: Context) -> str:
    """1. ``state_dict()`` holds only legal leaves, fresh and after training."""
    trainer = ctx.create(ctx.seed)
    for label in ("a fresh trainer", f"after {ctx.n} steps"):
        if label != "a fresh trainer":
            ctx.train(trainer, ctx.n)
        try:
            encoded = encode_state(_state(trainer))
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
    first = snapshot(_state(probed))
    for _ in range(2):
        second = _state(probed)
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
    sync.save(original, path)
    target = ctx.create(ctx.seed + 1)
    sync.load_into(path, target)
    _fail_if(
        compare_trees(_state(original), _state(target), where="state"),
        f"after loading, a trainer created with seed {ctx.seed + 1} does not hold the saved state",
    )
    return "state after load equals the saved state, bit for bit"


def resume_equivalence(ctx: Context) -> str:
    """4. N + M steps straight equals N steps, save, load into another seed, M steps."""
    _fail_if(
        ctx.compare_fingerprints(ctx.straight(), ctx.resumed()),
        f"training {ctx.n} + {ctx.m} steps straight and resuming at step {ctx.n} "
        f"(into a trainer created with seed {ctx.seed + 1}) give different fingerprints",
    )
    return f"resumed at step {ctx.n} into seed {ctx.seed + 1}: fingerprint {_equality(ctx)}"


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
    _fail_if(
        ctx.compare_fingerprints(ctx.resumed(), got),
        "resuming in a fresh process differs from resuming in the same process (state kept "
        "outside state_dict(), e.g. in a module global, a cache or a class attribute)",
    )
    return f"saved in one process, resumed in another: fingerprint {_equality(ctx)}"


def _child(ctx: Context, *args: str) -> None:
    env = dict(os.environ)
    # The child imports the adapter exactly as this process does.
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([os.getcwd(), *paths]))
    command = [sys.executable, "-m", "ckptproto.conformance.child", *args]
    try:
        done = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise CheckFailed(
            f"subprocess {' '.join(args[:2])} did not finish in {SUBPROCESS_TIMEOUT_S:.0f}s"
        ) from None
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-8:]
        raise CheckFailed(f"subprocess '{args[0]}' failed (exit {done.returncode}):\n  " + "\n  ".join(tail))


def async_resume(ctx: Context) -> str:
    """6. An async save taken while training continues resumes as well as a sync one; the
    snapshot it was handed does not change as training goes on."""
    trainer = ctx.create(ctx.seed)
    ctx.train(trainer, ctx.n)
    # What state_dict() itself returned: _state() would rebuild the containers.
    try:
        handed = protocol.state_of(trainer)
    except UnsupportedValueError as exc:
        raise CheckFailed(str(exc)) from None
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
        future = saver.save(trainer, path)
        future.wait_staged()
        ctx.train(trainer, ctx.m)  # training goes on while the checkpoint is written
        future.result()
    _fail_if(
        ctx.compare_fingerprints(ctx.straight(), ctx.fingerprint(trainer)),
        "the trainer that kept training during an async save diverged from the straight run",
    )
    resumed = ctx.create(ctx.seed + 1)
    sync.load_into(path, resumed)
    ctx.train(resumed, ctx.m)
    _fail_if(
        ctx.compare_fingerprints(ctx.resumed(), ctx.fingerprint(resumed)),
        "resuming from an async checkpoint differs from resuming from a sync one",
    )
    return f"async save at step {ctx.n} while training on: resume {_equality(ctx)}"


def strict_loading(ctx: Context) -> str:
    """7. A state missing a key, or holding an unexpected one, is refused."""
    if not ctx.caps.strict_loading:
        raise CheckSkipped("the adapter declares strict_loading = False")
    saved = sync.load(ctx.checkpoint_at_n())
    unexpected_key = "ckptproto_conformance_unexpected"
    cases: list[tuple[str, str, dict[str, Any]]] = []
    sections = sorted(k for k, v in saved.items() if isinstance(v, Mapping))
    for keys in [_first_leaf_keys(saved[s], [s]) for s in sections] or [_first_leaf_keys(saved, [])]:
        if not keys:
            continue
        mutated = snapshot(saved)
        del _parent(mutated, keys)[keys[-1]]
        cases.append((".".join(keys), "refused: the key is missing", mutated))
        mutated = snapshot(saved)
        _parent(mutated, keys)[unexpected_key] = 0
        cases.append((".".join([*keys[:-1], unexpected_key]), "refused: unexpected key", mutated))
    accepted: list[Difference] = []
    for path, expected, state in cases:
        trainer = ctx.create(ctx.seed + 2)
        try:
            trainer.load_state_dict(state)
        except Exception:  # any refusal counts; its type is the trainer's business
            continue
        accepted.append(Difference(path, expected, "accepted by load_state_dict()"))
    _fail_if(
        accepted,
        f"load_state_dict() accepted {len(accepted)} of {len(cases)} malformed states (declare "
        "strict_loading = False if the trainer is meant to load partial states)",
    )
    return f"refused all {len(cases)} states with a missing or unexpected key"


def _first_leaf_keys(node: Any, keys: list[str]) -> list[str]:
    """The keys leading to the first leaf under ``node`` through string-keyed dicts."""
    if isinstance(node, Mapping):
        for key, value in node.items():
            if type(key) is str:
                found = _first_leaf_keys(value, [*keys, key])
                if found:
                    return found
        return []
    return keys


def _parent(tree: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    node = tree
    for key in keys[:-1]:
        node = node[key]
    return node


def repeated_load(ctx: Context) -> str:
    """8. Loading twice equals loading once; training after a load leaves the loaded state alone."""
    path = ctx.checkpoint_at_n()
    trainer = ctx.create(ctx.seed + 1)
    sync.load_into(path, trainer)
    once = snapshot(_state(trainer))
    sync.load_into(path, trainer)
    _fail_if(compare_trees(once, _state(trainer), where="state"), "loading twice differs from loading once")

    loaded = sync.load(path)
    pristine = snapshot(loaded)
    trainer = ctx.create(ctx.seed + 2)
    trainer.load_state_dict(loaded)
    ctx.train(trainer, ctx.m)
    _fail_if(
        compare_trees(pristine, loaded, where="state"),
        f"training {ctx.m} steps changed the state dict the trainer was loaded from: "
        "load_state_dict() keeps the given buffers instead of copying them",
    )
    later = ctx.create(ctx.seed + 3)
    later.load_state_dict(loaded)
    _fail_if(
        compare_trees(_state(later), once, where="state"),
        "a later load of the same state gives a different trainer state",
    )
    return "loading twice equals once; loaded buffers are not aliased"


def trainer_metadata(ctx: Context) -> str:
    """9. ``trainer.global_step`` and ``trainer.current_epoch`` are present and advance."""
    trainer = ctx.create(ctx.seed)

    def progress(when: str) -> tuple[int, int]:
        section = _state(trainer).get(protocol.TRAINER)
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
    does this trainer's own checkpoint."""
    from ckptproto.conformance import golden
    from ckptproto.conformance.validate import validate

    problems: list[Difference] = []
    decoded = 0
    skipped: list[str] = []
    for name in golden.names():
        for v in validate(golden.path(name)):
            problems.append(Difference(f"golden/{name}", "no violation", str(v)))
        try:
            problems.extend(golden.check_decoded(name))
            decoded += 1
        except golden.NeedsTorch:
            skipped.append(name)
    for v in validate(ctx.checkpoint_at_n()):
        problems.append(Difference("trainer checkpoint", "no violation", str(v)))
    _fail_if(problems, f"{len(problems)} format problems")
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
    Check(7, "strict_loading", "missing or unexpected keys are refused", strict_loading),
    Check(8, "repeated_load", "loading twice == once; no aliasing of loaded buffers", repeated_load),
    Check(
        9, "trainer_metadata", "trainer.global_step / current_epoch present and advancing", trainer_metadata
    ),
    Check(10, "format_conformance", "golden checkpoints decode; outputs validate", format_conformance),
)
CHECK_NAMES = tuple(c.name for c in CHECKS)
