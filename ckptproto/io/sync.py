"""The reference synchronous saver and loader: ``save``, ``load``, ``load_into``, ``verify``."""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Mapping, MutableMapping
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np

from ckptproto import _gc, arrays, protocol
from ckptproto.arrays import ArraySpec
from ckptproto.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointFormatError,
    StateMismatchError,
    UnsupportedValueError,
)
from ckptproto.format import layout
from ckptproto.format.info import CheckpointInfo
from ckptproto.format.manifest import Manifest, TensorEntry
from ckptproto.io import commit, reader, writer
from ckptproto.io.plan import Piece, plan_file, unique_keys
from ckptproto.protocol import Stateful
from ckptproto.tree import MAX_DEPTH, EncodedState, decode_tree, encode_state, join_path

PathLike = str | os.PathLike[str]
Timeout = timedelta | float | None
_PLAIN = (type(None), bool, int, float, str, bytes, list, tuple)
WRITER = "ckptproto 0.1.0"


def as_timeout(timeout: Timeout) -> timedelta | None:
    """``timeout=`` of the top-level API as a timedelta (None: torch.distributed's default of
    30 minutes); ValueError for anything but a positive number of seconds or timedelta."""
    if timeout is None:
        return None
    if isinstance(timeout, timedelta):
        seconds = timeout.total_seconds()
    elif isinstance(timeout, (int, float)) and not isinstance(timeout, bool):
        seconds = float(timeout)
    else:
        raise ValueError(f"timeout must be seconds or a datetime.timedelta, got {timeout!r}")
    if not seconds > 0:
        raise ValueError(f"timeout must be positive, got {timeout!r}")
    return timedelta(seconds=seconds)


def encode_metadata(metadata: Mapping[str, Any] | None, state: Mapping[str, Any]) -> Any:
    """User metadata (plain values only), with ``step``/``epoch`` filled in from the canonical
    ``trainer`` section when the caller did not give them."""
    meta = dict(metadata or {})
    step, epoch = protocol.trainer_progress(state)
    if step is not None:
        meta.setdefault("step", step)
    if epoch is not None:
        meta.setdefault("epoch", epoch)
    try:
        encoded = encode_state(meta)
    except UnsupportedValueError as exc:
        raise UnsupportedValueError(f"metadata: {exc}", path=f"metadata.{exc.path}") from None
    if encoded.tensors:
        raise UnsupportedValueError(
            f"metadata.{encoded.tensors[0].path}: metadata holds plain values only, not tensors",
            path=f"metadata.{encoded.tensors[0].path}",
        )
    return encoded.tree


def build_manifest(
    encoded: EncodedState, metadata_tree: Any, files: dict[str, Any], tensors: list[TensorEntry]
) -> Manifest:
    return Manifest(
        state=encoded.tree,
        tensors=tensors,
        files=files,
        metadata=metadata_tree,
        created=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        writer=WRITER,
    )


def whole_tensor_pieces(encoded: EncodedState) -> list[Piece]:
    keys = unique_keys([t.path for t in encoded.tensors])
    return [
        Piece(i, key, leaf.spec, (0,) * len(leaf.spec.shape))
        for i, (leaf, key) in enumerate(zip(encoded.tensors, keys, strict=True))
    ]


def write_checkpoint(
    final: Path, encoded: EncodedState, metadata_tree: Any, sources: list[memoryview], *, overwrite: bool
) -> CheckpointInfo:
    """Plan, write and atomically commit a single-writer checkpoint from host byte views.

    The collector is paused only while the plan and the manifest are built (the async saver
    runs this beside training, whose allocations should not lose their collections for the
    seconds the bytes take to reach the disk)."""
    with _gc.paused():
        file_plan = plan_file(layout.data_file_name(0), 0, whole_tensor_pieces(encoded))
    temp = commit.begin(final, overwrite=overwrite)
    try:
        file_entry = writer.write_file(temp, file_plan, sources)
        with _gc.paused():
            chunks = file_plan.chunks()
            tensors = [
                TensorEntry(leaf.spec.dtype, leaf.spec.shape, (chunks[i],))
                for i, leaf in enumerate(encoded.tensors)
            ]
            manifest = build_manifest(encoded, metadata_tree, {file_plan.name: file_entry}, tensors)
            manifest_bytes = manifest.to_json()
        writer.write_small_file(temp, layout.MANIFEST_NAME, manifest_bytes)
    except BaseException:
        commit.abort(temp)
        raise
    commit.finish(temp, final, overwrite=overwrite)
    return CheckpointInfo.from_manifest(final, manifest, _decode_metadata(manifest, final))


