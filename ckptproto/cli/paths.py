"""What a user passed where a checkpoint (or a directory of checkpoints) was expected, and
what they probably meant. The CLI checks its arguments with these before doing any work,
so a wrong path gets one line that says what is there and which command would work::

    $ ckptproto verify checkpoints
    ckptproto verify: checkpoints is a directory of 3 checkpoints, not a checkpoint; did you
    mean `ckptproto verify checkpoints/checkpoint_step_30` (the newest) or `ckptproto ls checkpoints`?
"""

from __future__ import annotations

import difflib
import os
import shlex
from pathlib import Path

from ckptproto.errors import CheckpointNotFoundError
from ckptproto.format import layout
from ckptproto.policy.discovery import order, scan


def _cmd(*words: str | Path) -> str:
    return "`" + " ".join(["ckptproto", *(shlex.quote(str(w)) for w in words)]) + "`"


def _is_checkpoint(path: Path) -> bool:
    return (path / layout.MANIFEST_NAME).is_file()


def missing_problem(path: Path) -> str:
    """``path`` does not exist: name the closest existing sibling, if one is close."""
    parent = path.parent
    try:
        names = [n for n in os.listdir(parent) if not layout.is_hidden(n)]
    except OSError:
        names = []
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    if close:
        return f"{path} does not exist; did you mean {parent / close[0]}?"
    if not parent.exists() and str(parent) not in ("", "."):
        return f"{path} does not exist (nor does {parent})"
    return f"{path} does not exist"


def _newest_checkpoint(root: Path) -> Path | None:
    records, _problems = scan(root)
    latest = order(records, "latest")
    if not latest:
        return None
    found = latest[0].path
    assert isinstance(found, Path)  # scan() of a local directory yields local paths
    return found


def _count_checkpoints(root: Path) -> int:
    try:
        return sum(1 for e in os.scandir(root) if e.is_dir() and _is_checkpoint(Path(e.path)))
    except OSError:
        return 0


def _file_problem(path: Path, command: str) -> str:
    """``path`` is a file: the manifest or a data file of a checkpoint, or a foreign format."""
    parent = path.parent
    if _is_checkpoint(parent):
        return f"{path} is a file inside the checkpoint {parent}; did you mean {_cmd(command, parent)}?"
    if not path.is_file():  # a FIFO or a device: never read (it could block)
        return f"{path} is not a regular file, not a checkpoint (a directory holding {layout.MANIFEST_NAME})"
    with open(path, "rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or (len(head) == 9 and head[8:9] == b"{"):
        kind = "a plain safetensors file"
    elif head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        kind = "a torch.save file"
    else:
        kind = "a file"
    converted = path.with_suffix("") if path.suffix else path.with_name(path.name + "_ckpt")
    return (
        f"{path} is {kind}, not a ckptproto checkpoint (a directory holding {layout.MANIFEST_NAME}); "
        f"to make one from it: {_cmd('convert', path, converted, '--to', 'ckptproto')}"
    )


def checkpoint_problem(path: str | os.PathLike[str], command: str) -> str | None:
    """None when ``path`` is a committed checkpoint directory (or a damaged one: data files,
    no manifest, which ``verify`` reports); otherwise one line saying what is there and what
    the user probably meant, for ``ckptproto {command} PATH``."""
    p = Path(path)
    if p.is_symlink() and not p.exists():
        return f"{p} is a broken symbolic link"
    if not p.exists():
        return missing_problem(p)
    if not p.is_dir():
        return _file_problem(p, command)
    if _is_checkpoint(p):
        return None
    if layout.is_leftover(p.name):
        return f"{p} is the temporary directory of an unfinished or interrupted save, never a checkpoint"
    if (p / ".metadata").is_file():
        return (
            f"{p} is a torch.distributed.checkpoint (DCP) directory, not a ckptproto checkpoint; "
            f"to make one from it: {_cmd('convert', p, str(p).rstrip('/') + '_ckptproto', '--to', 'ckptproto')}"
        )
    n = _count_checkpoints(p)
    if n:
        newest = _newest_checkpoint(p)
        hint = f"{_cmd(command, newest)} (the newest) or " if newest is not None else ""
        return (
            f"{p} is a directory of {n} checkpoint(s), not a checkpoint; did you mean {hint}{_cmd('ls', p)}?"
        )
    if any(n.endswith(".safetensors") for n in os.listdir(p)):
        return None  # data files without a manifest: a damaged checkpoint, for verify to report
    return f"{p} is a directory without {layout.MANIFEST_NAME}: not a checkpoint, and it holds none"


def require_checkpoint(path: str | os.PathLike[str], command: str) -> None:
    """Raise CheckpointNotFoundError (one line, with a hint) unless ``path`` is a checkpoint."""
    problem = checkpoint_problem(path, command)
    if problem is not None:
        raise CheckpointNotFoundError(problem)


def root_problem(path: str | os.PathLike[str]) -> str | None:
    """None when ``path`` is a directory that may hold checkpoints (``ckptproto ls ROOT``);
    otherwise one line saying what is there and what the user probably meant."""
    p = Path(path)
    if not p.exists():
        return missing_problem(p)
    if not p.is_dir():
        parent = p.parent
        if _is_checkpoint(parent):
            return (
                f"{p} is a file inside the checkpoint {parent}; did you mean "
                f"{_cmd('inspect', parent)} or {_cmd('ls', parent.parent)}?"
            )
        return f"{p} is a file, not a directory of checkpoints; did you mean {_cmd('ls', parent)}?"
    if _is_checkpoint(p):
        return (
            f"{p} is a checkpoint, not a directory of checkpoints; did you mean "
            f"{_cmd('inspect', p)} or {_cmd('ls', p.parent if p.name else p.absolute().parent)}?"
        )
    return None
