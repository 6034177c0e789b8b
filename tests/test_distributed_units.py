"""Single-process parts of distributed checkpointing: the writer assignment, and reading a
box of a tensor stored as many chunks (the resharding read path)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import ckptproto
from ckptproto.arrays import ArraySpec, allocate
from ckptproto.format import layout
from ckptproto.format.manifest import TensorEntry
from ckptproto.io import commit, coordinate, meta, reader, readplan, share, wire, writer
from ckptproto.io.plan import Piece, plan_file
from ckptproto.tree import encode_state


def test_assign_writers_balances_and_is_deterministic() -> None:
    state = {f"t{i}": np.zeros(n, dtype=np.float32) for i, n in enumerate([100, 7, 50, 50, 3, 0, 99])}
    encoded = encode_state(state)
    owners = share.assign_writers(encoded, 3)
    assert owners == share.assign_writers(encode_state(state), 3)
    assert all(o is not None and 0 <= o < 3 for o in owners)
    loads = [0, 0, 0]
    for leaf, owner in zip(encoded.tensors, owners, strict=True):
        assert owner is not None
        loads[owner] += leaf.spec.nbytes
    assert max(loads) - min(loads) <= 100 * 4  # never worse than the largest tensor
    assert share.assign_writers(encoded, 1) == [0] * len(owners)


def test_resolve_group_without_torch_distributed() -> None:
    assert coordinate.resolve_group(None) is None  # not initialised in this process
    assert coordinate.resolve_group(coordinate.LOCAL) is None
    sentinel = object()
    assert coordinate.resolve_group(sentinel) is sentinel


def _chunked_checkpoint(path: Path, full: np.ndarray, cuts: list[list[int]]) -> None:
    """A checkpoint holding ``full`` as the grid of chunks that ``cuts`` (per dim) makes,
    spread over two data files, as a distributed save would write it."""
    grids = np.meshgrid(*[np.arange(len(c) - 1) for c in cuts], indexing="ij")
    boxes = []
    for index in zip(*(g.ravel() for g in grids), strict=True):
        lo = tuple(cuts[d][i] for d, i in enumerate(index))
        hi = tuple(cuts[d][i + 1] for d, i in enumerate(index))
        boxes.append((lo, hi))
    encoded = encode_state({"x": full})
    temp = commit.begin(path, overwrite=False)
    files, chunks = {}, []
    for rank in (0, 1):
        mine = boxes[rank::2]
        parts = [
            np.ascontiguousarray(full[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))])
            for lo, hi in mine
        ]
        pieces = [
            Piece(i, f"x@{i}", ArraySpec("numpy", encoded.tensors[0].spec.dtype, p.shape), lo)
            for i, ((lo, _hi), p) in enumerate(zip(mine, parts, strict=True))
        ]
        plan = plan_file(layout.data_file_name(rank), rank, pieces)
        files[plan.name] = writer.write_file(temp, plan, [memoryview(p).cast("B") for p in parts])
        chunks += list(plan.chunks().values())
    entry = TensorEntry(encoded.tensors[0].spec.dtype, full.shape, tuple(chunks))
    manifest = meta.build_manifest(encoded, {}, files, [entry])
    writer.write_small_file(temp, layout.MANIFEST_NAME, manifest.to_json())
    commit.finish(temp, path)


@pytest.mark.parametrize(
    ("shape", "cuts"),
    [
        ((10, 6), [[0, 3, 7, 10], [0, 2, 6]]),  # chunks split columns: boxes need the copy path
        ((9, 4, 5), [[0, 4, 9], [0, 4], [0, 1, 5]]),
        ((11,), [[0, 5, 6, 11]]),
    ],
)
def test_plan_box_into_reads_any_box(tmp_path: Path, shape: tuple[int, ...], cuts: list[list[int]]) -> None:
    full = np.arange(np.prod(shape), dtype=np.float64).reshape(shape)
    _chunked_checkpoint(tmp_path / "c", full, cuts)
    assert np.array_equal(ckptproto.load(tmp_path / "c")["x"], full)
    rng = np.random.default_rng(0)
    with reader.OpenCheckpoint(tmp_path / "c") as ckpt:
        for _ in range(40):
            lo = tuple(int(rng.integers(0, n)) for n in shape)
            hi = tuple(int(rng.integers(a + 1, n + 1)) for a, n in zip(lo, shape, strict=True))
            box_shape = tuple(b - a for a, b in zip(lo, hi, strict=True))
            spec = ArraySpec("numpy", ckpt.manifest.tensors[0].dtype, box_shape)
            value, dest = allocate(spec)
            value[...] = -1
            plan = readplan.ReadPlan()
            readplan.plan_box_into(ckpt, plan, 0, lo, spec, value, dest)
            readplan.execute(ckpt, plan, verify=True, partial="skip")
            want = full[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))]
            assert np.array_equal(value, want), (lo, hi)
            # Only rows overlapping the box are read: never more than the chunks' row slabs.
            read = sum(len(r.dest) for reads in plan.reads.values() for r in reads)
            assert read <= full.itemsize * box_shape[0] * int(np.prod(shape[1:])) * max(1, len(cuts[0]))


def test_plan_box_into_scalar(tmp_path: Path) -> None:
    ckptproto.save({"s": np.array(2.5)}, tmp_path / "s")
    with reader.OpenCheckpoint(tmp_path / "s") as ckpt:
        spec = ArraySpec("numpy", ckpt.manifest.tensors[0].dtype, ())
        value, dest = allocate(spec)
        plan = readplan.ReadPlan()
        readplan.plan_box_into(ckpt, plan, 0, (), spec, value, dest)
        # The read covers the whole data file, so its checksum came for free.
        assert readplan.execute(ckpt, plan, verify=True, partial="skip") == {layout.data_file_name(0)}
        assert value == 2.5


@pytest.mark.parametrize("extra", [-9, -8, -1, 0, 1, 100_000])
def test_a_message_of_any_size_arrives_whole(extra: int) -> None:
    pytest.importorskip("torch")
    # The payload's pickle ends just before, at and after the end of the first slot.
    base = len(json.dumps({"x": ""}, separators=(",", ":")))
    size = max(0, wire.SLOT - wire.LENGTH - base + extra)
    payload = {"x": "y" * size}
    parts = wire.pack(payload)
    assert len(parts[0]) == wire.SLOT
    rest = wire.rest(parts[0])
    assert (rest is None) == (len(parts) == 1)
    if rest is not None:
        assert len(rest) == len(parts[1])
        rest.copy_(parts[1])
    assert wire.unpack(parts[0], rest) == payload


def test_a_verdict_names_every_failed_rank_once() -> None:
    answers = [
        {"ok": True},
        {"ok": False, "error": "did not answer", "gone": "Connection closed by peer"},
        {"ok": False, "error": "OSError: disk full"},
        {"ok": False, "error": "state differs from rank 0's", "detail": "its state holds other tensors"},
        {"ok": False, "error": "OSError: disk full"},
    ]
    outcome = coordinate.Solo().verdict(answers, "saving c", "; nothing was committed")
    assert outcome is not None and not outcome["ok"]
    assert outcome["failed"] == {r: a["error"] for r, a in enumerate(answers) if r}
    assert outcome["error"] == (
        "saving c: rank 1 did not answer within 1800 s: Connection closed by peer; failed on rank "
        "2, 3, 4; nothing was committed (rank 2, 4: OSError: disk full; rank 3: its state holds "
        "other tensors)"
    )
    assert coordinate.Solo().verdict([{"ok": True}], "saving c") is None


def test_messages_are_json_and_refuse_what_json_cannot_carry() -> None:
    torch = pytest.importorskip("torch")
    # A metric tensor travels as its number; tuples arrive as lists; an object is refused
    # here, on the sending rank, rather than pickled.
    payload = {"score": torch.tensor(0.25), "pair": (True, "x"), "n": np.float32(2.0).item()}
    parts = wire.pack(payload)
    assert bytes(parts[0][wire.LENGTH :].numpy()).startswith(b"{")
    assert wire.unpack(parts[0], None) == {"score": 0.25, "pair": [True, "x"], "n": 2.0}
    with pytest.raises(TypeError, match="cannot travel between ranks"):
        wire.pack({"value": object()})


def test_writes_go_to_the_kernel_at_most_one_mib_a_call(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A rank's share goes out in 16 MiB batches; each pwritev call writes at most 1 MiB of it
    # (threads.WRITE_CALL_BYTES): calls of 2 MiB and more were ~10x slower here once earlier
    # checkpoints filled the page cache. Short writes (the kernel may take less) still
    # write every byte, in order.
    import os

    from ckptproto.io import threads

    calls: list[int] = []
    real = os.pwritev

    def short_pwritev(fd: int, views: list[memoryview], offset: int) -> int:
        asked = sum(len(v) for v in views)
        calls.append(asked)
        if asked > 4096:  # the kernel writes only the first part: pwritev_all must go on
            flat = b"".join(bytes(v) for v in views)[: asked - 1000]
            return real(fd, [flat], offset)
        return real(fd, views, offset)

    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 256, n, dtype=np.uint8) for n in (3 << 20, 10, 0, (1 << 20) + 7, 5000)]
    path = tmp_path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    monkeypatch.setattr(os, "pwritev", short_pwritev)
    try:
        threads.pwritev_all(fd, [memoryview(p) for p in parts], 0)
    finally:
        monkeypatch.setattr(os, "pwritev", real)
        os.close(fd)
    assert path.read_bytes() == b"".join(p.tobytes() for p in parts)
    assert max(calls) == threads.WRITE_CALL_BYTES == 1 << 20
