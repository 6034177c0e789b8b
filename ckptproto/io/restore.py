"""The one restore pipeline: ``load`` and ``load_into`` (resharding included) on a coordinator.

Every rank opens one pinned generation of the checkpoint (``reader.OpenCheckpoint``), matches
it against its target with the one :class:`~ckptproto.io.match.Matcher`, reads straight into
the destination buffers, and then the ranks agree that they read the same checkpoint (in a
world of one there is nobody to disagree)::

    state = load("checkpoints/checkpoint_step_10", map_location="cpu")
    info = load_into("checkpoints/checkpoint_step_10", {"models": {"model": model}})
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import MutableMapping
from itertools import repeat
from typing import Any

from ckptproto import _gc, arrays, dtensor
from ckptproto.arrays import ArraySpec
from ckptproto.errors import (
    CheckpointCorruptError,
    CheckpointFormatError,
    CheckpointReplacedError,
    DistributedCheckpointError,
    StateMismatchError,
)
from ckptproto.format import layout
from ckptproto.format.info import CheckpointInfo
from ckptproto.format.manifest import Manifest
from ckptproto.io import bulkread, reader, readplan
from ckptproto.io.backends import resolve
from ckptproto.io.coordinate import Coordinator, Timeout, coordinator, failure
from ckptproto.io.match import (
    Matcher,
    Ref,
    assign,
    call_load_state_dict,
    copy_into,
    is_stateful,
    wanted_refs,
)
from ckptproto.io.meta import decode_metadata
from ckptproto.location import Location
from ckptproto.protocol import Stateful
from ckptproto.tree import decode_tree

PathLike = str | os.PathLike[str] | Location  # a path, a URL, or a parsed location


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
    A storage that cannot be mapped (an object store: its files have no ``fileno()``) reads
    the tensors into memory instead, as ``mmap=False`` does.
    ``verify`` (default: on, off with ``mmap``) compares every data file's CRC while reading.
    Under torch.distributed every rank loads the full state and checks that all ranks loaded
    the same checkpoint (``process_group="local"``: this process alone), waiting at most
    ``timeout`` for the others (as for :func:`ckptproto.save`).
    """
    coord = coordinator(process_group, timeout)
    _storage, root = resolve(path)  # a URL no backend serves is refused here
    what = f"loading {root}"
    local: BaseException | None = None
    state: dict[str, Any] = {}
    try:
        state, manifest = load_state(root, map_location=map_location, mmap=mmap, verify=verify)
        mine: dict[str, Any] = {"ok": True, "digest": manifest_digest(manifest)}
    except Exception as exc:
        local, mine = exc, failure(exc)
    agree(coord, coord.exchange(mine, what), what, local)
    return state


_REPLACED_ATTEMPTS = 8  # whole re-reads after the generation being read was replaced


def load_state(
    path: PathLike, *, map_location: Any = None, mmap: bool = False, verify: bool | None = None
) -> tuple[dict[str, Any], Manifest]:
    """``load`` in this process alone; also returns the manifest of the generation it read.
    A generation replaced while its tensors were being read (object stores, F-38) is dropped
    whole and the new one read, a few times at most."""
    for attempt in range(_REPLACED_ATTEMPTS):
        try:
            return _load_generation(path, map_location=map_location, mmap=mmap, verify=verify)
        except CheckpointReplacedError:
            if attempt + 1 == _REPLACED_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


def _load_generation(
    path: PathLike, *, map_location: Any, mmap: bool, verify: bool | None
) -> tuple[dict[str, Any], Manifest]:
    with reader.OpenCheckpoint(path) as ckpt:
        where = ckpt.where(layout.MANIFEST_NAME)
        kinds = readplan.tensor_kinds(ckpt.manifest, where)
        decode_metadata(ckpt.manifest, ckpt.location)  # the manifest is refused whole, not in part
        values = readplan.materialize(
            ckpt, kinds, use_mmap=mmap, verify=(not mmap) if verify is None else verify
        )
    moved = (
        values if map_location is None else {i: arrays.to_device(v, map_location) for i, v in values.items()}
    )
    # The manifest's last use: decode its state in place (one tree in memory, not two).
    state = decode_tree(
        ckpt.manifest.state,
        lambda kind, index, p: moved[index],
        where=where,
        in_place=True,
        paths=False,
        resolve_many=lambda indices: list(map(moved.__getitem__, indices)),
        columns=ckpt.manifest.columns,
    )
    ckpt.manifest.columns = None  # (its objects are the state's now)
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{where}: the state must be an object at the top level")
    return state, ckpt.manifest


