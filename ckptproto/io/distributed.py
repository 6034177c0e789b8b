"""Saving and loading across the ranks of a ``torch.distributed`` process group.

Save, on every rank of the group::

    ckptproto.save({"models": {"model": fsdp_model}, "optimizers": {"optimizer": opt}},
                   "checkpoints/checkpoint_step_100")          # the world group by default

1. Rank 0 creates the hidden temporary directory (``commit.begin``); every rank checks and
   encodes its state. One exchange: the directory name, every rank's status, and a digest of
   every rank's tensor layout (paths, dtypes, global shapes), which must agree.
2. Every rank writes its own data file (``data-{rank}-000.safetensors``) into that directory
   and fsyncs it: its DTensor shards (one chunk of the global tensor each; shards repeated
   along ``Replicate`` mesh dimensions by one rank only) and the plain tensors assigned to it.
   Plain tensors and arrays are replicated by definition (as in DCP): each is written once, by
   one rank, chosen by a deterministic size-balanced assignment every rank computes alike.
3. A second exchange carries each rank's file entry and chunks to rank 0, which writes the
   manifest and commits (atomic rename + fsync); a third tells every rank the outcome.

If any rank fails, nothing is committed, rank 0 removes the temporary directory, and every rank
raises :class:`DistributedCheckpointError` naming the failed ranks. Every exchange is preceded
by a ``monitored_barrier`` with ``timeout``, so a rank that died or hangs is named and the
others give up in bounded time. The exchanges run on the group itself when it is a gloo group,
else on a gloo group over the same ranks (created once per group), and carry plain Python
dicts between our own processes; nothing pickled reaches the disk.

Non-tensor values (steps, hyperparameters) are taken from rank 0's state.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import re
import sys
import warnings
import zlib
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from ckptproto import _gc, arrays, dtensor, protocol
from ckptproto.arrays import ArraySpec
from ckptproto.errors import (
    CheckpointCorruptError,
    CheckpointError,
    DistributedCheckpointError,
    StateMismatchError,
)
from ckptproto.format import layout
from ckptproto.format.info import CheckpointInfo
from ckptproto.format.manifest import Chunk, FileEntry, Manifest, TensorEntry
from ckptproto.io import commit, reader, sync, writer
from ckptproto.io.plan import Piece, plan_file, unique_keys
from ckptproto.protocol import Stateful
from ckptproto.tree import EncodedState, TensorLeaf, decode_tree, encode_state

logger = logging.getLogger("ckptproto")

LOCAL = "local"
"""``process_group=LOCAL``: this process alone, even when torch.distributed is initialised."""

_NOT_COMMITTED = "; nothing was committed"
DEFAULT_TIMEOUT = timedelta(minutes=30)  # torch.distributed's own default for gloo
# Plain (replicated) tensors up to this size are compared across ranks by their CRC-32 before
# a save: a per-rank value saved as one replica must not pass unnoticed. Larger ones are not
# (reading every replica on every rank would double the cost of a save).
REPLICA_CHECK_BYTES = 64 * 1024


def resolve_group(process_group: Any) -> Any:
    """The process group a save/load runs on, or None for a single-process one: the given
    group; by default the world group when torch.distributed is initialised."""
    if isinstance(process_group, str) and process_group == LOCAL:
        return None
    if process_group is not None:
        return process_group
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist.group.WORLD


_CONTROL_GROUPS: dict[tuple[int, ...], Any] = {}


class _Control:
    """The collectives of the protocol: one status exchange at a time, with bounded waits."""

    def __init__(self, group: Any, timeout: timedelta | float | None) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.timeout = sync.as_timeout(timeout) or DEFAULT_TIMEOUT
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        if self.rank < 0:
            raise CheckpointError("this rank is not a member of the process group passed to ckptproto")
        self.group = group if dist.get_backend(group) == "gloo" else self._gloo_twin(group)

    def _gloo_twin(self, group: Any) -> Any:
        # monitored_barrier and CPU object collectives need gloo; NCCL groups get a gloo twin.
        ranks = tuple(self.dist.get_process_group_ranks(group))
        twin = _CONTROL_GROUPS.get(ranks)
        if twin is None:
            twin = self.dist.new_group(list(ranks), backend="gloo", use_local_synchronization=True)
            _CONTROL_GROUPS[ranks] = twin
        return twin

    def exchange(self, payload: dict[str, Any], what: str) -> list[dict[str, Any]]:
        """Every rank's ``payload``, in group rank order; raises naming ranks that did not come."""
        if self.size == 1:
            return [payload]
        try:
            self.dist.monitored_barrier(group=self.group, timeout=self.timeout, wait_all_ranks=True)
            answers: list[Any] = [None] * self.size
            self.dist.all_gather_object(answers, payload, group=self.group)
        except RuntimeError as exc:  # DistBackendError too: a rank died, hangs or left
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            missing = _missing_ranks(str(exc), self.rank)
            if missing:
                who = f"rank {', '.join(map(str, missing))} did not answer"
            else:  # not rank 0: it only sees the group break; rank 0's error names the rank
                who = "the group broke (a rank died, hung or failed; rank 0's error names it)"
            raise DistributedCheckpointError(
                f"{what}: {who} within {self.timeout.total_seconds():g} s: {text}",
                failed_ranks={r: "did not answer" for r in missing},
            ) from exc
        return answers


