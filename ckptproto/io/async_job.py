"""One async save's job and its write: in the training process (the writer thread runs the save
pipeline) or in the checkpoint writer process (:mod:`ckptproto.io.writer_process`)::

    job.process = use_process(job, "auto", coordinator)   # in save(), before staging
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
from ckptproto.io.coordinate import Coordinator
from ckptproto.io.local_storage import LocalStorage
from ckptproto.io.save_future import SaveFuture
from ckptproto.io.share import ShareJob
from ckptproto.io.staging import Staged
from ckptproto.io.storage import Storage
from ckptproto.location import Location

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
    share: ShareJob | None  # this rank's part of the save: its pieces and their live values
    storage: Storage
    final: Location
    metadata_tree: Any
    overwrite: bool
    ready: staging.Ready
    versions: list[int | None] = field(default_factory=list)  # of share.leaves, at save()
    staged: Staged | None = None
    process: bool = False  # staged into a shared slab, for the writer process
    wire: writer_process.WireJob | None = None  # the job as the writer process gets it (share: None)


def use_process(job: SaveJob, writer: WriterMode, coordinator: Coordinator) -> bool:
    """Whether ``job`` goes to the writer process (its bytes are then staged into a shared
    slab; if a CUDA tensor puts them in a pinned slab, the write stays on the thread)."""
    if writer == "thread" or coordinator.distributed:
        return False  # a distributed save's exchanges run on the training process's side
    # The child writes through a LocalStorage of its own (a subclass's behaviour would be lost)
    if type(job.storage) is not LocalStorage or not writer_process.available():
        return False
    assert job.share is not None
    pieces = job.share.pieces
    if writer == "process" or len(pieces) >= PROCESS_MIN_TENSORS:
        return True
    return sum(piece.spec.nbytes for piece in pieces) >= PROCESS_MIN_BYTES


def hand_off(job: SaveJob) -> None:
    """Once ``job`` is staged: if its bytes are in a shared slab, encode it for the writer
    process now and drop its share (tens of thousands of small objects at 20,000 tensors).
    Called while the collector is paused, this leaves the collector nothing new to count or
    walk while the save is in flight: such objects, alive across the training loop's
    allocations, cost it young and then full collections (~100 ms each at 20,000 tensors)."""
    if not job.process or job.staged is None or job.share is None:
        return
    shared = job.staged.shared()
    if shared is None:  # CUDA tensors (a pinned slab), or no shared memory: the thread writes
        return
    job.wire = writer_process.describe(job.final, job.share, job.metadata_tree, job.overwrite, shared)
    job.share = None
    job.staged.views = []  # the writer process finds the bytes by their places in the slab


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