@_gc.paused()
def save(
    state_or_stateful: Stateful | Mapping[str, Any],
    path: PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    process_group: Any = None,
    timeout: Timeout = None,
) -> CheckpointInfo:
    """Save a state (or anything with ``state_dict()``) as a committed checkpoint directory::

        info = ckptproto.save({"models": {"model": model}, "trainer": {"global_step": 10}},
                              "checkpoints/checkpoint_step_10", metadata={"metrics": {"loss": 0.3}})

    Every value is checked before any byte is written (UnsupportedValueError names the path).
    The directory appears atomically, fully written and fsynced, or not at all.

    ``process_group``: under torch.distributed (by default, the world group once it is
    initialised) every rank calls ``save`` and writes its share; see ``docs/distributed.md``.
    ``process_group="local"`` saves from this process alone.

    ``timeout`` (seconds or a ``datetime.timedelta``; default 30 minutes, torch.distributed's
    own): under torch.distributed, how long a rank waits for the others at each step before
    every rank raises DistributedCheckpointError naming the ranks that failed or hung. A single
    process never waits for anyone: there it is only checked.
    """
    limit = as_timeout(timeout)
    group = _group(process_group)
    if group is not None:
        from ckptproto.io import distributed

        return distributed.save(
            state_or_stateful,
            path,
            metadata=metadata,
            overwrite=overwrite,
            process_group=group,
            timeout=limit,
        )
    state = _resolve_statefuls(protocol.state_of(state_or_stateful))
    encoded = encode_state(state)
    if any(leaf.shard is not None for leaf in encoded.tensors):
        leaf = next(leaf for leaf in encoded.tensors if leaf.shard is not None)
        raise UnsupportedValueError(
            f"{leaf.path}: a DTensor is saved by all ranks of a process group; "
            "do not pass process_group='local'",
            path=leaf.path,
        )
    metadata_tree = encode_metadata(metadata, state)
    hosted = [arrays.to_host_bytes(leaf.value) for leaf in encoded.tensors]  # owners kept alive
    sources = [view for view, _owner in hosted]
    return write_checkpoint(Path(path), encoded, metadata_tree, sources, overwrite=overwrite)


def _group(process_group: Any) -> Any:
    """The torch.distributed group to run on, or None for this process alone."""
    if process_group is None and "torch.distributed" not in sys.modules:
        return None  # nothing to import: torch.distributed was never loaded
    from ckptproto.io import distributed

    return distributed.resolve_group(process_group)


def _resolve_statefuls(state: Mapping[str, Any]) -> dict[str, Any]:
    """Replace Stateful objects held in (nested) dicts of a state by their ``state_dict()``,
    so ``{"models": {"model": model}, "optimizers": {"optimizer": opt}}`` saves as expected."""

    active: set[int] = set()  # dicts and Statefuls on the current path, to catch cycles

    def walk(value: Any, path: str, depth: int) -> Any:
        kind = type(value)
        if kind is not dict and (kind in _PLAIN or kind is np.ndarray or arrays.is_torch_tensor(value)):
            return value  # leaves, lists, tuples: encode_state checks them
        stateful = kind is not dict and isinstance(value, Stateful) and not isinstance(value, Mapping)
        if kind is not dict and not stateful:
            return value
        # The encoder refuses these too, but only after this walk: it must not recurse first.
        if depth >= MAX_DEPTH:
            raise UnsupportedValueError(
                f"state nests deeper than {MAX_DEPTH} levels at {path or '<root>'}", path=path
            )
        if id(value) in active:
            raise UnsupportedValueError(f"state contains a reference cycle at {path or '<root>'}", path=path)
        active.add(id(value))
        try:
            if stateful:
                return walk(protocol.state_of(value), path, depth)
            return {k: walk(v, join_path(path, k), depth + 1) for k, v in value.items()}
        finally:
            active.discard(id(value))

    active.add(id(state))
    resolved = {k: walk(v, join_path("", k), 1) for k, v in state.items()}
    # module.state_dict() is an OrderedDict: keep it one, as at any other depth of the tree.
    return OrderedDict(resolved) if type(state) is OrderedDict else resolved