def _missing_ranks(text: str, me: int) -> list[int]:
    """The ranks a monitored_barrier error on rank 0 lists as not having arrived."""
    found = re.search(r"Ranks? ([\d, ]+) failed to pass", text)
    if found is None:
        return []
    return sorted({int(r) for r in re.findall(r"\d+", found.group(1))} - {me})


def async_control(process_group: Any, timeout: timedelta | float | None = None) -> _Control | None:
    """The exchanges of an AsyncSaver's background saves, on a gloo group of their own (the
    training loop's collectives run on the caller's group from another thread, and two threads
    must never interleave collectives on one group). None outside torch.distributed. Creating
    it is collective: every rank of the group constructs its AsyncSaver at the same point."""
    group = resolve_group(process_group)
    if group is None:
        return None
    import torch.distributed as dist

    own = dist.new_group(
        sorted(dist.get_process_group_ranks(group)), backend="gloo", use_local_synchronization=True
    )
    return _Control(own, timeout)


def _failure(exc: BaseException) -> dict[str, Any]:
    return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}


def _check(answers: list[dict[str, Any]], what: str, local: BaseException | None, note: str = "") -> None:
    failed = {r: a["error"] for r, a in enumerate(answers) if not a.get("ok")}
    if not failed:
        return
    by_error: dict[str, list[int]] = {}
    for r, error in sorted(failed.items()):
        by_error.setdefault(error, []).append(r)
    lines = "; ".join(f"rank {', '.join(map(str, rs))}: {e}" for e, rs in by_error.items())
    ranks = ", ".join(map(str, sorted(failed)))
    raise DistributedCheckpointError(
        f"{what} failed on rank {ranks}{note} ({lines})", failed_ranks=failed
    ) from local


def _layout_digest(encoded: EncodedState) -> str:
    layout_doc = [
        [leaf.path, leaf.spec.kind, leaf.spec.dtype.name, list(leaf.spec.shape), leaf.shard is not None]
        for leaf in encoded.tensors
    ]
    return hashlib.sha256(json.dumps(layout_doc).encode()).hexdigest()


def assign_writers(encoded: EncodedState, world_size: int) -> list[int | None]:
    """The rank that writes each plain (replicated) tensor, None for DTensors (every shard is
    written by its own rank). Largest first onto the least loaded rank: the same answer on
    every rank, and the bytes spread evenly."""
    owners: list[int | None] = [None] * len(encoded.tensors)
    loads = [(0, r) for r in range(world_size)]  # a heap of (bytes so far, rank)
    plain = [i for i, leaf in enumerate(encoded.tensors) if leaf.shard is None]
    for i in sorted(plain, key=lambda i: (-encoded.tensors[i].spec.nbytes, i)):
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + encoded.tensors[i].spec.nbytes, rank))
    return owners


