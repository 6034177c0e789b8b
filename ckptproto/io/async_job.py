"""One async save's job and its write: in the training process (the writer thread runs the save
pipeline) or in the checkpoint writer process (:mod:`ckptproto.io.writer_process`)::

    job.process = use_process(job, "auto", coordinator)   # in save(), before staging
    if not job.process: plan(job, coordinator)            # the share the thread writes
    leaves = stage_leaves(job)                            # what to stage
    describe(job)                                         # once laid out in slabs
    hand_off(job)                                         # once staged
    info = write(job, coordinator, writer)                # on the saver's writer thread
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ckptproto.errors import CheckpointError
from ckptproto.format.info import CheckpointInfo
from ckptproto.io import pipeline, staging, writer_process
from ckptproto.io.coordinate import Coordinator, Solo
from ckptproto.io.local_storage import LocalStorage
from ckptproto.io.save_future import SaveFuture
from ckptproto.io.share import ShareJob, plan_share
from ckptproto.io.staging import Staged
from ckptproto.io.storage import Storage
from ckptproto.location import Location
from ckptproto.tree import EncodedState, TensorLeaf

WriterMode = Literal["auto", "thread", "process"]

# writer="auto" writes a save from the writer process when it has at least this many tensors
# (the thread's planning and manifest would hold the training process's GIL ~17 us a tensor)
# or at least this many bytes (the thread's checksums and copies into the page cache would take
# a core, and GIL hand-offs, from the training process). Below both, the thread's work is small
# and the process would add a round trip. See docs/async.md, "Where the write runs".
PROCESS_MIN_TENSORS = 1000
PROCESS_MIN_BYTES = 16 << 20


@dataclass
class SaveJob:
    """One accepted save on its way through the saver's threads."""

    future: SaveFuture
    # This rank's part of the save: its pieces and their live values. Planned in save() when the
    # thread writes; a job for the writer process is planned there, from ``encoded``.
    share: ShareJob | None
    storage: Storage
    final: Location
    metadata_tree: Any
    overwrite: bool
    ready: staging.Ready
    versions: list[int | None] = field(default_factory=list)  # of share.leaves, at save()
    staged: Staged | None = None
    process: bool = False  # staged into a shared slab, for the writer process
    wire: writer_process.WireJob | None = None  # the job as the writer process gets it (share: None)
    encoded: EncodedState | None = None  # the whole state, live values included, until staged


def use_process(job: SaveJob, writer: WriterMode, coordinator: Coordinator) -> bool:
    """Whether ``job`` goes to the writer process (its bytes are then staged into a shared
    slab; if a CUDA tensor puts them in a pinned slab, the write stays on the thread)."""
    if writer == "thread" or coordinator.distributed:
        return False  # a distributed save's exchanges run on the training process's side
    # The child writes through a LocalStorage of its own (a subclass's behaviour would be lost)
    if type(job.storage) is not LocalStorage or not writer_process.available():
        return False
    if job.encoded is None:
        raise CheckpointError(f"{job.future.path}: internal error: the save has no state to write")
    tensors = job.encoded.tensors  # a world of one writes every tensor
    if writer == "process" or len(tensors) >= PROCESS_MIN_TENSORS:
        return True
    return sum(leaf.spec.nbytes for leaf in tensors) >= PROCESS_MIN_BYTES


def plan(job: SaveJob, coordinator: Coordinator) -> ShareJob:
    """``job``'s share on ``coordinator``, planned now if it was not yet."""
    if job.share is None:
        if job.encoded is None:
            raise CheckpointError(f"{job.future.path}: internal error: the save has no state to plan")
        job.share = plan_share(job.encoded, coordinator.rank, coordinator.size)
    return job.share


def stage_leaves(job: SaveJob) -> list[TensorLeaf]:
    """The tensors ``job`` stages: its share's, or, not planned (a job for the writer process:
    a world of one, no DTensor), every tensor of the state."""
    if job.share is not None:
        return job.share.leaves
    if job.encoded is None:
        raise CheckpointError(f"{job.future.path}: internal error: the save has no state to stage")
    return job.encoded.tensors


def describe(job: SaveJob) -> None:
    """Once ``job``'s slabs are laid out (its bytes may still be on their way): if they are in
    one shared slab, encode the job for the writer process (``job.wire``)."""
    if job.staged is None:
        raise CheckpointError(f"{job.future.path}: internal error: the save was not staged")
    shared = job.staged.shared() if job.process and job.encoded is not None else None
    if job.encoded is not None and shared is not None:
        job.wire = writer_process.describe(job.final, job.encoded, job.metadata_tree, job.overwrite, shared)


def hand_off(job: SaveJob) -> None:
    """Once ``job`` is staged (and described), drop its live values (nothing reads
    them any more; CUDA memory can be reused) and every per-tensor object a job for the
    writer process no longer needs (tens of thousands at 20,000 tensors). Called while the
    collector is paused, this leaves the collector nothing new to count or walk while the
    save is in flight: such objects, alive across the training loop's allocations, cost it
    young and then full collections (~100 ms each at 20,000 tensors)."""
    if job.staged is None:
        raise CheckpointError(f"{job.future.path}: internal error: the save was not staged")
    if job.wire is not None:
        job.staged.views = []  # the writer process finds the bytes by their places in the slab
    else:
        # The thread writes (CUDA tensors in a pinned slab, or no shared memory, or it was
        # chosen): a job meant for the writer process is a world of one's, planned here.
        plan(job, Solo()).leaves = []
    job.encoded = None


def write(
    job: SaveJob, coordinator: Coordinator, process: Callable[[], writer_process.WriterProcess]
) -> CheckpointInfo:
    """Write and commit a staged job: in the writer process ``process()`` when it was handed
    off (:func:`hand_off`), else here with the one save pipeline."""
    if job.staged is None:
        raise CheckpointError(f"{job.future.path}: internal error: the save was not staged")
    if job.wire is not None:
        # The same pipeline, in the writer process: none of its Python work (plans, manifest,
        # checksums of small tensors) holds this process's GIL.
        return process().run(job.wire)
    if job.share is None:
        raise CheckpointError(f"{job.future.path}: internal error: the save has no share to write")
    # The pipeline pauses the collector itself, only while plans and the manifest are built.
    return pipeline.run(
        job.final,
        job.share,
        job.metadata_tree,
        job.staged.views,
        coordinator,
        overwrite=job.overwrite,
        storage=job.storage,
    )