def _decode_metadata(manifest: Manifest, path: Path) -> dict[str, Any]:
    def no_tensors(kind: str, index: int, p: str) -> Any:
        raise CheckpointFormatError(f"{path}: metadata.{p} refers to a tensor")

    meta = decode_tree(manifest.metadata, no_tensors, where=f"{path / layout.MANIFEST_NAME} (metadata)")
    if not isinstance(meta, dict):
        raise CheckpointFormatError(f"{path / layout.MANIFEST_NAME}: metadata must be an object")
    return meta


def read_info(path: PathLike) -> CheckpointInfo:
    """What a checkpoint says about itself (reads only the manifest)::

    info = ckptproto.read_info("checkpoints/checkpoint_step_10")
    print(info.step, info.metrics)
    """
    manifest = reader.read_manifest(path)
    return CheckpointInfo.from_manifest(Path(path), manifest, _decode_metadata(manifest, Path(path)))


@_gc.paused()
def load(
    path: PathLike,
    *,
    map_location: Any = None,
    mmap: bool = False,
    verify: bool | None = None,
    process_group: Any = None,
    timeout: Timeout = None,
) -> dict[str, Any]:
    """Load the whole state tree::

        state = ckptproto.load("checkpoints/checkpoint_step_10", map_location="cpu")
        print(state["trainer"]["global_step"])

    With ``mmap=True`` tensors are backed by the files (copy-on-write) and read lazily: no
    memory is reserved up front (a checkpoint larger than free memory maps), pages are copied
    only where you write, and until then a tensor shows its file, so a file changed under
    the map changes the tensors (committed checkpoints are never rewritten in place).
    ``verify`` (default: on, off with ``mmap``) compares every data file's CRC while reading.
    Under torch.distributed every rank loads the full state and checks that all ranks loaded
    the same checkpoint (``process_group="local"``: this process alone), waiting at most
    ``timeout`` for the others (as for :func:`save`).
    """
    limit = as_timeout(timeout)
    group = _group(process_group)
    if group is not None:
        from ckptproto.io import distributed

        return distributed.load(
            path, map_location=map_location, mmap=mmap, verify=verify, process_group=group, timeout=limit
        )
    return load_local(path, map_location=map_location, mmap=mmap, verify=verify)[0]


def load_local(
    path: PathLike, *, map_location: Any = None, mmap: bool = False, verify: bool | None = None
) -> tuple[dict[str, Any], Manifest]:
    """``load`` in this process alone; also returns the manifest of the generation it read."""
    root = Path(path)
    with reader.OpenCheckpoint(root) as ckpt:
        where = str(root / layout.MANIFEST_NAME)
        kinds = reader.tensor_kinds(ckpt.manifest, where)
        _decode_metadata(ckpt.manifest, root)  # the manifest is refused whole, not in part
        values = reader.materialize(
            ckpt, kinds, use_mmap=mmap, verify=(not mmap) if verify is None else verify
        )
    moved = {i: arrays.to_device(v, map_location) for i, v in values.items()}
    # The manifest's last use: decode its state in place (one tree in memory, not two).
    state = decode_tree(ckpt.manifest.state, lambda kind, index, p: moved[index], where=where, in_place=True)
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{where}: the state must be an object at the top level")
    return state, ckpt.manifest


class _Ref:
    """Placeholder for a checkpoint tensor while matching against a target."""

    __slots__ = ("index", "kind")

    def __init__(self, kind: str, index: int) -> None:
        self.kind, self.index = kind, index