@dataclass
class ShareJob:
    """One rank's part of a distributed save, planned before any byte is copied: the global
    layout (``encoded``, tensor values dropped), and the ``pieces`` this rank writes with
    ``leaves`` holding their values (plain tensors: what to stage or write)."""

    encoded: EncodedState
    digest: str
    pieces: list[Piece]
    leaves: list[TensorLeaf]
    tensor_index: list[int]  # per piece: its tensor in ``encoded``
    replicas: dict[int, int]  # CRC-32 of each small plain tensor, by index (compared across ranks)


def plan_share(encoded: EncodedState, rank: int, world_size: int) -> ShareJob:
    """What ``rank`` writes of ``encoded``: its DTensor shards (unless another rank writes a
    replica of them) and the plain tensors :func:`assign_writers` gives it."""
    owners = assign_writers(encoded, world_size)
    keys = unique_keys([t.path for t in encoded.tensors])
    pieces: list[Piece] = []
    leaves: list[TensorLeaf] = []
    index: list[int] = []
    for i, (leaf, key) in enumerate(zip(encoded.tensors, keys, strict=True)):
        shard = leaf.shard
        if shard is None:
            if owners[i] != rank:
                continue
            value, offsets, spec = leaf.value, (0,) * len(leaf.spec.shape), leaf.spec
        elif leaf.spec.numel == 0:
            # An empty global tensor still needs one (empty) chunk: rank 0 writes it.
            if rank != 0:
                continue
            value, offsets, spec = (
                shard.local.new_empty(leaf.spec.shape),
                (0,) * len(leaf.spec.shape),
                leaf.spec,
            )
        else:
            if not shard.writer or shard.local.numel() == 0:
                continue  # a replica of a shard another rank writes, or an empty uneven shard
            value, offsets = shard.local, shard.offsets
            spec = ArraySpec(leaf.spec.kind, leaf.spec.dtype, shard.shape)
        pieces.append(Piece(len(leaves), key, spec, offsets))
        leaves.append(TensorLeaf(value, spec, leaf.path))
        index.append(i)
    layout_only = EncodedState(encoded.tree, [replace(t, value=None, shard=None) for t in encoded.tensors])
    return ShareJob(layout_only, _layout_digest(encoded), pieces, leaves, index, replica_digests(encoded))


def replica_digests(encoded: EncodedState) -> dict[int, int]:
    """CRC-32 of every plain tensor/array of at most REPLICA_CHECK_BYTES bytes, by index."""
    found = {}
    for i, leaf in enumerate(encoded.tensors):
        if leaf.shard is None and leaf.value is not None and leaf.spec.nbytes <= REPLICA_CHECK_BYTES:
            view, _owner = arrays.to_host_bytes(leaf.value)
            found[i] = zlib.crc32(view)
    return found


def _warn_if_replicas_differ(final: Path, job: ShareJob, answers: list[dict[str, Any]], world: int) -> None:
    """On rank 0: name the plain tensors whose value is not the same on every rank (only one
    rank's value is written), and which rank's value the checkpoint holds."""
    owners = assign_writers(job.encoded, world)
    lines = []
    for index, crc in sorted(answers[0]["replicas"].items()):
        differ = [r for r, a in enumerate(answers) if a["replicas"].get(index) != crc]
        if differ:
            path = job.encoded.tensors[index].path
            lines.append(
                f"{path} (rank {', '.join(map(str, differ))} differ from rank 0; the checkpoint "
                f"holds rank {owners[index]}'s)"
            )
    if not lines:
        return
    shown = "; ".join(lines[:10]) + (f"; and {len(lines) - 10} more" if len(lines) > 10 else "")
    message = (
        f"saving {final}: plain tensors differ between ranks: {shown}. A plain tensor is saved "
        "once, as replicated; make a per-rank value a DTensor, gather it under per-rank keys "
        "(as RNGState does), or save it with process_group='local' (docs/distributed.md)"
    )
    logger.warning("%s", message)
    warnings.warn(message, RuntimeWarning, stacklevel=4)


