"""A checkpoint's metadata and manifest as the pipelines build and read them::

tree = encode_metadata({"metrics": {"loss": 0.3}}, state)   # step/epoch from "trainer"
meta = decode_metadata(manifest, path)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from ckptproto import protocol
from ckptproto.errors import CheckpointFormatError, UnsupportedValueError
from ckptproto.format import layout
from ckptproto.format.manifest import FileEntry, Manifest, TensorEntry
from ckptproto.location import Location
from ckptproto.tree import EncodedState, decode_tree, encode_state

WRITER = "ckptproto 0.1.0"


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
    encoded: EncodedState,
    metadata_tree: Any,
    files: dict[str, FileEntry],
    tensors: Sequence[TensorEntry],
    world_size: int = 1,
) -> Manifest:
    """The manifest of a save, stamped with this writer and the current time."""
    return Manifest(
        state=encoded.tree,
        tensors=tensors,
        files=files,
        metadata=metadata_tree,
        created=datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        world_size=world_size,
        writer=WRITER,
    )


def decode_metadata(manifest: Manifest, path: Location) -> dict[str, Any]:
    """The manifest's ``metadata`` as plain values; CheckpointFormatError if it is not an
    object or refers to a tensor."""

    def no_tensors(kind: str, index: int, p: str) -> Any:
        raise CheckpointFormatError(f"{path}: metadata.{p} refers to a tensor")

    meta = decode_tree(manifest.metadata, no_tensors, where=f"{path / layout.MANIFEST_NAME} (metadata)")
    if not isinstance(meta, dict):
        raise CheckpointFormatError(f"{path / layout.MANIFEST_NAME}: metadata must be an object")
    return meta
