"""The S3 backend through the storage protocol, against a real S3-compatible server (moto, in a
subprocess; ``tests/_s3_server.py``): commit, conditional commit, overwrite, pinned
generations, ranged reads, multipart uploads, namespace, sweeping, errors."""

from __future__ import annotations

import json
import re
import struct
import sys
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

import ckptproto
from ckptproto.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointExistsError,
    CheckpointFormatError,
    CheckpointNotFoundError,
    CheckpointReplacedError,
    CheckpointWriteError,
)
from ckptproto.format.manifest import Manifest
from ckptproto.io import backends, pipeline, s3_storage
from ckptproto.io.coordinate import Solo
from ckptproto.io.prepare import prepare
from ckptproto.io.storage import Listed
from ckptproto.location import ObjectLocation, parse_location

MiB = 1 << 20
DATA_NAME = re.compile(r"data-00000-000\.[0-9a-f]{16}\.safetensors")


def _loc(url: str) -> ObjectLocation:
    loc = parse_location(url)
    assert isinstance(loc, ObjectLocation)
    return loc


def _names(storage: s3_storage.S3Storage, loc: ObjectLocation) -> list[str]:
    return [e.name for e in storage.entries(loc)]


def _save(
    storage: s3_storage.S3Storage, url: str, state: dict[str, Any], *, overwrite: bool = False
) -> ckptproto.CheckpointInfo:
    """A real save (prepare, plan, write, commit) through ``storage``."""
    prepared = prepare(state, None, Solo())
    sources = [memoryview(np.ascontiguousarray(leaf.value)).cast("B") for leaf in prepared.share.leaves]
    return pipeline.run(
        _loc(url),
        prepared.share,
        prepared.metadata_tree,
        sources,
        Solo(),
        overwrite=overwrite,
        storage=storage,
    )