@_gc.paused()
def save(
    state_or_stateful: Stateful | Mapping[str, Any],
    path: sync.PathLike,
    *,
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    process_group: Any = None,
    timeout: timedelta | float | None = None,
) -> CheckpointInfo:
    """Save from every rank of ``process_group`` (default: the world group) into one
    checkpoint; call it on every rank with the same path::

        info = ckptproto.io.distributed.save({"models": {"model": model}}, "ckpt/step_5",
                                             timeout=60)

    ``timeout`` (seconds or a timedelta, default 30 minutes) bounds each wait for the other
    ranks, the write of the largest rank's data included. Returns the same CheckpointInfo on
    every rank; raises DistributedCheckpointError on every rank if any rank failed.
    """
    group = resolve_group(process_group)
    if group is None:
        return sync.save(state_or_stateful, path, metadata=metadata, overwrite=overwrite, process_group=LOCAL)
    ctl = _Control(group, timeout)
    local: BaseException | None = None
    job: ShareJob | None = None
    metadata_tree: Any = None
    sources: list[memoryview] = []
    owners = []  # keeps contiguous/CPU copies alive until written
    try:
        state = sync._resolve_statefuls(protocol.state_of(state_or_stateful))
        encoded = encode_state(state)
        metadata_tree = sync.encode_metadata(metadata, state)
        job = plan_share(encoded, ctl.rank, ctl.size)
        for leaf in job.leaves:
            view, owner = arrays.to_host_bytes(leaf.value)
            sources.append(view)
            owners.append(owner)
    except Exception as exc:
        local = exc
    return run_protocol(Path(path), job, metadata_tree, sources, ctl, overwrite=overwrite, failed=local)


def run_protocol(
    final: Path,
    job: ShareJob | None,
    metadata_tree: Any,
    sources: list[memoryview],
    ctl: _Control,
    *,
    overwrite: bool,
    failed: BaseException | None = None,
) -> CheckpointInfo:
    """The collective part of a save, on every rank: ``sources[i]`` holds the bytes of
    ``job.pieces[i]`` (live tensors, or staged copies for an async save). ``failed``: this rank
    already failed (``job`` is then None) and reports it to the others."""
    where = f"saving {final}"
    temp: Path | None = None
    local = failed
    mine: dict[str, Any] = _failure(failed) if failed is not None else {}
    if failed is None:
        try:
            if ctl.rank == 0:
                temp = commit.begin(final, overwrite=overwrite)
            assert job is not None
            mine = {
                "ok": True,
                "digest": job.digest,
                "temp": str(temp),
                "path": os.path.abspath(final),
                "replicas": job.replicas,
            }
        except Exception as exc:
            local, mine = exc, _failure(exc)
    try:
        answers = ctl.exchange(mine, where)
        _check(answers, where, local, _NOT_COMMITTED)
        differ = [r for r, a in enumerate(answers) if a["digest"] != answers[0]["digest"]]
        if differ:
            raise DistributedCheckpointError(
                f"{where}: the state of rank {', '.join(map(str, differ))} holds different tensors "
                "(paths, dtypes or global shapes) than rank 0's; every rank must save the same state",
                failed_ranks={r: "state differs from rank 0's" for r in differ},
            )
        elsewhere = [r for r, a in enumerate(answers) if a["path"] != answers[0]["path"]]
        if elsewhere:
            raise DistributedCheckpointError(
                f"{where}: rank {', '.join(map(str, elsewhere))} saves to "
                f"{answers[elsewhere[0]]['path']}, rank 0 to {answers[0]['path']}; every rank "
                "must pass the same path",
                failed_ranks={r: f"saves to {answers[r]['path']}" for r in elsewhere},
            )
        assert job is not None
        if ctl.rank == 0:
            _warn_if_replicas_differ(final, job, answers, ctl.size)
        temp = Path(answers[0]["temp"])
        try:
            mine = {"ok": True, **_write_share(temp, job, sources, ctl.rank)}
        except Exception as exc:
            local, mine = exc, _failure(exc)
        answers = ctl.exchange(mine, where)
        _check(answers, where, local, _NOT_COMMITTED)
        if ctl.rank == 0:
            try:
                manifest = _commit(
                    final, temp, job.encoded, metadata_tree, answers, ctl.size, overwrite=overwrite
                )
                mine = {"ok": True, "manifest": _summary(manifest)}
            except Exception as exc:
                local, mine = exc, _failure(exc)
                commit.abort(temp)
            temp = None
        else:
            mine = {"ok": True}
        answers = ctl.exchange(mine, where)
        _check(answers, where, local, _NOT_COMMITTED)
    except BaseException:
        if temp is not None and ctl.rank == 0:
            commit.abort(temp)
        raise
    manifest = _from_summary(answers[0]["manifest"])
    return CheckpointInfo.from_manifest(final, manifest, sync._decode_metadata(manifest, final))


