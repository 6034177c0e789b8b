"""ckptproto: a checkpoint protocol, an open on-disk format, and a reference saver/loader.

::

    import ckptproto

    info = ckptproto.save({"models": {"model": model.state_dict()}, "trainer": {"global_step": 7}},
                          "checkpoints/checkpoint_step_7")
    state = ckptproto.load("checkpoints/checkpoint_step_7")
    ckptproto.load_into("checkpoints/checkpoint_step_7", {"models": {"model": model}})
"""

from ckptproto._recent import clear_caches
from ckptproto.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    CheckpointWriteError,
    DistributedCheckpointError,
    SaverBusyError,
    StateMismatchError,
    UnsupportedValueError,
)
from ckptproto.format.info import CheckpointInfo
from ckptproto.format.manifest import FORMAT_VERSION, Manifest
from ckptproto.io.async_save import AsyncSaver, SaveFuture, save_async
from ckptproto.io.commit import remove_leftovers
from ckptproto.io.reader import read_manifest
from ckptproto.io.sync import load, load_into, read_info, save, verify
from ckptproto.policy.async_checkpoint import AsyncCheckpointCallback
from ckptproto.policy.callbacks import Callback, CallbackCollection, TrainerLike
from ckptproto.policy.checkpoint import CheckpointCallback, ResumeWarning
from ckptproto.policy.discovery import CheckpointRecord, find_checkpoints
from ckptproto.policy.manager import CheckpointManager
from ckptproto.policy.params import CheckpointParameters
from ckptproto.policy.rng import RNGState
from ckptproto.policy.trainer import TrainState
from ckptproto.protocol import Stateful

__version__ = "0.1.0"

__all__ = [
    "FORMAT_VERSION",
    "AsyncCheckpointCallback",
    "AsyncSaver",
    "Callback",
    "CallbackCollection",
    "CheckpointCallback",
    "CheckpointCorruptError",
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointFormatError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointParameters",
    "CheckpointRecord",
    "CheckpointReplacedError",
    "CheckpointWriteError",
    "DistributedCheckpointError",
    "Manifest",
    "RNGState",
    "ResumeWarning",
    "SaveFuture",
    "SaverBusyError",
    "StateMismatchError",
    "Stateful",
    "TrainState",
    "TrainerLike",
    "UnsupportedValueError",
    "__version__",
    "clear_caches",
    "find_checkpoints",
    "load",
    "load_into",
    "read_info",
    "read_manifest",
    "remove_leftovers",
    "save",
    "save_async",
    "verify",
]
