"""The one save pipeline: prepare → plan → stage → write → commit, on a coordinator.

Sync, async and distributed saves are the same run with different coordinators (``Solo``: a
world of one; ``Group``: the ranks of a torch.distributed group) and different byte sources
(live tensors, or the staging pool's copies)::

    info = save({"models": {"model": model}}, "checkpoints/checkpoint_step_100")

1. prepare (:mod:`ckptproto.io.prepare`): every rank checks and encodes its state and plans its
   share. Rank 0 creates the hidden temporary directory (``commit.begin``) and sends every
   rank its name, its status and a digest of its tensor layout (paths, dtypes, global shapes)
   and path, which each rank compares with its own before writing.
2. write: every rank writes its own data file (``data-{rank}-000.safetensors``) into that
   directory and fsyncs it (rank 0 without waiting for the others to take its message).
3. commit: each rank sends rank 0 its status, file entry and chunks; if every rank succeeded,
   rank 0 builds the manifest, checks its tensor table as every reader does (overlapping
   shards, holes), writes it last and commits (atomic rename + fsync). Rank 0 sends every
   rank the outcome.

Three one-way messages in all (``Coordinator.share``, ``collect``, ``share``), whatever failed
where: every rank takes every step, so every rank raises the same error.

If any rank fails, nothing is committed, rank 0 removes the temporary directory, and the error
is raised on every rank (under torch.distributed as DistributedCheckpointError naming the
failed ranks). Non-tensor values (steps, hyperparameters) are taken from rank 0's state.
The collector is paused only while plans and the manifest are built, never while bytes move
(an async save runs beside training, whose allocations must keep their collections).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from itertools import repeat
from pathlib import Path
from typing import Any

from ckptproto import _gc, arrays
from ckptproto.errors import CheckpointWriteError, DistributedCheckpointError
from ckptproto.format import layout
from ckptproto.format.info import CheckpointInfo
from ckptproto.format.manifest import (
    MAX_MANIFEST_BYTES,
    Chunk,
    FileEntry,
    Manifest,
    TensorEntry,
    check_tensor_table,
    whole_table,
)
from ckptproto.io.backends import resolve
from ckptproto.io.coordinate import Coordinator, Timeout, coordinator, failure
from ckptproto.io.meta import WRITER, build_manifest, decode_metadata
from ckptproto.io.plan import WholePieces, plan_file
from ckptproto.io.prepare import prepare
from ckptproto.io.share import ShareJob, warn_if_replicas_differ
from ckptproto.io.storage import Storage
from ckptproto.location import Location
from ckptproto.protocol import Stateful
from ckptproto.tree import EncodedState

PathLike = str | os.PathLike[str]
_NOT_COMMITTED = "; nothing was committed"


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
    coord = coordinator(process_group, timeout)
    storage, final = resolve(path)
    job: ShareJob | None = None
    metadata_tree: Any = None
    sources: Sequence[memoryview] = []
    # The views and their owners: keeps contiguous/CPU copies alive until written.
    hosted: tuple[Sequence[memoryview], list[Any]] | None = None
    failed: BaseException | None = None
    try:
        prepared = prepare(state_or_stateful, metadata, coord)
        job, metadata_tree = prepared.share, prepared.metadata_tree
        leaves = job.leaves
        hosted = arrays.host_views(
            [leaf.value for leaf in leaves],
            [leaf.host_address for leaf in leaves],
            [leaf.spec.nbytes for leaf in leaves],
        )
        sources = hosted[0]
    except Exception as exc:
        failed = exc
    return run(final, job, metadata_tree, sources, coord, overwrite=overwrite, failed=failed, storage=storage)


def run(
    final: Location,
    job: ShareJob | None,
    metadata_tree: Any,
    sources: Sequence[memoryview],
    coord: Coordinator,
    *,
    overwrite: bool,
    failed: BaseException | None = None,
    storage: Storage | None = None,
) -> CheckpointInfo:
    """Write and commit a prepared save, on every rank of ``coord``: ``sources[i]`` holds the
    bytes of ``job.pieces[i]`` (live tensors, or staged copies for an async save). ``failed``:
    this rank already failed (``job`` is then None) and reports it to the others. Every byte
    goes through ``storage`` (by default the backend :func:`~ckptproto.io.storage.resolve`
    gives ``final``).

    Three messages, all through rank 0, whatever failed where (so every rank takes every
    step and raises the same error): rank 0's temporary directory to every rank (rank 0
    writes meanwhile), every rank's file to rank 0, and rank 0's outcome to every rank."""
    where = f"saving {final}"
    if storage is None:
        storage, final = resolve(final)
    temp: str | None = None
    local = failed
    head: dict[str, Any] | None = None
    if coord.rank == 0:
        head = failure(failed) if failed is not None else None
        if failed is None:
            try:
                temp = storage.begin(final, overwrite=overwrite)
                assert job is not None
                head = {"ok": True, "temp": temp, "digest": job.digest, "path": _where(final)}
            except Exception as exc:
                local, head = exc, failure(exc)
    try:
        head = coord.share(head, where, wait=False)
        if local is None and head["ok"] and coord.size > 1:
            assert job is not None
            local = _differs(head, job.digest, _where(final))
        mine: dict[str, Any] = {"ok": True}  # rank 0 failed: nothing to write, nothing to say
        if local is not None:
            mine = failure(local, reason=local.reason if isinstance(local, _NotTheSameSave) else None)
        elif head["ok"]:
            assert job is not None
            try:
                mine = {
                    "ok": True,
                    "replicas": job.replicas,
                    **_write_share(storage, head["temp"], job, sources, coord.rank),
                }
            except Exception as exc:
                local, mine = exc, failure(exc)
        answers = coord.collect(mine, where)
        outcome: dict[str, Any] | None = None
        if coord.rank == 0:
            assert job is not None or local is not None
            outcome = coord.verdict(answers, where, _NOT_COMMITTED)
            if outcome is None:
                assert job is not None and temp is not None
                if coord.size > 1:
                    for answer in answers:  # tensor indices: JSON made them strings
                        answer["replicas"] = {int(i): crc for i, crc in answer["replicas"].items()}
                    warn_if_replicas_differ(final, job, answers, coord.size)
                try:
                    manifest = _commit(
                        storage,
                        final,
                        temp,
                        job.encoded,
                        metadata_tree,
                        answers,
                        coord.size,
                        overwrite=overwrite,
                    )
                    outcome = {"ok": True, "manifest": _summary(manifest)}
                except Exception as exc:
                    local = exc
                    storage.abort(temp)
                    outcome = coord.verdict([failure(exc), *answers[1:]], where, _NOT_COMMITTED)
            elif temp is not None:
                storage.abort(temp)
            temp = None
        outcome = coord.share(outcome, where)
        if not outcome["ok"]:
            coord.conclude(outcome, local)
    except BaseException:
        if temp is not None and coord.rank == 0:
            storage.abort(temp)
        raise
    manifest = _from_summary(outcome["manifest"])
    return CheckpointInfo.from_manifest(final, manifest, decode_metadata(manifest, final))


def _where(final: Location) -> str:
    return os.path.abspath(final) if isinstance(final, Path) else str(final)


class _NotTheSameSave(DistributedCheckpointError):
    """This rank saves another layout, or to another path, than rank 0 (``reason``: what
    ``failed_ranks`` says of it)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _differs(head: dict[str, Any], digest: str, path: str) -> _NotTheSameSave | None:
    """Why this rank's save is not the one rank 0 (``head``) makes: another layout or path."""
    if digest != head["digest"]:
        return _NotTheSameSave(
            "its state holds different tensors (paths, dtypes or global shapes) than rank 0's; "
            "every rank must save the same state",
            "state differs from rank 0's",
        )
    if path != head["path"]:
        return _NotTheSameSave(
            f"it saves to {path}, rank 0 to {head['path']}; every rank must pass the same path",
            f"saves to {path}",
        )
    return None


