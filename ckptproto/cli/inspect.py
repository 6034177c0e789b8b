"""``ckptproto inspect PATH``: a checkpoint's tree with dtypes, shapes and sizes, and its metadata."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

from ckptproto.cli.ls import human_size
from ckptproto.cli.paths import require_checkpoint
from ckptproto.format import layout
from ckptproto.format.manifest import Manifest
from ckptproto.io.reader import read_manifest
from ckptproto.policy.locations import resolve
from ckptproto.tree import decode_tree


class _Tensor:
    __slots__ = ("desc",)

    def __init__(self, desc: str) -> None:
        self.desc = desc


def register(sub: Any) -> None:
    parser = sub.add_parser("inspect", help="show a checkpoint's tree (dtypes, shapes, sizes) and metadata")
    parser.add_argument("path", metavar="PATH", help="checkpoint directory or URL (s3://bucket/run/step_10)")
    parser.add_argument("--depth", type=int, default=None, help="show the tree only this deep")
    parser.set_defaults(run=run)


def _describe(manifest: Manifest, kind: str, index: int) -> _Tensor:
    if index >= len(manifest.tensors):
        return _Tensor(f"{kind} <bad reference {index}>")
    entry = manifest.tensors[index]
    chunks = f", {len(entry.chunks)} chunks" if len(entry.chunks) > 1 else ""
    return _Tensor(f"{kind} {entry.dtype.name}{list(entry.shape)} {human_size(entry.nbytes)}{chunks}")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _print_tree(node: Any, indent: int, depth: int | None) -> None:
    pad = "  " * indent
    items: list[tuple[Any, Any]]
    if isinstance(node, Mapping):
        items = list(node.items())
    elif isinstance(node, (list, tuple)) and any(
        isinstance(v, (_Tensor, Mapping, list, tuple)) for v in node
    ):
        items = list(enumerate(node))
    else:
        return
    for key, value in items:
        if isinstance(value, _Tensor):
            print(f"{pad}{key}: {value.desc}")
        elif isinstance(value, Mapping) or (
            isinstance(value, (list, tuple))
            and any(isinstance(v, (_Tensor, Mapping, list, tuple)) for v in value)
        ):
            if depth is not None and indent + 1 >= depth:
                print(f"{pad}{key}: ({len(value)} entries)")
            else:
                print(f"{pad}{key}:")
                _print_tree(value, indent + 1, depth)
        else:
            print(f"{pad}{key}: {_short(value)}")


def run(args: argparse.Namespace) -> int:
    require_checkpoint(args.path, "inspect")
    _storage, root = resolve(args.path)
    manifest = read_manifest(root)  # through the storage: a path or a URL
    where = str(root / layout.MANIFEST_NAME)
    state = decode_tree(manifest.state, lambda kind, index, p: _describe(manifest, kind, index), where=where)
    metadata = decode_tree(manifest.metadata, lambda kind, index, p: None, where=where)
    print(f"checkpoint {root}")
    print(f"  format {manifest.version[0]}.{manifest.version[1]}, written by {manifest.writer or '?'}")
    print(f"  created {manifest.created or '?'}")
    print(
        f"  {len(manifest.tensors)} tensors, {human_size(manifest.nbytes)} in {len(manifest.files)} data file(s)"
    )
    print("metadata:")
    for line in json.dumps(metadata, indent=2, sort_keys=True, default=repr).splitlines():
        print(f"  {line}")
    print("state:")
    _print_tree(state, 1, args.depth)
    return 0
