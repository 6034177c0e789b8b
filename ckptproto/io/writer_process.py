"""The checkpoint writer process: an async save's write, checksum, fsync and commit, run in a
long-lived child process so that none of it holds the training process's GIL.

Staged bytes are already host copies in a shared slab (a memfd, ``staging.Slab``); the child
maps that memfd and runs the same :func:`ckptproto.io.pipeline.run` a writer thread would,
on the same local storage, with the same commit protocol::

    proc = WriterProcess()
    info = proc.run(describe(final, encoded, metadata_tree, overwrite, staged.shared()))
    proc.close()

The job goes over a private socketpair: the memfd as SCM_RIGHTS, the layout as JSON (the
tree, a module's state dict as its keys, the paths no such column implies and the distinct
specs, :mod:`ckptproto.io.share_wire`; the tree's text by the manifest's own writer,
``json_text.tree``; nothing is pickled or marshalled, here as everywhere on the default
path), each tensor's spec and place in the slab as raw int64s; the child plans the pieces
itself. The result, or the save's own exception by class name and message, comes back as
JSON. If the child dies, the save fails with CheckpointWriteError and the next save starts a
new child. It is started by ``ckptproto._child.python_command`` (not
multiprocessing's spawn, which re-imports the training script's ``__main__``), imports only
ckptproto and numpy (never torch), and exits when its parent closes the socket or dies. A
parent that dies hard (SIGKILL, the OOM killer) takes its save in flight with it, as it would
take a writer thread: the child watches a pipe only the parent holds open and exits at once,
so no checkpoint is committed after the training process that asked for it is gone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import socket
import struct
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from ckptproto import _gc, errors
from ckptproto._child import child_env, python_command
from ckptproto.arrays import HostRanges
from ckptproto.errors import CheckpointError, CheckpointWriteError
from ckptproto.format.info import CheckpointInfo
from ckptproto.format.manifest import Manifest
from ckptproto.io import direct, pipeline, share_wire
from ckptproto.io.coordinate import Solo
from ckptproto.io.local_storage import LocalStorage
from ckptproto.io.meta import decode_metadata
from ckptproto.location import Location
from ckptproto.tree import EncodedState

logger = logging.getLogger("ckptproto")

_HEADER = struct.Struct("!QQ")  # lengths of the JSON job and of the raw int64s that follow; 0, 0: exit
_ANSWER = struct.Struct("!Q")  # the length of the JSON answer that follows
_ACK = b"+"  # the child has the whole job (sent before it starts on it)


@dataclass
class WireJob:
    """One staged save, encoded for the writer process: the JSON ``message`` (destination,
    layout, metadata), the ``raw`` int64s (each tensor's spec and place in the slab) and the
    slab's memfd ``fd``. It holds no Python object per tensor, so a save in flight adds nothing
    for the training process's garbage collector to walk."""

    final: Location
    message: bytes
    raw: bytes
    fd: int
    metadata_tree: Any


def describe(
    final: Location,
    encoded: EncodedState,
    metadata_tree: Any,
    overwrite: bool,
    shared: tuple[int, np.ndarray[Any, Any]],
) -> WireJob:
    """The job :meth:`WriterProcess.run` sends for a world of one's save of ``encoded``, its
    tensors staged in the slab ``shared`` (``Staged.shared()``: its memfd and each tensor's
    ``(offset, length)``, in the order of ``encoded.tensors``)::

        job = describe(final, encoded, metadata_tree, False, staged.shared())
    """
    fd, spans = shared
    columns, tree, spec_ids = share_wire.pack(encoded)
    job = {"final": str(final), "metadata": metadata_tree, "overwrite": overwrite, "share": columns}
    # (No cycle check: both trees come from the encoder, which refuses cycles: -2 ms at 20,000.)
    text = json.dumps(job, separators=(",", ":"), check_circular=False)
    # The tree goes in as the job's last member, before its closing brace.
    message = "".join((text[:-1], ',"tree":', tree, "}")).encode()
    # Raw int64s after the JSON: each tensor's spec in the table, then its (offset, length).
    raw = spec_ids.tobytes() + spans.astype(np.int64, copy=False).tobytes()
    return WireJob(final, message, raw, fd, metadata_tree)


def available() -> bool:
    """Whether this platform can run the writer process (memfd and fd passing: Linux)."""
    return hasattr(os, "memfd_create") and hasattr(socket, "send_fds")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other end closed the socket")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


class WriterProcess:
    """One child process that writes and commits saves, one at a time, for one AsyncSaver.
    Started on the first :meth:`run`; restarted by the next one if it died."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._sock: socket.socket | None = None
        self._alive: int | None = None  # write end of the pipe whose closing tells the child we died

    @property
    def pid(self) -> int | None:
        """The child's process id while one is running (None before the first save)."""
        return self._proc.pid if self._proc is not None and self._proc.poll() is None else None

    def _start(self) -> socket.socket:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # Only this process holds the write end (not inheritable): the child reads EOF from
        # its end when we are gone, however we went.
        watch, alive = os.pipe()
        try:
            self._proc = subprocess.Popen(
                # This very ckptproto, whatever the current directory holds (ckptproto._child).
                python_command("ckptproto.io.writer_main:start", str(theirs.fileno()), str(watch)),
                pass_fds=(theirs.fileno(), watch),
                stdin=subprocess.DEVNULL,
                env=child_env(os.environ),
                # Its own session: a Ctrl-C meant for the training loop must not kill a save
                # in the middle (the parent finishes its pending saves at exit).
                start_new_session=True,
            )
        except OSError:
            mine.close()
            os.close(alive)
            raise
        finally:
            theirs.close()
            os.close(watch)
        self._close_alive()
        self._sock, self._alive = mine, alive
        return mine

    def _close_alive(self) -> None:
        alive, self._alive = self._alive, None
        if alive is not None:
            os.close(alive)

    def run(self, job: WireJob) -> CheckpointInfo:
        """Write and commit one staged save (local storage) in the child; raises what the save
        raised there (the same CheckpointError subclass and message), or CheckpointWriteError
        if the child died."""
        final = job.final
        with self._lock:
            self._hand_over(final, job.message, job.raw, job.fd)
            try:
                size = _ANSWER.unpack(_recv_exact(self._sock_or_raise(), _ANSWER.size))[0]
                answer = json.loads(_recv_exact(self._sock_or_raise(), size))
            except (OSError, EOFError) as exc:
                raise self._died(final, exc) from exc
        if answer.get("ok"):
            # The info pipeline.run returned there, rebuilt from what this process already has
            # (the metadata it asked to save) and what only the child knows.
            manifest = Manifest(
                state={}, tensors=[], files={}, metadata=job.metadata_tree, created=answer["created"]
            )
            info = CheckpointInfo.from_manifest(final, manifest, decode_metadata(manifest, final))
            return replace(info, nbytes=answer["nbytes"], format_version=answer["format_version"])
        raise _error(answer.get("type"), str(answer.get("message")))

    def _sock_or_raise(self) -> socket.socket:
        if self._sock is None:
            raise EOFError("the writer process is not running")
        return self._sock

    def _hand_over(self, final: Location, message: bytes, raw: bytes, fd: int) -> None:
        """Send the job; returns once the child acknowledged it. A child that died before
        that (killed while idle, say) cannot have started the save: a new one is started and
        the job sent again, once."""
        for attempt in (1, 2):
            try:
                sock = self._sock if self._sock is not None and self.pid is not None else self._start()
            except OSError as exc:
                raise CheckpointWriteError(
                    f"saving {final}: cannot start the checkpoint writer process: {exc}"
                ) from exc
            try:
                socket.send_fds(sock, [_HEADER.pack(len(message), len(raw))], [fd])
                sock.sendall(message + raw)
                if _recv_exact(sock, 1) == _ACK:
                    return
                raise EOFError("the writer process answered out of turn")
            except (OSError, EOFError) as exc:
                error = self._died(final, exc)
                if attempt == 2:
                    raise error from exc
                logger.warning("the checkpoint writer process was gone (%s); starting a new one", error)

    def _died(self, final: Location, exc: BaseException) -> CheckpointWriteError:
        """Reap a child that stopped answering; the error for the save it had."""
        proc, self._proc = self._proc, None
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._close_alive()
        code = None
        if proc is not None:
            try:
                code = proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
        return CheckpointWriteError(
            f"saving {final}: the checkpoint writer process (pid {proc.pid if proc else '?'}) "
            f"exited with code {code} before it reported the save ({exc}); the checkpoint was not "
            "committed (a hidden temporary directory may be left, which readers ignore). The next "
            "save starts a new writer process"
        )

    def close(self) -> None:
        """Stop the child (after the save it is running, if any); idempotent."""
        with self._lock:
            proc, self._proc = self._proc, None
            sock, self._sock = self._sock, None
            if sock is not None:
                with contextlib.suppress(OSError):  # it may be gone already
                    sock.sendall(_HEADER.pack(0, 0))
                sock.close()
            if proc is not None:
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    logger.error("the checkpoint writer process %s did not exit; killing it", proc.pid)
                    proc.kill()
                    proc.wait()
            self._close_alive()

    def forget(self) -> None:
        """In a forked child: the parent's writer process is the parent's; start afresh (and
        let go of the parent's pipe end, or the child would outlive the parent for it)."""
        self._close_alive()
        self._lock = threading.Lock()
        self._proc = None
        self._sock = None


# -- the child's side ---------------------------------------------------------------------------


def _error(kind: object, message: str) -> CheckpointError:
    """The exception a failed save raised in the child, as this process raises it: the same
    CheckpointError subclass and message; anything else as CheckpointWriteError."""
    cls = getattr(errors, kind, None) if isinstance(kind, str) else None
    if isinstance(cls, type) and issubclass(cls, CheckpointError):
        return cls(message)
    return CheckpointWriteError(f"the checkpoint writer process failed: {kind}: {message}")


def _serve_one(sock: socket.socket, maps: dict[tuple[int, int], mmap.mmap]) -> bool:
    header, fds, _flags, _addr = socket.recv_fds(sock, _HEADER.size, 4)
    if not header:
        return False
    if len(header) < _HEADER.size:
        header += _recv_exact(sock, _HEADER.size - len(header))
    size, raw_size = _HEADER.unpack(header)
    if size == 0:
        for fd in fds:
            os.close(fd)
        return False
    message = _recv_exact(sock, size + raw_size)
    sock.sendall(_ACK)
    # The collector paused through the whole job, not only the pipeline: decoding it makes
    # ~100,000 objects at 20,000 tensors, none in a cycle, whose young collections cost more
    # CPU than the decoding itself (the child's CPU per save: 155 -> 100 ms).
    with _gc.paused():
        try:
            answer = _run_job(message, size, fds, maps)
        finally:
            _SAVING.clear()
            for fd in fds:
                os.close(fd)
    data = json.dumps(answer).encode()
    sock.sendall(_ANSWER.pack(len(data)) + data)
    return True


def _run_job(
    message: bytes, size: int, fds: list[int], maps: dict[tuple[int, int], mmap.mmap]
) -> dict[str, Any]:
    """Run one received job; the answer for the training process (a failure as its type and
    message)."""
    try:
        if len(fds) != 1:
            raise CheckpointError(f"internal error: the writer process got {len(fds)} descriptors, not 1")
        try:
            job, found = share_wire.loads(message[:size])
        except ValueError as exc:  # (UnicodeDecodeError too)
            raise CheckpointError(f"internal error: the writer process got a malformed job ({exc})") from None
        if type(job) is not dict:
            raise CheckpointError("internal error: the writer process got a malformed job (not an object)")
        stat = os.fstat(fds[0])
        key = (stat.st_dev, stat.st_ino)
        if key not in maps or len(maps[key]) != stat.st_size:
            maps.clear()  # slabs the parent dropped are unmapped here too
            # Populated at once: one call maps every page, not one fault per page on first read.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            maps[key] = mmap.mmap(fds[0], stat.st_size, flags=flags, prot=mmap.PROT_READ)
        whole = memoryview(maps[key])
        raw = np.frombuffer(message, dtype=np.int64, offset=size)
        count = job["share"]["count"]
        if type(count) is not int or len(raw) != 3 * count:
            raise CheckpointError("internal error: the writer process got a malformed job (spans)")
        share = share_wire.unpack(job["share"], raw[:count], job["tree"], found)
        spans = raw[count:].reshape(-1, 2)
        if len(spans) and (int(spans.min()) < 0 or int(spans.sum(axis=1).max()) > len(whole)):
            raise CheckpointError(
                "internal error: the writer process got a malformed job (spans past its slab)"
            )
        views: Sequence[memoryview]
        if len(spans) and int(spans[:, 1].min()) > 0:
            # Ranges of the slab (positions in it, as addresses from 0): small pieces are
            # joined by numpy copies, with no view made per tensor.
            views = HostRanges(spans[:, 0], spans[:, 1], (0, whole))
        else:  # (slices made and taken in C: a Python step per tensor costs ~1.5x as much)
            views = list(map(whole.__getitem__, map(slice, spans[:, 0].tolist(), spans.sum(axis=1).tolist())))
        _SAVING.set()
        info = pipeline.run(
            Path(job["final"]),
            share,
            job["metadata"],
            views,
            Solo(),
            overwrite=job["overwrite"],
            storage=LocalStorage(),
        )
        del views, whole
    except Exception as exc:
        return {"ok": False, "type": type(exc).__name__, "message": str(exc)}
    return {
        "ok": True,
        "created": info.created.isoformat() if info.created is not None else "",
        "nbytes": info.nbytes,
        "format_version": info.format_version,
    }


_SAVING = threading.Event()  # set while a save is in flight in this child
# The exit status of a child whose parent died: EX_TEMPFAIL, nothing committed.
PARENT_GONE_EXIT = 75


def _watch_parent(fd: int) -> None:
    """Exit as soon as the parent is gone (EOF on the pipe whose write end only it holds):
    a save it asked for is abandoned, as a writer thread would have died with it, and its
    hidden temporary directory is left for the next save's sweep (its lock dies with us)."""
    with contextlib.suppress(OSError):
        while os.read(fd, 1):
            pass
    if _SAVING.is_set():
        with contextlib.suppress(OSError):
            os.write(2, b"ckptproto writer process: the training process is gone; its save is abandoned\n")
    os._exit(PARENT_GONE_EXIT)


def main(fd: int, parent_pipe: int | None = None) -> None:
    """The child's loop: serve saves until the parent says stop or goes away."""
    direct.prefer()  # its CPU is taken from the training loop: large files skip the page cache
    if parent_pipe is not None:
        threading.Thread(target=_watch_parent, args=(parent_pipe,), name="parent-watch", daemon=True).start()
    sock = socket.socket(fileno=fd)
    maps: dict[tuple[int, int], mmap.mmap] = {}
    try:
        while _serve_one(sock, maps):
            pass
    except (EOFError, ConnectionError):
        pass  # the parent died or closed the socket: nothing is waiting for an answer
    finally:
        sock.close()