def _write_share(
    storage: Storage, temp: str, job: ShareJob, sources: Sequence[memoryview], rank: int
) -> dict[str, Any]:
    if not job.pieces and rank != 0:
        return {"file": None, "chunks": []}  # rank 0 always writes one (even of no tensors)
    with _gc.paused():
        file_plan = plan_file(storage.data_file_name(temp, rank), rank, job.pieces)
    entry = storage.write_file(temp, file_plan, sources)
    with _gc.paused():
        file = [file_plan.name, entry.size, entry.checksum]
        pieces = job.pieces
        if isinstance(pieces, WholePieces) and len(pieces) == len(job.encoded.tensors):
            # Every tensor whole, piece i tensor i (a world of one, plan_share): the keys say
            # it all, and rank 0 builds the table by columns (_table).
            return {"file": file, "whole": pieces.keys}
        # Tuples as they are: a coordinator that sends JSON turns them into lists, and
        # _commit takes either.
        return {"file": file, "chunks": _chunks(job)}


def _chunks(job: ShareJob) -> list[Any]:
    """``[tensor index, key, offsets, shape]`` of each piece (as tuples), built by columns."""
    if not job.pieces:
        return []
    sources, keys, specs, offsets = zip(*job.pieces, strict=True)
    return list(
        zip(
            map(job.tensor_index.__getitem__, sources),
            keys,
            offsets,
            [spec.shape for spec in specs],
            strict=True,
        )
    )