@_gc.paused()
def load_into(
    path: PathLike,
    target: Stateful | MutableMapping[str, Any],
    *,
    strict: bool = True,
    verify: bool = True,
    process_group: Any = None,
    timeout: Timeout = None,
) -> CheckpointInfo:
    """Load a checkpoint into existing objects, reading tensor bytes straight into the target's
    own tensors (no intermediate copy of the state)::

        ckptproto.load_into("checkpoints/checkpoint_step_10", model)            # a Stateful
        ckptproto.load_into("checkpoints/checkpoint_step_10", {"w": weight})    # a tree

    ``strict``: every key and tensor of the target must be in the checkpoint with the same
    shape and dtype (StateMismatchError lists what is missing); for a plain tree target the
    checkpoint must not hold keys the target lacks either. A Stateful target receives the
    full checkpoint state through its own ``load_state_dict``, which applies its own checks.

    If the checkpoint turns out to be corrupt (CheckpointCorruptError), the target's tensors
    may already hold some of its bytes: load again from a good checkpoint.

    Under torch.distributed (``process_group``, by default the world group once initialised)
    DTensor targets such as FSDP2 parameters receive only their local shard; see
    ``docs/distributed.md``; ``timeout`` as for :func:`save`.
    """
    limit = as_timeout(timeout)
    group = _group(process_group)
    if group is not None:
        from ckptproto.io import distributed

        return distributed.load_into(
            path, target, strict=strict, verify=verify, process_group=group, timeout=limit
        )
    root = Path(path)
    is_stateful = _is_stateful(target)
    if not is_stateful and not isinstance(target, MutableMapping):
        raise StateMismatchError(f"load_into needs a Stateful or a dict, got {type(target).__qualname__}")
    with reader.OpenCheckpoint(root) as ckpt:
        where = str(root / layout.MANIFEST_NAME)
        metadata = _decode_metadata(ckpt.manifest, root)  # refuse a bad manifest before writing
        kinds = reader.tensor_kinds(ckpt.manifest, where)
        refs: dict[int, _Ref] = {}
        skeleton = decode_tree(
            ckpt.manifest.state, lambda kind, index, p: refs.setdefault(index, _Ref(kind, index)), where=where
        )
        if not isinstance(skeleton, dict):
            raise CheckpointFormatError(f"{where}: the state must be an object at the top level")
        matcher = _Matcher(ckpt.manifest, strict=strict, reject_unexpected=strict and not is_stateful)
        matcher.match(skeleton, target, "")
        matcher.raise_problems(root)
        # A tree target only takes part of a checkpoint (strict=False): tensors it would drop
        # are never allocated or read. A Stateful target gets everything.
        wanted = set(refs) if is_stateful else _wanted_refs(target, skeleton)
        del skeleton  # matched: free it before the state is decoded for real (F-33 memory)
        values: dict[int, Any] = {}
        plan = reader.ReadPlan()
        copies: list[tuple[Any, Any]] = []
        for index, (kind, _paths) in kinds.items():
            entry = ckpt.manifest.tensors[index]
            spec = ArraySpec(kind, entry.dtype, entry.shape)
            targets = matcher.destinations.get(index, [])
            if not targets and index not in wanted:
                continue
            dest = arrays.writable_bytes(targets[0]) if targets else None
            if dest is not None:
                value = targets[0]
            else:
                value, dest = reader.allocate(spec, ckpt, index)
            values[index] = value
            copies.extend((t, value) for t in targets if t is not value)
            reader.plan_into(ckpt, plan, index, spec, value, dest)
        reader.execute(ckpt, plan, verify=verify)
        manifest = ckpt.manifest
    for dst, src in copies:
        _copy_into(dst, src)
    # The manifest's last use: decode in place (one tree in memory, not two).
    state = decode_tree(manifest.state, lambda kind, index, p: values.get(index), where=where, in_place=True)
    if is_stateful:
        _call_load_state_dict(target, state, strict, f"{root}: <root>")  # type: ignore[arg-type]
    else:
        _assign(target, state, strict, root)
    return CheckpointInfo.from_manifest(root, manifest, metadata)


def _copy_into(dst: Any, src: Any) -> None:
    if isinstance(dst, np.ndarray):
        dst[...] = src
    else:
        torch = arrays.require_torch()
        src = src if not isinstance(src, np.ndarray) else torch.from_numpy(src)
        try:
            dst.copy_(src)
        except RuntimeError:  # no copy kernel for sub-byte dtypes (uint1..7): one byte each
            if dst.element_size() != 1 or src.dtype != dst.dtype:
                raise
            dst.view(torch.uint8).copy_(src.view(torch.uint8))


