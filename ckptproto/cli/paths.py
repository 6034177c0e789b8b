"""What a user passed where a checkpoint (or a directory of checkpoints) was expected, and
what they probably meant. The CLI checks its arguments with these before doing any work,
so a wrong path gets one line that says what is there and which command would work::

    $ ckptproto verify checkpoints
    ckptproto verify: checkpoints is a directory of 3 checkpoints, not a checkpoint; did you
    mean `ckptproto verify checkpoints/checkpoint_step_30` (the newest) or `ckptproto ls checkpoints`?
"""

from __future__ import annotations

import difflib
import shlex
from pathlib import Path

from ckptproto.errors import CheckpointNotFoundError
from ckptproto.format import layout
from ckptproto.io.storage import Storage
from ckptproto.policy.discovery import order, scan
from ckptproto.policy.locations import Location, LocationLike, resolve


def _cmd(*words: str | Location) -> str:
    return "`" + " ".join(["ckptproto", *(shlex.quote(str(w)) for w in words)]) + "`"


def _is_dir(storage: Storage, path: Location) -> bool:
    # an object store has no directories: a prefix with something under it is one
    return path.is_dir() if isinstance(path, Path) else bool(storage.entries(path))


def missing_problem(path: LocationLike) -> str:
    """``path`` does not exist: name the closest existing sibling, if one is close."""
    storage, where = resolve(path)
    parent = where.parent
    try:
        names = [e.name for e in storage.entries(parent) if not layout.is_hidden(e.name)]
    except OSError:  # e.g. a parent we may not read: no suggestion, the path is still missing
        names = []
    close = difflib.get_close_matches(where.name, names, n=1, cutoff=0.6)
    if close:
        return f"{where} does not exist; did you mean {parent / close[0]}?"
    if str(parent) not in ("", ".") and parent != where and not storage.exists(parent):
        return f"{where} does not exist (nor does {parent})"
    return f"{where} does not exist"


def _newest_checkpoint(root: Location) -> Location | None:
    records, _problems = scan(root)
    latest = order(records, "latest")
    return latest[0].path if latest else None


def _count_checkpoints(storage: Storage, root: Location) -> int:
    return sum(1 for e in storage.entries(root) if e.is_dir and storage.is_committed(root / e.name))


def _converted_name(name: str) -> str:
    dot = name.rfind(".")
    return name[:dot] if 0 < dot < len(name) - 1 else name + "_ckpt"  # as Path.with_suffix("")


def _convert_hint(path: Location, converted: Location) -> str:
    if isinstance(path, Path):
        return f"to make one from it: {_cmd('convert', path, converted, '--to', 'ckptproto')}"
    # ckptproto convert reads other formats from local files only
    local = Path(path.name)
    return (
        f"to make one from it, download it and run "
        f"{_cmd('convert', local, _converted_name(local.name), '--to', 'ckptproto')}"
    )


def _file_problem(storage: Storage, path: Location, command: str) -> str:
    """``path`` is a file: the manifest or a data file of a checkpoint, or a foreign format."""
    parent = path.parent
    if storage.is_committed(parent):
        return f"{path} is a file inside the checkpoint {parent}; did you mean {_cmd(command, parent)}?"
    if isinstance(path, Path) and not path.is_file():  # a FIFO or a device: never read (it could block)
        return f"{path} is not a regular file, not a checkpoint (a directory holding {layout.MANIFEST_NAME})"
    head = storage.read_head(path, 9)
    if path.name.endswith(".safetensors") or (len(head) == 9 and head[8:9] == b"{"):
        kind = "a plain safetensors file"
    elif head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        kind = "a torch.save file"
    else:
        kind = "a file"
    converted = parent / _converted_name(path.name)
    return (
        f"{path} is {kind}, not a ckptproto checkpoint (a directory holding {layout.MANIFEST_NAME}); "
        f"{_convert_hint(path, converted)}"
    )


def checkpoint_problem(path: LocationLike, command: str) -> str | None:
    """None when ``path`` (a path or an object-store URL) is a committed checkpoint (or a
    damaged one: data files, no manifest, which ``verify`` reports); otherwise one line saying
    what is there and what the user probably meant, for ``ckptproto {command} PATH``."""
    storage, p = resolve(path)
    if isinstance(p, Path) and p.is_symlink() and not p.exists():
        return f"{p} is a broken symbolic link"
    if not storage.exists(p):
        return missing_problem(p)
    if not _is_dir(storage, p):
        return _file_problem(storage, p, command)
    if storage.is_committed(p):
        return None
    if layout.is_leftover(p.name):
        return f"{p} is the temporary directory of an unfinished or interrupted save, never a checkpoint"
    if storage.exists(p / ".metadata"):
        return (
            f"{p} is a torch.distributed.checkpoint (DCP) directory, not a ckptproto checkpoint; "
            f"{_convert_hint(p, p.parent / (p.name + '_ckptproto'))}"
        )
    n = _count_checkpoints(storage, p)
    if n:
        newest = _newest_checkpoint(p)
        hint = f"{_cmd(command, newest)} (the newest) or " if newest is not None else ""
        return (
            f"{p} is a directory of {n} checkpoint(s), not a checkpoint; did you mean {hint}{_cmd('ls', p)}?"
        )
    if any(e.name.endswith(".safetensors") for e in storage.entries(p)):
        return None  # data files without a manifest: a damaged checkpoint, for verify to report
    return f"{p} is a directory without {layout.MANIFEST_NAME}: not a checkpoint, and it holds none"


def require_checkpoint(path: LocationLike, command: str) -> None:
    """Raise CheckpointNotFoundError (one line, with a hint) unless ``path`` is a checkpoint."""
    problem = checkpoint_problem(path, command)
    if problem is not None:
        raise CheckpointNotFoundError(problem)


def root_problem(path: LocationLike) -> str | None:
    """None when ``path`` (a path or an object-store URL) may hold checkpoints (``ckptproto ls
    ROOT``); otherwise one line saying what is there and what the user probably meant."""
    storage, p = resolve(path)
    if not storage.exists(p):
        return missing_problem(p)
    if not _is_dir(storage, p):
        parent = p.parent
        if storage.is_committed(parent):
            return (
                f"{p} is a file inside the checkpoint {parent}; did you mean "
                f"{_cmd('inspect', parent)} or {_cmd('ls', parent.parent)}?"
            )
        return f"{p} is a file, not a directory of checkpoints; did you mean {_cmd('ls', parent)}?"
    if storage.is_committed(p):
        parent = p.parent if p.name or not isinstance(p, Path) else p.absolute().parent
        return (
            f"{p} is a checkpoint, not a directory of checkpoints; did you mean "
            f"{_cmd('inspect', p)} or {_cmd('ls', parent)}?"
        )
    return None