def _read_tensor(storage: s3_storage.S3Storage, url: str, key: str) -> np.ndarray:
    """A float64 tensor read back by hand: manifest -> data file -> safetensors header ->
    ranged read (independent of ckptproto's reader)."""
    with storage.open(_loc(url)) as generation:
        manifest = json.loads(generation.read_manifest())
        (name,) = manifest["files"]
        data = generation.open_file(name)
        head = bytearray(8)
        assert data.read_into(0, [memoryview(head)]) == 8
        (length,) = struct.unpack("<Q", head)
        header = bytearray(length)
        data.read_into(8, [memoryview(header)])
        begin, end = json.loads(header)[key]["data_offsets"]
        out = np.empty((end - begin) // 8)
        assert data.read_into(8 + length + begin, [memoryview(out).cast("B")]) == end - begin
        return out


@pytest.fixture
def storage() -> Iterator[s3_storage.S3Storage]:
    yield s3_storage.S3Storage()


def test_resolve_serves_s3_urls_with_the_s3_backend(s3_url: str) -> None:
    backend, final = backends.resolve(s3_url + "/step_1")
    assert backend is s3_storage.S3
    assert final == _loc(s3_url) / "step_1"


def test_a_save_is_a_manifest_and_uniquely_named_data_objects(
    storage: s3_storage.S3Storage, s3_url: str
) -> None:
    url = s3_url + "/step_1"
    info = ckptproto.save({"w": np.arange(1000.0), "step": 3}, url)
    assert str(info.path) == url
    names = _names(storage, _loc(url))
    assert len(names) == 2 and names[1] == "manifest.json" and DATA_NAME.fullmatch(names[0]), names
    assert storage.is_committed(_loc(url))
    assert np.array_equal(_read_tensor(storage, url, "w"), np.arange(1000.0))
    with storage.open(_loc(url)) as generation:
        manifest = Manifest.parse(generation.read_manifest(), url)
        ((name, entry),) = manifest.files.items()
        data = generation.open_file(name)
        assert data.size == entry.size and data.fileno() is None
        whole = bytearray(entry.size)
        assert data.read_into(0, [memoryview(whole)]) == entry.size
        assert f"crc32:{zlib.crc32(whole):08x}" == entry.checksum
        assert not generation.replaced()
    # Each save names its objects anew: a second checkpoint's data object differs.
    ckptproto.save({"w": np.arange(1000.0), "step": 3}, s3_url + "/step_2")
    assert _names(storage, _loc(s3_url + "/step_2"))[0] != names[0]


def test_read_into_scatters_ranges_stops_at_the_end_and_is_thread_safe(
    storage: s3_storage.S3Storage, s3_url: str
) -> None:
    url = s3_url + "/c"
    payload = np.frombuffer(np.random.default_rng(0).bytes(3 * MiB), dtype=np.uint8).copy()
    ckptproto.save({"p": payload}, url)
    with storage.open(_loc(url)) as generation:
        (name,) = json.loads(generation.read_manifest())["files"]
        data = generation.open_file(name)
        whole = bytearray(data.size)
        data.read_into(0, [memoryview(whole)])
        a, b = bytearray(10), bytearray(5)
        assert data.read_into(100, [memoryview(a), memoryview(b)]) == 15
        assert bytes(a + b) == whole[100:115]
        tail = bytearray(64)
        assert data.read_into(data.size - 10, [memoryview(tail)]) == 10
        assert tail[:10] == whole[-10:] and tail[10:] == bytes(54)
        assert data.read_into(data.size, [memoryview(tail)]) == 0
        big = bytearray(data.size)
        failures: list[BaseException] = []

        def reader(start: int) -> None:
            try:
                out = bytearray(1 * MiB)
                data.read_into(start, [memoryview(out)[: MiB // 2], memoryview(out)[MiB // 2 :]])
                assert out == whole[start : start + MiB]
            except BaseException as exc:
                failures.append(exc)

        workers = [threading.Thread(target=reader, args=(i * 12345,)) for i in range(8)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        assert failures == []
        data.read_into(0, [memoryview(big)])
        assert big == whole


def test_large_reads_and_multipart_uploads(
    storage: s3_storage.S3Storage, s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptproto.io import threads

    url = s3_url + "/big"
    small_parts = s3_storage.S3Storage(part_bytes=5 * MiB)
    state = {f"t{i}": np.full(3 * MiB // 8, float(i)) for i in range(5)}  # 15 MiB in 5 tensors
    _save(small_parts, url, state)
    obstore = pytest.importorskip("obstore")
    from ckptproto.io import s3_client

    loc = _loc(url)
    (name,) = [n for n in _names(storage, loc) if n.endswith(".safetensors")]
    meta = obstore.head(s3_client.store(loc.bucket), loc.object_key(name))
    parts = -(-meta["size"] // (5 * MiB))  # 15 MiB + the header: 4 parts
    assert parts == 4 and re.fullmatch(rf'"?[0-9a-f]+-{parts}"?', meta["e_tag"]), meta
    # Reads split into several concurrent parts (smaller parts, to have several here).
    monkeypatch.setattr(threads, "BATCH_BYTES", 2 * MiB)
    with storage.open(loc) as generation:
        manifest = Manifest.parse(generation.read_manifest(), url)
        data = generation.open_file(name)
        whole = bytearray(data.size)
        assert data.read_into(0, [memoryview(whole)]) == data.size
        assert f"crc32:{zlib.crc32(whole):08x}" == manifest.files[name].checksum
    for i in range(5):
        assert np.array_equal(_read_tensor(storage, url, f"t{i}"), state[f"t{i}"])


class _Gated(s3_storage.S3Storage):
    """Holds every commit until ``parties`` saves have reached theirs: all of them passed
    begin's check and uploaded, and only the commit itself can decide."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=60)

    def commit(self, staging: str, final: Any, *, overwrite: bool) -> None:
        self.barrier.wait()
        super().commit(staging, final, overwrite=overwrite)


def _race(n: int, save_one: Any) -> tuple[list[object], list[CheckpointExistsError]]:
    """Run ``save_one(i)`` for i < n on n threads at once; (results, CheckpointExistsErrors)."""
    outcomes: list[object] = []
    barrier = threading.Barrier(n, timeout=60)

    def saver(i: int) -> None:
        barrier.wait()
        try:
            outcomes.append(save_one(i))
        except CheckpointExistsError as exc:
            outcomes.append(exc)

    workers = [threading.Thread(target=saver, args=(i,)) for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(outcomes) == n, outcomes
    losers = [o for o in outcomes if isinstance(o, CheckpointExistsError)]
    return [o for o in outcomes if not isinstance(o, CheckpointExistsError)], losers


@pytest.mark.parametrize("gated", [True, False], ids=["at-commit", "anywhere"])
def test_without_overwrite_exactly_one_of_racing_saves_wins(s3_url: str, gated: bool) -> None:
    # Gated: every save has passed begin's check and uploaded before any commits, so only the
    # conditional put of the manifest decides. Otherwise: through the public API.
    url = s3_url + "/race"
    backend = _Gated(3) if gated else s3_storage.S3
    won, lost = _race(3, lambda i: _save(backend, url, {"w": np.full(100, float(i))}))
    assert len(won) == 1 and len(lost) == 2, (won, lost)
    assert all("overwrite=True" in str(e) for e in lost)
    assert isinstance(won[0], ckptproto.CheckpointInfo)
    names = _names(s3_storage.S3, _loc(url))
    assert len(names) == 2 and names[1] == "manifest.json", names  # the losers' objects are gone
    assert len(set(_read_tensor(s3_storage.S3, url, "w").tolist())) == 1


def test_overwrite_replaces_and_deletes_the_old_generation(
    storage: s3_storage.S3Storage, s3_url: str
) -> None:
    url = s3_url + "/c"
    ckptproto.save({"w": np.ones(10)}, url)
    old = _names(storage, _loc(url))
    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        ckptproto.save({"w": np.zeros(10)}, url)
    assert _names(storage, _loc(url)) == old
    ckptproto.save({"w": np.full(10, 2.0)}, url, overwrite=True)
    new = _names(storage, _loc(url))
    assert len(new) == 2 and set(new) & set(old) == {"manifest.json"}, (old, new)
    assert np.array_equal(_read_tensor(storage, url, "w"), np.full(10, 2.0))


def test_a_reader_of_the_old_generation_never_mixes_generations_F38(
    storage: s3_storage.S3Storage, s3_url: str
) -> None:
    url = s3_url + "/c"
    ckptproto.save({"w": np.ones(10)}, url)
    old = storage.open(_loc(url))
    (old_name,) = json.loads(old.read_manifest())["files"]
    opened = old.open_file(old_name)
    ckptproto.save({"w": np.zeros(10)}, url, overwrite=True)
    # The old generation's objects are gone, never replaced by the new one's bytes ...
    with pytest.raises(CheckpointCorruptError, match="missing"):
        old.open_file(old_name)
    with pytest.raises(CheckpointError, match="replaced by another save while being read") as caught:
        opened.read_into(0, [memoryview(bytearray(8))])
    assert not isinstance(caught.value, CheckpointCorruptError)  # F-38: not reported as damage
    # ... and the generation knows it was replaced: the reader starts again on the new one.
    assert old.replaced()
    assert np.array_equal(_read_tensor(storage, url, "w"), np.zeros(10))
    fresh = storage.open(_loc(url))
    assert not fresh.replaced()
    (fresh_name,) = json.loads(fresh.read_manifest())["files"]
    fresh_file = fresh.open_file(fresh_name)
    storage.remove(_loc(url))
    with pytest.raises(CheckpointNotFoundError, match="deleted"):
        fresh.replaced()
    with pytest.raises(CheckpointNotFoundError, match="deleted"):
        fresh_file.read_into(0, [memoryview(bytearray(8))])


def test_load_racing_an_overwrite_reads_one_generation_F38(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptproto.io import reader, readplan

    url = s3_url + "/c"
    ckptproto.save({"v": np.zeros(64), "step": 0}, url)
    real = reader.read_manifest
    act = [lambda: ckptproto.save({"v": np.ones(64), "step": 1}, url, overwrite=True)]

    def then_overwrite(*args: Any, **kwargs: Any) -> Any:
        manifest = real(*args, **kwargs)
        if act:
            act.pop()()  # between the manifest and the data objects: the old ones go
        return manifest

    monkeypatch.setattr(reader, "read_manifest", then_overwrite)
    state = ckptproto.load(url)  # opened again on the new generation, whole
    assert state["step"] == 1 and np.array_equal(state["v"], np.ones(64))
    monkeypatch.setattr(reader, "read_manifest", real)
    # Replaced after every object was opened, while tensors are read: the old generation's
    # objects are gone; load drops what it read and reads the new generation whole.
    materialize = readplan.materialize
    act.append(lambda: ckptproto.save({"v": np.full(64, 2.0), "step": 2}, url, overwrite=True))

    def overwrite_then_read(*args: Any, **kwargs: Any) -> Any:
        if act:
            act.pop()()
        return materialize(*args, **kwargs)

    monkeypatch.setattr(readplan, "materialize", overwrite_then_read)
    state = ckptproto.load(url)
    assert state["step"] == 2 and np.array_equal(state["v"], np.full(64, 2.0))
    # Replaced before every read, again and again: after a few whole re-reads, an error that
    # says so (never "corrupt", never a mix of generations).
    steps = iter(range(3, 100))

    def always_overwrite(*args: Any, **kwargs: Any) -> Any:
        step = next(steps)
        ckptproto.save({"v": np.full(64, float(step)), "step": step}, url, overwrite=True)
        return materialize(*args, **kwargs)

    monkeypatch.setattr(readplan, "materialize", always_overwrite)
    with pytest.raises(CheckpointReplacedError, match="read it again") as caught:
        ckptproto.load(url)
    assert not isinstance(caught.value, CheckpointCorruptError)
    monkeypatch.setattr(readplan, "materialize", materialize)
    assert ckptproto.load(url)["step"] == next(steps) - 1


def test_load_into_replaced_mid_read_says_so_never_corrupt_F41(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # load_into has written into the caller's tensors before it meets the missing object, so
    # it cannot start again: F-41 asks for CheckpointReplacedError, never CheckpointCorruptError.
    from ckptproto.io import readplan

    url = s3_url + "/c"
    ckptproto.save({"v": np.zeros(64), "step": 0}, url)
    execute = readplan.execute
    act = [lambda: ckptproto.save({"v": np.ones(64), "step": 1}, url, overwrite=True)]

    def overwrite_then_read(*args: Any, **kwargs: Any) -> Any:
        if act:
            act.pop()()
        return execute(*args, **kwargs)

    monkeypatch.setattr(readplan, "execute", overwrite_then_read)
    target = {"v": np.full(64, 7.0), "step": -1}
    with pytest.raises(CheckpointReplacedError, match="read it again") as caught:
        ckptproto.load_into(url, target)
    assert not isinstance(caught.value, CheckpointCorruptError)
    monkeypatch.setattr(readplan, "execute", execute)
    ckptproto.load_into(url, target)  # read again: the new generation, whole
    assert np.array_equal(target["v"], np.ones(64))


def test_namespace_entries_exists_read_head_and_remove(storage: s3_storage.S3Storage, s3_url: str) -> None:
    root = _loc(s3_url)
    assert storage.entries(root) == [] and not storage.exists(root)
    ckptproto.save({"w": np.ones(3)}, s3_url + "/step_1")
    ckptproto.save({"w": np.ones(3)}, s3_url + "/step_2")
    _put(root, "notes.txt", b"hello world")
    assert storage.entries(root) == [
        Listed("notes.txt", False),
        Listed("step_1", True),
        Listed("step_2", True),
    ]
    assert storage.exists(root) and storage.exists(root / "step_1") and storage.exists(root / "notes.txt")
    assert not storage.exists(root / "step_3")
    assert storage.is_committed(root / "step_1") and not storage.is_committed(root / "notes.txt")
    assert storage.read_head(root / "notes.txt", 5) == b"hello"
    assert storage.read_head(root / "notes.txt", 100) == b"hello world"
    with pytest.raises(CheckpointNotFoundError):
        storage.read_head(root / "nothing", 5)
    storage.remove(root / "step_1")
    assert not storage.is_committed(root / "step_1") and not storage.exists(root / "step_1")
    assert [e.name for e in storage.entries(root)] == ["notes.txt", "step_2"]
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        storage.remove(root / "step_1")
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint"):
        storage.open(root / "step_1")


def _put(location: ObjectLocation, name: str, data: bytes) -> None:
    import obstore

    from ckptproto.io import s3_client

    obstore.put(s3_client.store(location.bucket), location.object_key(name), data)


def test_hidden_and_empty_names_are_never_checkpoints(storage: s3_storage.S3Storage, s3_url: str) -> None:
    root = _loc(s3_url)
    with pytest.raises(CheckpointWriteError, match=re.escape("start with '.'")):
        ckptproto.save({"w": np.ones(1)}, s3_url + "/.hidden")
    with pytest.raises(CheckpointWriteError, match="empty"):
        storage.begin(_loc("s3://ckptproto-test"), overwrite=False)
    assert storage.entries(root) == []
    ckptproto.save({"w": np.ones(1)}, s3_url + "/shown")
    # A hidden prefix that holds a manifest is still not a checkpoint (F-2).
    with storage.open(root / "shown") as generation:
        _put(root / ".hidden", "manifest.json", generation.read_manifest())
    assert not storage.is_committed(root / ".hidden")
    with pytest.raises(CheckpointNotFoundError):
        storage.open(root / ".hidden")
    with storage.open(root / "shown") as generation, pytest.raises(CheckpointFormatError, match="F-3"):
        generation.open_file("../escape.safetensors")


def test_a_failed_save_leaves_nothing(storage: s3_storage.S3Storage, s3_url: str) -> None:
    url = s3_url + "/c"
    prepared = prepare({"w": np.arange(3.0)}, None, Solo())
    with pytest.raises(CheckpointWriteError, match="planned"):
        pipeline.run(
            _loc(url), prepared.share, prepared.metadata_tree, [memoryview(b"short")], Solo(),
            overwrite=False, storage=storage,
        )  # fmt: skip
    assert storage.entries(_loc(url)) == []
    staging = storage.begin(_loc(url), overwrite=False)
    assert next(e.name for e in storage.entries(_loc(url))).startswith(".ckptproto-writing.")
    with pytest.raises(CheckpointWriteError, match="before the manifest"):
        storage.commit(staging, _loc(url), overwrite=False)
    storage.abort(staging)
    assert storage.entries(_loc(url)) == []


def test_remove_leftovers_removes_dead_saves_only(storage: s3_storage.S3Storage, s3_url: str) -> None:
    root = _loc(s3_url)
    ckptproto.save({"w": np.ones(3)}, s3_url + "/step_1")
    committed = _names(storage, root / "step_1")
    # A save that died after uploading (never committed, marker left) beside the checkpoint,
    # and one in a prefix of its own.
    dead = []
    for name in ("step_1", "step_2"):
        staging = storage.begin(root / name, overwrite=True)
        prepared = prepare({"w": np.zeros(3)}, None, Solo())
        from ckptproto.io.plan import plan_file

        plan = plan_file(storage.data_file_name(staging, 0), 0, list(prepared.share.pieces))
        storage.write_file(staging, plan, [memoryview(np.zeros(3)).cast("B")])
        dead.append((name, plan.name))
    _put(root / "step_2", "README", b"not ours")  # not named by ckptproto: never deleted
    # Young markers: presumed alive, nothing is removed.
    assert storage.remove_leftovers(root) == []
    removed = s3_storage.S3Storage(sweep_grace_s=0).remove_leftovers(root)
    assert {(loc.parent.name, loc.name) for loc in removed if not loc.name.startswith(".")} == set(dead)
    assert _names(storage, root / "step_1") == committed
    assert _names(storage, root / "step_2") == ["README"]
    assert np.array_equal(_read_tensor(storage, s3_url + "/step_1", "w"), np.ones(3))


def test_a_missing_bucket_is_a_clear_error(s3_url: str) -> None:
    with pytest.raises(CheckpointNotFoundError, match="bucket 'no-such-bucket-x' does not exist"):
        ckptproto.save({"w": np.ones(1)}, "s3://no-such-bucket-x/ckpt")
    with pytest.raises(CheckpointNotFoundError, match="does not exist"):
        s3_storage.S3.open(_loc("s3://no-such-bucket-x/ckpt"))


def test_bad_credentials_name_the_variables_read(s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from _s3_server import create_bucket, start_server

    # A second server that checks credentials (moto's IAM enforcement after 1 free request,
    # which creates the bucket).
    process, endpoint = start_server({"INITIAL_NO_AUTH_ACTION_COUNT": "1"})
    try:
        create_bucket(endpoint, "locked")
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAREALKEY00000")
        with pytest.raises(CheckpointError, match=r"access denied.*AWS_ACCESS_KEY_ID"):
            ckptproto.save({"w": np.ones(1)}, "s3://locked/ckpt")
    finally:
        process.kill()
        process.wait()


def test_without_the_client_library_the_error_says_what_to_install(
    s3_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "obstore", None)
    with pytest.raises(CheckpointError, match=re.escape("pip install 'ckptproto[s3]'")):
        ckptproto.save({"w": np.ones(1)}, s3_url + "/c")