def _call_load_state_dict(
    target: Stateful, state: dict[str, Any], strict: bool, where: str = "<root>"
) -> None:
    import inspect

    try:
        accepts_strict = "strict" in inspect.signature(target.load_state_dict).parameters
    except (TypeError, ValueError):
        accepts_strict = False
    try:
        if accepts_strict:
            target.load_state_dict(state, strict=strict)  # type: ignore[call-arg]
        else:
            target.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        # e.g. torch's "Unexpected key(s) in state_dict": the checkpoint does not fit.
        raise StateMismatchError(
            f"{where}: {type(target).__qualname__}.load_state_dict refused the checkpoint state "
            f"(its tensors may already hold checkpoint bytes): {exc}"
        ) from exc


def _assign(target: Any, loaded: Any, strict: bool, root: Path | None = None, path: str = "") -> None:
    """Copy non-tensor values of ``loaded`` into a plain tree target (tensors already filled);
    Stateful objects in the tree get their part through their own ``load_state_dict``."""
    items = loaded.items() if isinstance(loaded, Mapping) else enumerate(loaded)
    for key, value in items:
        if isinstance(target, Mapping):
            if key not in target:
                continue
            current = target[key]
        else:
            if not isinstance(key, int) or key >= len(target):
                continue
            current = target[key]
        if _is_stateful(current):
            at = join_path(path, key)
            _call_load_state_dict(current, value, strict, f"{root}: {at}" if root else at)
        elif isinstance(current, (dict, list)) and isinstance(value, type(current)):
            _assign(current, value, strict, root, join_path(path, key))
        elif current is not value and not _is_array(current):
            target[key] = value


def _wanted_refs(target: Any, skeleton: Any) -> set[int]:
    """The checkpoint tensors ``_assign`` would place into ``target`` (mirrors its walk)."""
    wanted: set[int] = set()
    items = skeleton.items() if isinstance(skeleton, Mapping) else enumerate(skeleton)
    for key, value in items:
        if isinstance(target, Mapping):
            if key not in target:
                continue
        elif not isinstance(key, int) or key >= len(target):
            continue
        current = target[key]
        if isinstance(current, (dict, list)) and isinstance(value, type(current)):
            wanted |= _wanted_refs(current, value)
        elif not _is_array(current):  # replaced by, or handed (Stateful), the whole value
            wanted |= _all_refs(value)
    return wanted


def _all_refs(node: Any) -> set[int]:
    if isinstance(node, _Ref):
        return {node.index}
    if isinstance(node, Mapping):
        return set().union(*(_all_refs(v) for v in node.values()))
    if isinstance(node, (list, tuple)):
        return set().union(*(_all_refs(v) for v in node))
    return set()


def _is_stateful(value: Any) -> bool:
    return not isinstance(value, Mapping) and not _is_array(value) and isinstance(value, Stateful)


def _is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or arrays.is_torch_tensor(value)