def _write_share(temp: Path, job: ShareJob, sources: list[memoryview], rank: int) -> dict[str, Any]:
    if not job.pieces:
        return {"file": None, "chunks": []}
    file_plan = plan_file(layout.data_file_name(rank), rank, job.pieces)
    entry = writer.write_file(temp, file_plan, sources)
    return {
        "file": [file_plan.name, entry.size, entry.checksum],
        "chunks": [
            [job.tensor_index[p.source], p.key, list(p.offsets), list(p.spec.shape)] for p in job.pieces
        ],
    }


def _commit(
    final: Path,
    temp: Path,
    encoded: EncodedState,
    metadata_tree: Any,
    answers: list[dict[str, Any]],
    world_size: int,
    *,
    overwrite: bool,
) -> Manifest:
    files: dict[str, FileEntry] = {}
    chunks: list[list[Chunk]] = [[] for _ in encoded.tensors]
    for rank, answer in enumerate(answers):
        if answer["file"] is None:
            continue
        name, size, checksum = answer["file"]
        files[name] = FileEntry(size, checksum, rank)
        for index, key, offsets, shape in answer["chunks"]:
            chunks[index].append(Chunk(name, key, tuple(offsets), tuple(shape)))
    tensors = []
    for leaf, found in zip(encoded.tensors, chunks, strict=True):
        covered = sum(c.numel for c in found)
        if covered != leaf.spec.numel or not found:
            raise DistributedCheckpointError(
                f"{final}: {leaf.path}: the ranks' shards hold {covered} of its {leaf.spec.numel} "
                "elements; a DTensor's device mesh must lie inside the process group that saves it"
            )
        found.sort(key=lambda c: c.offsets)
        tensors.append(TensorEntry(leaf.spec.dtype, leaf.spec.shape, tuple(found)))
    manifest = sync.build_manifest(encoded, metadata_tree, files, tensors)
    manifest.world_size = world_size
    data = manifest.to_json()
    Manifest.parse(data, str(temp / layout.MANIFEST_NAME))  # catches overlapping shards
    writer.write_small_file(temp, layout.MANIFEST_NAME, data)
    commit.finish(temp, final, overwrite=overwrite)
    return manifest


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
        world_size=doc["world_size"], writer=sync.WRITER,
    )  # fmt: skip


def _manifest_digest(manifest: Manifest) -> str:
    files = sorted((n, f.checksum, f.size) for n, f in manifest.files.items())
    return hashlib.sha256(json.dumps([manifest.created, files]).encode()).hexdigest()


