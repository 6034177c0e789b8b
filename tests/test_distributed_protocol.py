"""The messages of a distributed save and load (real gloo ranks): a save is three one-way
messages through rank 0 and a load one exchange, with no collective of torch.distributed; a
payload larger than one message slot arrives whole; and every rank raises the same error,
naming every rank that failed, whichever step failed where."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from _dist_helpers import run_ranks

import ckptproto
from ckptproto.format import layout
from ckptproto.io import coordinate, writer

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch.distributed is not available"
)

_COLLECTIVES = ["barrier", "monitored_barrier", "all_gather_object", "all_gather", "broadcast_object_list",
                "gather_object", "scatter_object_list", "broadcast", "all_reduce"]  # fmt: skip


class _Spy:
    """Counts this rank's point-to-point messages; any torch.distributed collective fails."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.sent = 0
        self.saved = {name: getattr(dist, name) for name in _COLLECTIVES}
        self.real_send = coordinate.Group._send

    def __enter__(self) -> _Spy:
        def refuse(name: str) -> Any:
            def collective(*args: Any, **kwargs: Any) -> Any:
                raise AssertionError(f"a save or load called torch.distributed.{name}")

            return collective

        for name in _COLLECTIVES:
            setattr(self.dist, name, refuse(name))

        def send(group: coordinate.Group, parts: list[Any], peer: int) -> list[tuple[int, Any]]:
            self.sent += len(parts)
            return self.real_send(group, parts, peer)

        coordinate.Group._send = send  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        for name, fn in self.saved.items():
            setattr(self.dist, name, fn)
        coordinate.Group._send = self.real_send  # type: ignore[method-assign]


def _raises_everywhere(fn: Any) -> ckptproto.DistributedCheckpointError:
    try:
        fn()
    except ckptproto.DistributedCheckpointError as exc:
        return exc
    raise AssertionError("should have failed on every rank")


def scenario_protocol(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    result: dict[str, Any] = {}
    # 1. The messages of one save and one load.
    state = {"w": list(torch.arange(24.0).reshape(6, 4)), "step": 3}
    with _Spy() as spy:
        ckptproto.save(state, tmp / "a")
        result["save_sent"] = spy.sent
    with _Spy() as spy:
        target = {"w": [torch.zeros(4) for _ in range(6)], "step": 0}
        ckptproto.load_into(tmp / "a", target)
        result["load_sent"] = spy.sent
    assert torch.equal(torch.stack(target["w"]), torch.arange(24.0).reshape(6, 4))

    # 2. Payloads over one slot (each rank's chunk list): sent in two parts, arrive whole.
    many = {f"t{i:05d}": torch.full((2,), float(i)) for i in range(3000)}
    with _Spy() as spy:
        info = ckptproto.save({"many": many}, tmp / "many")
        result["many_sent"] = spy.sent
    assert sorted(ckptproto.read_manifest(tmp / "many").files) == [
        layout.data_file_name(r) for r in range(world)
    ]
    assert info.nbytes == sum((tmp / "many" / layout.data_file_name(r)).stat().st_size for r in range(world))
    back = {"many": {k: torch.zeros(2) for k in many}}
    ckptproto.load_into(tmp / "many", back)
    assert all(torch.equal(back["many"][k], v) for k, v in many.items())

    # A group of another backend (NCCL) talks over a gloo twin of its ranks, made once.
    import torch.distributed as dist

    real_backend = dist.get_backend
    dist.get_backend = lambda group=None: "nccl"  # type: ignore[assignment]
    try:
        ckptproto.save(state, tmp / "twin")
        ckptproto.save(state, tmp / "twin2")
    finally:
        dist.get_backend = real_backend
    result["twins"] = len(coordinate._CONTROL_GROUPS)
    assert ckptproto.load(tmp / "twin2", process_group="local")["step"] == 3

    # 3. Rank 0 fails to begin (the path exists, overwrite=False): nobody writes a byte.
    written: list[str] = []
    real_write = writer.write_file

    def spy_write(*args: Any, **kwargs: Any) -> Any:
        written.append(str(args[1].name))
        return real_write(*args, **kwargs)

    writer.write_file = spy_write
    try:
        exc = _raises_everywhere(lambda: ckptproto.save(state, tmp / "a"))
    finally:
        writer.write_file = real_write
    assert written == [], written
    result["exists"] = {"message": str(exc), "failed": exc.failed_ranks}

    # 4. Two ranks fail at once, each its own way: both are named, on every rank.
    odd: dict[str, Any] = {"w": torch.ones(3)}
    if rank == 1:
        odd["bad"] = object()  # not a value the format stores
    if rank == 2:
        odd["extra"] = torch.ones(1)  # another layout than rank 0's
    exc = _raises_everywhere(lambda: ckptproto.save(odd, tmp / "odd"))
    result["two"] = {"message": str(exc), "failed": exc.failed_ranks}
    assert not (tmp / "odd").exists()
    torch.distributed.barrier()
    if rank == 0:
        assert not [p.name for p in tmp.iterdir() if layout.is_leftover(p.name)]
    return result


def test_messages_and_failures_of_a_distributed_save(tmp_path: Path) -> None:
    world = 3
    results = run_ranks(scenario_protocol, world, tmp_path)
    # A save: rank 0 sends its temporary directory and then the outcome to every other rank,
    # and each of them sends rank 0 its file (was: three rounds of monitored_barrier and
    # all_gather_object). A load: one exchange, in and out through rank 0.
    assert [results[r]["save_sent"] for r in range(world)] == [2 * (world - 1), 1, 1]
    assert [results[r]["load_sent"] for r in range(world)] == [world - 1, 1, 1]
    # Over a slot: one more message from each rank with a long chunk list.
    assert [results[r]["many_sent"] for r in range(world)] == [2 * (world - 1), 2, 2]
    assert all(results[r]["twins"] == 1 for r in range(world)), results
    for key in ("exists", "two"):
        assert len({results[r][key]["message"] for r in range(world)}) == 1, key  # alike everywhere
    exists = results[0]["exists"]
    assert list(exists["failed"]) == ["0"] and exists["failed"]["0"].startswith("CheckpointExistsError")
    two = results[0]["two"]
    assert two["failed"]["2"] == "state differs from rank 0's", two
    assert two["failed"]["1"].startswith("UnsupportedValueError") and "bad" in two["failed"]["1"], two
    assert "every rank must save the same state" in two["message"], two
    assert ckptproto.load(tmp_path / "a")["step"] == 3  # the existing checkpoint is untouched
