"""The torn-snapshot guard of background staging: a state mutated in place while it was being
copied fails its save instead of committing a checkpoint that mixes two steps
(docs/async.md, "The torn-snapshot guard")::

    versions = capture_versions(leaves)          # on the caller's thread, in save()
    staged = stage_state(pool, leaves, ready)    # later, on the staging thread
    staged.synchronize()
    check_not_mutated(leaves, versions, staged.views, where=str(path))
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ckptproto import arrays
from ckptproto.errors import CheckpointError
from ckptproto.tree import TensorLeaf


def is_cuda(value: object) -> bool:
    """True for a tensor that lives on a device (not a numpy array, not a CPU tensor)."""
    # ``is_cpu`` is a plain flag; ``.device.type`` builds a device object (~0.5 us a tensor)
    return not (isinstance(value, np.ndarray) or value.is_cpu)  # type: ignore[attr-defined]


def check_unchanged(leaf: TensorLeaf) -> None:
    """A tensor resized (or given new data) in place after ``save`` was called, before
    background staging copied it, would otherwise be broadcast, truncated or converted."""
    now = arrays.try_spec(leaf.value)
    if now != leaf.spec:
        was = f"{leaf.spec.dtype.name}{list(leaf.spec.shape)}"
        got = f"{now.dtype.name}{list(now.shape)}" if now is not None else "an unsupported value"
        raise CheckpointError(
            f"{leaf.path}: the tensor changed from {was} to {got} after save() was called; "
            "call wait_staged() before mutating the state"
        )


def capture_versions(leaves: Sequence[TensorLeaf]) -> list[int | None]:
    """torch's in-place version counter of every tensor, read on the caller's thread when it
    asks for the save (None for numpy arrays and inference tensors, which have none)."""
    versions: list[int | None] = []
    for leaf in leaves:
        version = None
        if not isinstance(leaf.value, np.ndarray) and leaf.value is not None:
            try:
                version = int(leaf.value._version)
            except RuntimeError:  # "Inference tensors do not track version counter"
                version = None
        versions.append(version)
    return versions


def check_not_mutated(
    leaves: Sequence[TensorLeaf], versions: Sequence[int | None], views: Sequence[memoryview], *, where: str
) -> None:
    """Refuse a torn snapshot: raise CheckpointError naming the first tensor changed in place
    between the save request (``versions``, from :func:`capture_versions`) and the end of its
    staging (``views``, synchronized). Two independent tests, because neither sees everything:

    * torch's version counter, bumped by every in-place op autograd knows of (``optimizer.step``
      with or without ``foreach``, ``add_``, ``copy_``, ``zero_``), CPU and CUDA alike;
    * for host tensors and numpy arrays, the staged bytes compared with the live ones: catches
      writes the counter misses (fused optimizers, BatchNorm statistics updated in the forward
      pass, ``.data``, numpy) made after the tensor was copied and before staging ended.
    """
    for leaf, version, view in zip(leaves, versions, views, strict=True):
        value = leaf.value
        if value is None:
            continue
        if version is not None and int(value._version) != version:
            raise CheckpointError(
                _torn_message(leaf, where, f"torch version counter {version} -> {value._version}")
            )
        if leaf.spec.nbytes and not is_cuda(value):
            live, _owner = arrays.host_bytes(value)
            if not _same_bytes(live, view):
                raise CheckpointError(_torn_message(leaf, where, "its bytes changed while they were copied"))


SMALL_COMPARE = 64 * 1024


def _same_bytes(a: memoryview, b: memoryview) -> bool:
    if len(a) <= SMALL_COMPARE:
        # Two small copies and one memcmp: 6x faster than np.array_equal's per-call overhead
        # (85 -> 14 ms at 20,000 tensors of 1 KiB); memoryview == compares element by element.
        return a.tobytes() == b.tobytes()
    return bool(np.array_equal(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)))


def _torn_message(leaf: TensorLeaf, where: str, how: str) -> str:
    return (
        f"{where}: {leaf.path}: the tensor was modified in place ({how}) while the save was "
        "staging it in the background; the checkpoint would mix two steps, so nothing was "
        "committed. Call fut.wait_staged() (AsyncCheckpointCallback: pre_optimizer_step()) "
        "before changing the state, e.g. before optimizer.step(), or use staging='blocking'"
    )