def load(
    path: sync.PathLike,
    *,
    map_location: Any = None,
    mmap: bool = False,
    verify: bool | None = None,
    process_group: Any = None,
    timeout: timedelta | float | None = None,
) -> dict[str, Any]:
    """Load the whole state on every rank of the group, as full tensors; checks that every
    rank loaded the same checkpoint (DistributedCheckpointError names a rank that failed or
    saw a different one)::

        state = ckptproto.load("ckpt/step_5")   # under torchrun: on every rank
    """
    group = resolve_group(process_group)
    if group is None:
        return sync.load(path, map_location=map_location, mmap=mmap, verify=verify, process_group=LOCAL)
    ctl = _Control(group, timeout)
    local: BaseException | None = None
    state: dict[str, Any] = {}
    try:
        state, manifest = sync.load_local(path, map_location=map_location, mmap=mmap, verify=verify)
        mine: dict[str, Any] = {"ok": True, "digest": _manifest_digest(manifest)}
    except Exception as exc:
        local, mine = exc, _failure(exc)
    _agree(ctl.exchange(mine, f"loading {path}"), f"loading {path}", local)
    return state


def _agree(answers: list[dict[str, Any]], what: str, local: BaseException | None) -> None:
    _check(answers, what, local)
    differ = [r for r, a in enumerate(answers) if a["digest"] != answers[0]["digest"]]
    if differ:
        raise DistributedCheckpointError(
            f"{what}: rank {', '.join(map(str, differ))} read a different checkpoint than rank 0 "
            "(is the directory on a file system every rank shares?)",
            failed_ranks={r: "read a different checkpoint" for r in differ},
        )


class _ShardMatcher(sync._Matcher):
    """Matches DTensor targets by their global dtype and shape."""

    def _tensor(self, ref: Any, target: Any, path: str) -> None:
        if not dtensor.is_dtensor(target):
            super()._tensor(ref, target, path)
            return
        entry = self.manifest.tensors[ref.index]
        described = dtensor.describe(target)
        if isinstance(described, str):
            self.mismatched.append(f"{path}: {described}")
            return
        spec = described[0]
        if spec.dtype != entry.dtype or spec.shape != entry.shape or ref.kind != "torch":
            self.mismatched.append(
                f"{path}: checkpoint has {ref.kind} {entry.dtype.name}{list(entry.shape)}, "
                f"target has DTensor {spec.dtype.name}{list(spec.shape)}"
            )
            return
        self.destinations.setdefault(ref.index, []).append(target)


@_gc.paused()
def load_into(
    path: sync.PathLike,
    target: Stateful | MutableMapping[str, Any],
    *,
    strict: bool = True,
    verify: bool = True,
    process_group: Any = None,
    timeout: timedelta | float | None = None,
) -> CheckpointInfo:
    """Load into existing objects on every rank; a DTensor target (an FSDP2 parameter, its
    optimizer state) receives only its local shard, and only the chunk rows overlapping it
    are read, whatever the number of ranks that saved the checkpoint::

        ckptproto.load_into("ckpt/step_5", {"models": {"model": model},
                                            "optimizers": {"optimizer": opt}})

    With ``verify`` each data file's checksum is computed by one rank (files spread over the
    ranks) and any mismatch fails the load on every rank.
    """
    group = resolve_group(process_group)
    if group is None:
        return sync.load_into(path, target, strict=strict, verify=verify, process_group=LOCAL)
    ctl = _Control(group, timeout)
    root = Path(path)
    what = f"loading {root}"
    local: BaseException | None = None
    loaded: tuple[Manifest, dict[int, Any]] | None = None
    is_stateful = sync._is_stateful(target)
    checked: set[str] = set()
    # One generation of the checkpoint, held open from the first read to the last checksum.
    ckpt: reader.OpenCheckpoint | None = None
    try:
        try:
            ckpt = reader.OpenCheckpoint(root)
            loaded = _read_into(ckpt, target, strict, verify, is_stateful, checked)
            mine: dict[str, Any] = {
                "ok": True,
                "digest": _manifest_digest(loaded[0]),
                "checked": sorted(checked),
            }
        except Exception as exc:
            local, mine = exc, _failure(exc)
        answers = ctl.exchange(mine, what)
        _agree(answers, what, local)
        assert loaded is not None and ckpt is not None
        manifest, values = loaded
        if verify:
            # Files no rank read whole (and so checksummed for free) are checked now, spread
            # over the ranks; any mismatch fails the load everywhere.
            unchecked = sorted(set(manifest.files) - {n for a in answers for n in a["checked"]})
            if unchecked:
                try:
                    _verify_files(ckpt, unchecked[ctl.rank :: ctl.size])
                    mine = {"ok": True, "digest": answers[0]["digest"]}
                except Exception as exc:
                    local, mine = exc, _failure(exc)
                _agree(ctl.exchange(mine, what), what, local)
    finally:
        if ckpt is not None:
            ckpt.close()
    where = str(root / layout.MANIFEST_NAME)
    state = decode_tree(manifest.state, lambda kind, index, p: values[index], where=where)
    if is_stateful:
        sync._call_load_state_dict(target, state, strict)  # type: ignore[arg-type]
    else:
        sync._assign(target, state, strict)
    return CheckpointInfo.from_manifest(root, manifest, sync._decode_metadata(manifest, root))