def manifest_digest(manifest: Manifest) -> str:
    """What identifies a committed generation: its creation time and every file's checksum."""
    files = sorted((n, f.checksum, f.size) for n, f in manifest.files.items())
    return hashlib.sha256(json.dumps([manifest.created, files]).encode()).hexdigest()


def agree(coord: Coordinator, answers: list[dict[str, Any]], what: str, local: BaseException | None) -> None:
    """Raise unless every rank succeeded and read the same generation."""
    coord.settle(answers, what, local)
    differ = [r for r, a in enumerate(answers) if a["digest"] != answers[0]["digest"]]
    if differ:
        raise DistributedCheckpointError(
            f"{what}: rank {', '.join(map(str, differ))} read a different checkpoint than rank 0 "
            "(is the directory on a file system every rank shares?)",
            failed_ranks={r: "read a different checkpoint" for r in differ},
        )


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

    A DTensor target (an FSDP2 parameter, its optimizer state) receives only its local shard,
    and only the chunk rows overlapping it are read, whatever the number of ranks that saved
    the checkpoint. Under torch.distributed (``process_group``, by default the world group
    once initialised) the ranks check that they read the same checkpoint, and with ``verify``
    each data file no rank read whole is checksummed by one rank (files spread over the
    ranks); see ``docs/distributed.md``; ``timeout`` as for :func:`ckptproto.save`.
    """
    coord = coordinator(process_group, timeout)
    _storage, root = resolve(path)
    what = f"loading {root}"
    local: BaseException | None = None
    values: dict[int, Any] = {}
    skeleton: Any = None
    matched_whole: set[int] = set()
    manifest: Manifest | None = None
    metadata: dict[str, Any] = {}
    stateful = is_stateful(target)
    checked: set[str] = set()
    # One generation of the checkpoint, held open from the first read to the last checksum.
    ckpt: reader.OpenCheckpoint | None = None
    try:
        try:
            if not stateful and not isinstance(target, MutableMapping):
                raise StateMismatchError(
                    f"load_into needs a Stateful or a dict, got {type(target).__qualname__}"
                )
            ckpt = reader.OpenCheckpoint(root)
            metadata = decode_metadata(ckpt.manifest, root)  # refuse a bad manifest before writing
            values, skeleton, matched_whole = _read_into(
                ckpt, target, strict, verify, stateful, checked, coord.size
            )
            manifest = ckpt.manifest
            mine: dict[str, Any] = {
                "ok": True,
                "digest": manifest_digest(manifest),
                "checked": sorted(checked),
            }
        except Exception as exc:
            local, mine = exc, failure(exc)
        answers = coord.exchange(mine, what)
        agree(coord, answers, what, local)
        assert manifest is not None and ckpt is not None
        if verify and coord.distributed:
            # Files no rank read whole (and so checksummed for free) are checked now, spread
            # over the ranks; any mismatch fails the load everywhere.
            unchecked = sorted(set(manifest.files) - {n for a in answers for n in a["checked"]})
            if unchecked:
                try:
                    _verify_files(ckpt, unchecked[coord.rank :: coord.size])
                    mine = {"ok": True, "digest": answers[0]["digest"]}
                except Exception as exc:
                    local, mine = exc, failure(exc)
                agree(coord, coord.exchange(mine, what), what, local)
    finally:
        if ckpt is not None:
            ckpt.close()
    if stateful:
        where = f"{root}/{layout.MANIFEST_NAME}"
        # The manifest's last use: decode in place (one tree in memory, not two).
        state = decode_tree(
            manifest.state,
            lambda kind, index, p: values.get(index),
            where=where,
            in_place=True,
            paths=False,
            resolve_many=lambda indices: list(map(values.get, indices)),
            columns=manifest.columns,
        )
        manifest.columns = None  # (its objects are the state's now)
        call_load_state_dict(target, state, strict, f"{root}: <root>")  # type: ignore[arg-type]
    else:
        # The skeleton the target was matched against: its tensors are in place already, and
        # a value the target takes whole gets its tensors from ``values`` (no second decode).
        assign(target, skeleton, strict, root, values=values, matched_whole=matched_whole)
    manifest.columns = None
    return CheckpointInfo.from_manifest(root, manifest, metadata)


def _read_into(
    ckpt: reader.OpenCheckpoint,
    target: Any,
    strict: bool,
    verify: bool,
    stateful: bool,
    checked: set[str],
    world_size: int,
) -> tuple[dict[int, Any], Any, set[int]]:
    """Match ``target`` and read every checkpoint tensor it takes into its own buffers (a
    DTensor: its local shard). Returns the value for each tensor index read and, for a tree
    target, the skeleton it was matched against and :attr:`Matcher.matched_whole` (for
    :func:`assign`; a Stateful target: None and an empty set, the state is decoded anew)."""
    root = ckpt.location
    where = ckpt.where(layout.MANIFEST_NAME)
    kinds = readplan.tensor_kinds(ckpt.manifest, where)
    skeleton = decode_tree(
        ckpt.manifest.state,
        lambda kind, index, p: Ref(kind, index),
        where=where,
        paths=False,
        resolve_many=lambda indices: list(map(Ref, repeat("torch"), indices)),
        columns=ckpt.manifest.columns,
    )
    if not isinstance(skeleton, dict):
        raise CheckpointFormatError(f"{where}: the state must be an object at the top level")
    matcher = Matcher(ckpt.manifest, strict=strict, reject_unexpected=strict and not stateful)
    matcher.match(skeleton, target, "")
    matcher.raise_problems(root)
    # A tree target only takes part of a checkpoint (strict=False): tensors it would drop are
    # never allocated or read. A Stateful target gets every tensor the state refers to.
    wanted = set(kinds) if stateful else wanted_refs(target, skeleton, matcher.matched_whole)
    if stateful:
        skeleton = None  # matched: free it before the state is decoded for real (F-33 memory)
    values: dict[int, Any] = {}
    plan = readplan.ReadPlan()
    copies: list[tuple[Any, Any]] = []
    # Small tensors into plain CPU targets: read in runs, copied in one call (bulkread).
    bulk = bulkread.plan_small(
        ckpt, kinds, plan, values, targets=matcher.first, more_targets=matcher.others, wanted=wanted
    )
    taken = bulk.taken
    for index, kind in kinds.items():
        if index in taken:
            continue
        entry = ckpt.manifest.tensors[index]
        targets = matcher.destinations(index)
        if not targets and index not in wanted:
            continue
        first = targets[0] if targets else None
        if first is not None and dtensor.is_dtensor(first):
            described = dtensor.describe(first)
            assert not isinstance(described, str)  # checked by the matcher
            shard = described[1]
            spec = ArraySpec("torch", entry.dtype, shard.shape)
            local, dest = shard.local, arrays.writable_bytes(shard.local)
            if dest is None:  # not a contiguous CPU tensor: read beside it, copy after
                local, dest = readplan.allocate(spec, ckpt, index)
                copies.append((shard.local, local))
            readplan.plan_box_into(ckpt, plan, index, shard.offsets, spec, local, dest)
            values[index] = first
            copies.extend((t, first) for t in targets[1:])
            continue
        spec = ArraySpec(kind, entry.dtype, entry.shape)
        dest = arrays.writable_bytes(first) if first is not None else None
        if dest is not None:
            value = first
        else:
            value, dest = readplan.allocate(spec, ckpt, index)
        values[index] = value
        copies.extend((t, value) for t in targets if t is not value)
        readplan.plan_into(ckpt, plan, index, spec, value, dest)
    # Alone, a file read in part is checksummed here; in a group, another rank may read the
    # rest, so the files no rank read whole are checked after the ranks compared notes.
    checked |= readplan.execute(ckpt, plan, verify=verify, partial="read" if world_size == 1 else "skip")
    bulk.copy()
    for dst, src in copies:
        copy_into(dst, src)
    return values, skeleton, matcher.matched_whole if skeleton is not None else set()


def _verify_files(ckpt: reader.OpenCheckpoint, names: list[str]) -> None:
    problems: list[str] = []
    for name in names:
        try:
            reader.check_file(ckpt, name, ckpt.files[name])
        except CheckpointCorruptError as exc:
            problems.extend(exc.problems)
    if problems:
        raise CheckpointCorruptError("; ".join(problems), problems=problems)