class _Matcher:
    """Walks a checkpoint skeleton beside a target tree: finds the target tensor to read each
    checkpoint tensor into, and collects missing, unexpected and mismatched paths."""

    def __init__(self, manifest: Manifest, *, strict: bool, reject_unexpected: bool) -> None:
        self.manifest = manifest
        self.strict = strict
        self.reject_unexpected = reject_unexpected
        self.destinations: dict[int, list[Any]] = {}
        self.statefuls: dict[int, Mapping[str, Any]] = {}
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.mismatched: list[str] = []

    def match(self, ckpt_node: Any, target_node: Any, path: str) -> None:
        if isinstance(ckpt_node, _Ref):
            if _is_array(target_node):
                self._tensor(ckpt_node, target_node, path)
            elif target_node is not None:
                self.mismatched.append(
                    f"{path}: checkpoint has a tensor, target has {type(target_node).__qualname__}"
                )
            return
        if _is_array(target_node):
            self.mismatched.append(
                f"{path}: target has a tensor, checkpoint has {type(ckpt_node).__qualname__}"
            )
            return
        if _is_stateful(target_node):
            # A module/optimizer inside a tree target: match against its state_dict(); its own
            # load_state_dict decides about keys only the checkpoint has.
            target_node = self.statefuls.setdefault(id(target_node), protocol.state_of(target_node))
            reject, self.reject_unexpected = self.reject_unexpected, False
            try:
                self.match(ckpt_node, target_node, path)
            finally:
                self.reject_unexpected = reject
            return
        if isinstance(ckpt_node, Mapping) and isinstance(target_node, Mapping):
            for key in target_node:
                if key not in ckpt_node:
                    self.missing.append(join_path(path, key))
            for key, value in ckpt_node.items():
                if key in target_node:
                    self.match(value, target_node[key], join_path(path, key))
                elif self.reject_unexpected:
                    self.unexpected.append(join_path(path, key))
        elif isinstance(ckpt_node, (list, tuple)) and isinstance(target_node, (list, tuple)):
            if len(ckpt_node) != len(target_node) and any(_is_array(t) for t in target_node):
                self.mismatched.append(
                    f"{path}: {len(ckpt_node)} items in the checkpoint, {len(target_node)} in the target"
                )
            for i, (c, t) in enumerate(zip(ckpt_node, target_node, strict=False)):
                self.match(c, t, join_path(path, i))

    def _tensor(self, ref: _Ref, target: Any, path: str) -> None:
        entry = self.manifest.tensors[ref.index]
        spec = arrays.try_spec(target)
        if spec is None or spec.dtype != entry.dtype or spec.shape != entry.shape or spec.kind != ref.kind:
            have = f"{spec.kind} {spec.dtype.name}{list(spec.shape)}" if spec else type(target).__qualname__
            self.mismatched.append(
                f"{path}: checkpoint has {ref.kind} {entry.dtype.name}{list(entry.shape)}, target has {have}"
            )
            return
        self.destinations.setdefault(ref.index, []).append(target)

    def raise_problems(self, root: Path) -> None:
        problems = list(self.mismatched)
        if self.strict:
            problems += [f"{p}: missing from the checkpoint" for p in self.missing]
        problems += [f"{p}: in the checkpoint but not in the target" for p in self.unexpected]
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise StateMismatchError(
                f"{root}: checkpoint does not fit the target:\n  {shown}{more}\n"
                "Pass strict=False to load what matches."
            )


@_gc.paused()
def verify(path: PathLike) -> CheckpointInfo:
    """Check a checkpoint completely: manifest, every data file header and byte range, every
    checksum. Raises CheckpointCorruptError whose ``problems`` lists every damaged file (and
    CheckpointFormatError when the files are intact but break the format; FORMAT.md §9)::

        ckptproto.verify("checkpoints/checkpoint_step_10")
    """
    root = Path(path)
    damaged: list[str] = []
    problems: list[str] = []
    opened: list[CheckpointError] = []
    # One generation, pinned (reader.OpenCheckpoint): a concurrent overwrite or deletion never
    # makes a healthy checkpoint look damaged. The manifest is validated whole, values
    # included, when it is read (FORMAT.md §9 step 2).
    with reader.OpenCheckpoint(root, problems=opened) as ckpt:
        manifest = ckpt.manifest
        info = CheckpointInfo.from_manifest(root, manifest, _decode_metadata(manifest, root))
        for exc in opened:
            if isinstance(exc, CheckpointCorruptError):
                damaged.extend(exc.problems)
            else:
                problems.append(str(exc))
        for name, data_file in ckpt.files.items():
            try:
                reader.check_file(ckpt, name, data_file)
            except CheckpointCorruptError as exc:
                damaged.extend(exc.problems)
        if not damaged and not problems:
            try:
                ckpt.check_chunks()  # every chunk against its data file's header (F-13)
            except CheckpointError as exc:
                problems.append(str(exc))
        if problems and not damaged:
            damaged.extend(ckpt.damage())  # a file that would not open may be a damaged one
    # FORMAT.md §9: a damaged file is reported as damage (whatever else is wrong); a checkpoint
    # whose files are intact but wrong was written wrong: CheckpointFormatError.
    if damaged:
        all_problems = damaged + problems
        raise CheckpointCorruptError(f"{root}: " + "; ".join(all_problems), problems=all_problems)
    if problems:
        raise CheckpointFormatError(f"{root}: " + "; ".join(problems))
    return info