def _read_into(
    ckpt: reader.OpenCheckpoint, target: Any, strict: bool, verify: bool, is_stateful: bool, checked: set[str]
) -> tuple[Manifest, dict[int, Any]]:
    root = ckpt.path
    if not is_stateful and not isinstance(target, MutableMapping):
        raise StateMismatchError(f"load_into needs a Stateful or a dict, got {type(target).__qualname__}")
    where = str(root / layout.MANIFEST_NAME)
    kinds = reader.tensor_kinds(ckpt.manifest, where)
    refs: dict[int, sync._Ref] = {}
    skeleton = decode_tree(
        ckpt.manifest.state,
        lambda kind, index, p: refs.setdefault(index, sync._Ref(kind, index)),
        where=where,
    )
    matcher = _ShardMatcher(ckpt.manifest, strict=strict, reject_unexpected=strict and not is_stateful)
    matcher.match(skeleton, target, "")
    matcher.raise_problems(root)
    values: dict[int, Any] = {}
    plan = reader.ReadPlan()
    copies: list[tuple[Any, Any]] = []
    for index, (kind, _paths) in kinds.items():
        entry = ckpt.manifest.tensors[index]
        targets = matcher.destinations.get(index, [])
        first = targets[0] if targets else None
        if first is not None and dtensor.is_dtensor(first):
            described = dtensor.describe(first)
            assert not isinstance(described, str)  # checked by the matcher
            shard = described[1]
            spec = ArraySpec("torch", entry.dtype, shard.shape)
            local, dest = shard.local, arrays.writable_bytes(shard.local)
            if dest is None:  # not a contiguous CPU tensor: read beside it, copy after
                local, dest = arrays.allocate(spec)
                copies.append((shard.local, local))
            reader.plan_box_into(ckpt, plan, index, shard.offsets, spec, local, dest)
            values[index] = first
            copies.extend((t, first) for t in targets[1:])
            continue
        spec = ArraySpec(kind, entry.dtype, entry.shape)
        dest = arrays.writable_bytes(first) if first is not None else None
        if dest is not None:
            value = first
        else:
            value, dest = arrays.allocate(spec)
        values[index] = value
        copies.extend((t, value) for t in targets if t is not value)
        reader.plan_into(ckpt, plan, index, spec, value, dest)
    checked |= reader.execute(ckpt, plan, verify=verify, partial="skip")
    manifest = ckpt.manifest
    for dst, src in copies:
        sync._copy_into(dst, src)
    return manifest, values


def _verify_files(ckpt: reader.OpenCheckpoint, names: list[str]) -> None:
    problems: list[str] = []
    for name in names:
        try:
            reader.check_file(ckpt, name, ckpt.files[name])
        except CheckpointCorruptError as exc:
            problems.extend(exc.problems)
    if problems:
        raise CheckpointCorruptError("; ".join(problems), problems=problems)
