"""The public entry points of the reference saver and loader, one pipeline each::

    info = save(state, "ckpt/step_10")            # ckptproto.io.pipeline (sync, distributed)
    state = load("ckpt/step_10")                  # ckptproto.io.restore
    load_into("ckpt/step_10", model)              # ckptproto.io.restore
    verify("ckpt/step_10"); read_info("ckpt/step_10")

The async saver (``ckptproto.io.async_save``) runs the same save pipeline from its threads.
"""

from __future__ import annotations

import os

from ckptproto import _gc
from ckptproto.errors import CheckpointCorruptError, CheckpointError, CheckpointFormatError
from ckptproto.format.info import CheckpointInfo
from ckptproto.io import reader
from ckptproto.io.backends import resolve
from ckptproto.io.meta import decode_metadata
from ckptproto.io.pipeline import save
from ckptproto.io.restore import load, load_into

__all__ = ["load", "load_into", "read_info", "save", "verify"]

PathLike = str | os.PathLike[str]


def read_info(path: PathLike) -> CheckpointInfo:
    """What a checkpoint says about itself (reads only the manifest)::

    info = ckptproto.read_info("checkpoints/checkpoint_step_10")
    print(info.step, info.metrics)
    """
    _storage, root = resolve(path)  # a URL no backend serves is refused, not looked up as a local path
    manifest = reader.read_manifest(root)
    return CheckpointInfo.from_manifest(root, manifest, decode_metadata(manifest, root))


@_gc.paused()
def verify(path: PathLike) -> CheckpointInfo:
    """Check a checkpoint completely: manifest, every data file header and byte range, every
    checksum. Raises CheckpointCorruptError whose ``problems`` lists every damaged file (and
    CheckpointFormatError when the files are intact but break the format; FORMAT.md §9)::

        ckptproto.verify("checkpoints/checkpoint_step_10")
    """
    _storage, root = resolve(path)
    damaged: list[str] = []
    problems: list[str] = []
    opened: list[CheckpointError] = []
    # One generation, pinned (reader.OpenCheckpoint): a concurrent overwrite or deletion never
    # makes a healthy checkpoint look damaged. The manifest is validated whole, values
    # included, when it is read (FORMAT.md §9 step 2).
    with reader.OpenCheckpoint(root, problems=opened) as ckpt:
        manifest = ckpt.manifest
        info = CheckpointInfo.from_manifest(root, manifest, decode_metadata(manifest, root))
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