def _commit(
    storage: Storage,
    final: Location,
    temp: str,
    encoded: EncodedState,
    metadata_tree: Any,
    answers: list[dict[str, Any]],
    world_size: int,
    *,
    overwrite: bool,
) -> Manifest:
    """On rank 0: the manifest from every rank's file and chunks, parsed back, written last;
    then the commit."""
    with _gc.paused():
        files: dict[str, FileEntry] = {}
        tensors = _table(final, encoded, answers, files)
        # What every reader checks in the tensor table, checked before the commit (overlapping
        # shards, holes), on the entries themselves: the state and metadata trees come from the
        # encoder, which refuses what a reader would.
        check_tensor_table(tensors, files, f"{temp}/{layout.MANIFEST_NAME}")
        manifest = build_manifest(encoded, metadata_tree, files, tensors, world_size)
        data = manifest.to_json()
        # The size limit of reader.read_manifest.
        if len(data) > MAX_MANIFEST_BYTES:
            raise CheckpointWriteError(
                f"{final}: the manifest would be {len(data)} bytes, over the {MAX_MANIFEST_BYTES} "
                "that readers accept; store large values as tensors, not as plain lists or strings"
            )
    storage.write_small_file(temp, layout.MANIFEST_NAME, data)
    storage.commit(temp, final, overwrite=overwrite)
    return manifest


def _table(
    final: Location, encoded: EncodedState, answers: list[dict[str, Any]], files: dict[str, FileEntry]
) -> Sequence[TensorEntry]:
    """The tensor table (filling ``files``): by columns, as its runs, when one rank wrote every
    tensor whole (a world of one); else from every rank's chunks (:func:`_entries`)."""
    if len(answers) == 1 and answers[0].get("whole") is not None:
        name, size, checksum = answers[0]["file"]
        files[name] = FileEntry(size, checksum, 0)
        specs = [leaf.spec for leaf in encoded.tensors]
        keys = answers[0]["whole"]
        if len(keys) != len(specs):
            raise CheckpointWriteError(
                f"{final}: internal error: {len(keys)} tensors written whole, the state holds {len(specs)}"
            )
        return whole_table(name, keys, [s.dtype for s in specs], [s.shape for s in specs])
    return _entries(final, encoded, answers, files)


