"""The exceptions ckptproto raises. Every one derives from :class:`CheckpointError`.

Catch the base class to handle any checkpoint problem::

    try:
        state = ckptproto.load("ckpt/step_100")
    except ckptproto.CheckpointError as exc:
        print(f"cannot resume: {exc}")
"""

from __future__ import annotations

from collections.abc import Sequence


class CheckpointError(Exception):
    """Base class of every error ckptproto raises on purpose."""


class UnsupportedValueError(CheckpointError, TypeError):
    """A state holds a value the format cannot store; raised before any byte is written.

    ``path`` is the dotted state path of the offending value, e.g.
    ``optimizers.optimizer.param_groups.0.foo``.
    """

    def __init__(self, message: str, *, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class CheckpointFormatError(CheckpointError, ValueError):
    """A checkpoint (or something claiming to be one) breaks the format specification."""


class CheckpointCorruptError(CheckpointFormatError):
    """Stored bytes do not match their checksum, or a file is truncated or damaged.

    ``problems`` lists every problem found (``verify`` collects all of them before raising).
    """

    def __init__(self, message: str, *, problems: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.problems = list(problems) if problems else [message]


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint exists at the given path."""


class CheckpointReplacedError(CheckpointError):
    """The checkpoint was replaced by another save (``overwrite=True``) while it was being read
    from a store that cannot pin the old generation's files (an object store deletes them once
    the new manifest is in; FORMAT.md F-38). ``ckptproto.load`` reads the new generation
    instead; where this reaches you, read again."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """The destination already holds a checkpoint (pass ``overwrite=True``) or another file."""


class CheckpointWriteError(CheckpointError, OSError):
    """Writing a checkpoint failed (disk full, permissions, ...); nothing was committed."""


class StateMismatchError(CheckpointError, KeyError):
    """``load_into`` found the checkpoint and the target disagree (missing keys, shapes)."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class DistributedCheckpointError(CheckpointError):
    """A distributed save or load failed on one or more ranks; every rank of the group raises
    it. ``failed_ranks`` maps each failed rank (in the group) to what went wrong there::

        except ckptproto.DistributedCheckpointError as exc:
            print(exc.failed_ranks)   # {1: "CheckpointWriteError: writing ... failed: ..."}
    """

    def __init__(self, message: str, *, failed_ranks: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.failed_ranks = dict(failed_ranks or {})


class SaverBusyError(CheckpointError, RuntimeError):
    """An ``AsyncSaver(when_full="raise")`` already has ``max_pending`` saves in flight."""


class PickleRefusedError(CheckpointFormatError):
    """A file (e.g. a ``torch.save`` checkpoint) can only be read by unpickling arbitrary
    objects, which can run code; ckptproto refuses unless explicitly told the file is trusted."""


class MonitorNotFoundError(CheckpointError, ValueError):
    """The metric a checkpoint callback monitors was never reported (e.g. a misspelled
    ``monitor=``); the message lists the metrics that were."""