def _entries(
    final: Location, encoded: EncodedState, answers: list[dict[str, Any]], files: dict[str, FileEntry]
) -> list[TensorEntry]:
    """The tensor table from every rank's file and chunks (filling ``files``): each tensor's
    chunks, sorted by offsets; DistributedCheckpointError if the shards do not cover it."""
    new = tuple.__new__  # a named tuple's own __new__ is a Python call around this
    count = len(encoded.tensors)
    # Each tensor's chunk while it has one (the usual tensor), or the list of its chunks.
    found: list[Any] = [None] * count
    fresh = True  # no chunk placed yet
    for rank, answer in enumerate(answers):
        if answer["file"] is None:
            continue
        name, size, checksum = answer["file"]
        files[name] = FileEntry(size, checksum, rank)
        listed = answer.get("chunks")
        if listed is None:  # every tensor whole, in order, under these keys (_write_share)
            listed = _whole_chunks(answer["whole"], encoded)
        if not listed:
            continue
        indices, keys, offsets, boxes = zip(*listed, strict=True)
        chunks = list(
            map(new, repeat(Chunk), zip(repeat(name), keys, map(tuple, offsets), map(tuple, boxes)))
        )
        if fresh and len(indices) == count and list(indices) == list(range(count)):
            found = chunks  # one rank wrote every tensor, in order (a world of one)
        else:
            for index, chunk in zip(indices, chunks, strict=True):
                had = found[index]
                found[index] = chunk if had is None else [*had, chunk] if type(had) is list else [had, chunk]
        fresh = False
    specs = [leaf.spec for leaf in encoded.tensors]
    shapes = [spec.shape for spec in specs]
    if not fresh and [c[3] if type(c) is Chunk else None for c in found] == shapes:
        # Every tensor whole in one chunk (the usual table): built by columns.
        return list(
            map(
                new,
                repeat(TensorEntry),
                zip([s.dtype for s in specs], shapes, zip(found, strict=True), strict=True),
            )
        )
    tensors: list[TensorEntry] = []
    for leaf, chunk in zip(encoded.tensors, found, strict=True):
        spec = leaf.spec
        if type(chunk) is Chunk and chunk.shape == spec.shape:  # the whole tensor, one chunk
            tensors.append(new(TensorEntry, (spec.dtype, spec.shape, (chunk,))))
            continue
        several = [] if chunk is None else chunk if type(chunk) is list else [chunk]
        covered = sum(c.numel for c in several)
        if covered != spec.numel or not several:
            raise DistributedCheckpointError(
                f"{final}: {leaf.path}: the ranks' shards hold {covered} of its {spec.numel} "
                "elements; a DTensor's device mesh must lie inside the process group that saves it"
            )
        several.sort(key=lambda c: c.offsets)
        tensors.append(new(TensorEntry, (spec.dtype, spec.shape, tuple(several))))
    return tensors


def _whole_chunks(keys: list[str], encoded: EncodedState) -> list[Any]:
    """The chunks of an answer that says "every tensor whole, under these keys", listed."""
    return [
        (i, key, (0,) * len(leaf.spec.shape), leaf.spec.shape)
        for i, (key, leaf) in enumerate(zip(keys, encoded.tensors, strict=True))
    ]


def _summary(manifest: Manifest) -> dict[str, Any]:
    """What the other ranks need for their CheckpointInfo (not the whole manifest)."""
    return {
        "metadata": manifest.metadata,
        "created": manifest.created,
        "files": {n: [f.size, f.checksum, f.rank] for n, f in manifest.files.items()},
        "world_size": manifest.world_size,
    }


def _from_summary(doc: dict[str, Any]) -> Manifest:
    files = {n: FileEntry(size, checksum, rank) for n, (size, checksum, rank) in doc["files"].items()}
    return Manifest(
        state={}, tensors=[], files=files, metadata=doc["metadata"], created=doc["created"],
        world_size=doc["world_size"], writer=WRITER,
    )  # fmt: skip
