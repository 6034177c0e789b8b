"""The staging pool: slabs reused across saves, exact bytes for every kind of tensor, and the
CUDA path (pinned slabs, side stream, events) where a GPU is present."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from ckptproto import arrays
from ckptproto.errors import CheckpointError
from ckptproto.io import staging, staging_pool
from ckptproto.io.staging import StagingPool, slab_capacity, stage_state
from ckptproto.tree import encode_state

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def expected_bytes(value: object) -> bytes:
    view, _owner = arrays.host_bytes(value)
    return bytes(view)


def stage(
    pool: StagingPool, state: dict[str, object], recheck: bool = True
) -> tuple[list[object], staging.Staged]:
    encoded = encode_state(state)
    staged = stage_state(pool, encoded.tensors, staging.capture_ready(encoded.tensors), recheck=recheck)
    staged.synchronize()
    return [leaf.value for leaf in encoded.tensors], staged


def test_slab_capacity_rounds_up_by_at_most_a_sixteenth() -> None:
    for n in [0, 1, 63, 64, 65, 4095, 1 << 16, (1 << 16) + 1, 10**6, 123456789, 1 << 30]:
        cap = slab_capacity(n)
        assert cap >= max(n, 1)
        assert cap % staging.ALIGN == 0
        if n > 1 << 16:
            assert cap - n <= n // 8  # (1/16 of the next power of two) <= n/8


def test_acquire_reuses_free_slabs_and_drops_ones_too_small() -> None:
    pool = StagingPool()
    a = pool.acquire(1000, pinned=False)
    pool.release(a)
    b = pool.acquire(900, pinned=False)
    assert b is a and pool.stats.allocated == 1
    c = pool.acquire(900, pinned=False)  # a is in use: a second slab
    assert c is not a and pool.stats.allocated == 2
    pool.release(b)
    pool.release(c)
    big = pool.acquire(10**6, pinned=False)  # neither fits: both dropped, one new slab
    assert pool.stats.freed == 2 and pool.stats.held_bytes == big.capacity
    pool.release(big)
    pool.clear()
    assert pool.stats.held_bytes == 0 and pool.stats.in_use == 0


@pytest.mark.parametrize("recheck", [True, False])
def test_every_kind_of_tensor_is_staged_byte_exact(recheck: bool) -> None:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=g)
    complex_t = torch.randn(5, 3, dtype=torch.complex64, generator=g)
    state: dict[str, object] = {
        "f32": base,
        "transposed": base.t(),
        "strided": base[::2, 1::3],
        "bf16": base.to(torch.bfloat16),
        "f16": base.half(),
        "f64": base.double(),
        "bool": base > 0,
        "i8": torch.randint(-100, 100, (7,), dtype=torch.int8, generator=g),
        "i64": torch.randint(-(2**40), 2**40, (3, 3), generator=g),
        "conj": complex_t.conj(),
        "neg": torch.randn(4, generator=g)._neg_view(),
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 4),
        "param": torch.nn.Parameter(torch.randn(3, 2, generator=g)),
        "np": np.arange(12, dtype=np.float32).reshape(3, 4),
        "np_big_endian": np.arange(6, dtype=">i4"),
        "np_strided": np.arange(40, dtype=np.int16).reshape(5, 8)[:, ::3],
        "np_bool": np.array([True, False, True]),
        "np_scalar": np.array(7, dtype=np.uint64),
    }
    pool = StagingPool()
    values, staged = stage(pool, state, recheck)
    assert len(staged.views) == len(values)
    for value, view in zip(values, staged.views, strict=True):
        assert bytes(view) == expected_bytes(value)
    staged.release()
    assert pool.stats.in_use == 0


@pytest.mark.parametrize("recheck", [True, False])
def test_a_state_of_plain_tensors_only_is_staged_byte_exact(
    recheck: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tensors the encoder gave an address to (plain CPU torch tensors) and nothing else, just
    described (no ``recheck``): staged without a test per tensor, every byte the same."""
    g = torch.Generator().manual_seed(2)
    big = torch.randn(400, 400, generator=g)
    state: dict[str, object] = {
        "model": {
            f"w{i}": torch.randn(5, generator=g).to(dtype)
            for i, dtype in enumerate([torch.float32] * 9 + [torch.bfloat16, torch.int64, torch.bool])
        },
        "big": big,
        "big_view": big[50:300],  # contiguous, at an offset in its storage
        "tied": big,
        "param": torch.nn.Parameter(torch.randn(3, 2, generator=g)),
        "complex": torch.randn(4, dtype=torch.complex64, generator=g),
    }
    seen: list[bool] = []
    real = staging._copy_host
    monkeypatch.setattr(
        staging,
        "_copy_host",
        lambda leaves, slab, plain=False: (seen.append(plain), real(leaves, slab, plain))[1],
    )
    ranges: list[int] = []
    real_ranges = staging._copy_ranges
    monkeypatch.setattr(
        staging, "_copy_ranges", lambda *args: (ranges.append(len(args[2])), real_ranges(*args))[1]
    )
    values, staged = stage(StagingPool(), state, recheck)
    assert seen == [not recheck]
    # Just described: the small ones copied as address ranges (the large by memcpy each)
    assert sum(ranges) == (0 if recheck else len(values) - 2)
    for value, view in zip(values, staged.views, strict=True):
        assert bytes(view) == expected_bytes(value)
    staged.release()


@pytest.mark.parametrize("small", [False, True])
def test_large_tensors_copied_as_bytes_are_staged_byte_exact(
    small: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large plain tensors take np.copyto of their bytes (MEMCPY_MIN_BYTES); large tensors that
    are not plain (strided, conj, neg), small ones and arrays beside them keep torch's copy."""
    if small:  # the same state through the byte copy for every plain tensor, however small
        monkeypatch.setattr(staging, "MEMCPY_MIN_BYTES", 1)
    g = torch.Generator().manual_seed(1)
    big = torch.randn(512, 257, generator=g)  # 526,336 bytes
    state: dict[str, object] = {
        "big": big,
        "big_param": torch.nn.Parameter(torch.randn(300, 300, generator=g)),
        "big_bf16": torch.randn(700, 300, generator=g).to(torch.bfloat16),
        "big_transposed": big.t(),
        "big_conj": torch.randn(200, 200, dtype=torch.complex64, generator=g).conj(),
        "big_neg": torch.randn(70000, generator=g)._neg_view(),
        "big_view": big[100:400],  # contiguous, at an offset in its storage
        "small": torch.randn(3, generator=g),
        "np": np.arange(100_000, dtype=">f4"),
    }
    values, staged = stage(StagingPool(), state)
    for value, view in zip(values, staged.views, strict=True):
        assert bytes(view) == expected_bytes(value)
    staged.release()


def test_layout_cache_is_reused_and_rebuilt_when_the_state_changes() -> None:
    pool = StagingPool()
    a = torch.zeros(100)
    b = np.zeros(10, dtype=np.float64)
    for step in range(3):
        a.fill_(step)
        b[:] = step
        _values, staged = stage(pool, {"a": a, "b": b})
        assert bytes(staged.views[0]) == a.numpy().tobytes()
        assert bytes(staged.views[1]) == b.tobytes()
        staged.release()
    # Same byte size, different dtypes and shapes: the cached views must not be reused.
    c = torch.arange(50, dtype=torch.int64)
    _values, staged = stage(pool, {"a": c, "b": np.ones(20, dtype=np.float32)})
    assert bytes(staged.views[0]) == c.numpy().tobytes()
    assert bytes(staged.views[1]) == np.ones(20, dtype=np.float32).tobytes()
    staged.release()
    assert pool.stats.allocated == 1


def test_a_tensor_changed_after_encoding_fails_with_its_path_and_releases_the_slab() -> None:
    pool = StagingPool()
    t = torch.zeros(4, 4)
    encoded = encode_state({"model": {"w": t, "ok": torch.ones(3)}})
    t.resize_(3)  # what a caller mutating before wait_staged() can do
    with pytest.raises(CheckpointError, match=r"model\.w: the tensor changed"):
        stage_state(pool, encoded.tensors, staging.Ready())
    assert pool.stats.in_use == 0
    t2 = torch.zeros(4, 4)
    encoded = encode_state({"w": t2})
    t2.data = torch.zeros(4, 4, dtype=torch.float64)
    with pytest.raises(CheckpointError, match=r"w: the tensor changed from float32\[4, 4\] to float64"):
        stage_state(pool, encoded.tensors, staging.Ready())
    assert pool.stats.in_use == 0


def test_staged_bytes_do_not_follow_later_mutation() -> None:
    pool = StagingPool()
    t = torch.arange(1000, dtype=torch.float32)
    arr = np.arange(1000, dtype=np.int32)
    _values, staged = stage(pool, {"t": t, "a": arr})
    before = [bytes(v) for v in staged.views]
    t.mul_(-1)
    arr *= -1
    assert [bytes(v) for v in staged.views] == before
    staged.release()


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("capacity", [64, 4096 * 3 + 64, 1 << 20, (1 << 22) + 4096])
def test_every_slab_starts_on_a_page(capacity: int, shared: bool) -> None:
    """A tensor staged at the offset in a page its data file gives it is written from the slab
    past the page cache (io/direct.py): that needs the slab itself to start on a page."""
    if shared and not staging_pool.shared_memory_available():
        pytest.skip("no memfd here")
    slab = staging_pool.Slab(capacity, pinned=False, shared=shared)
    assert slab.array.ctypes.data % 4096 == 0 and slab.array.size == capacity
    if not shared:
        assert slab.tensor.data_ptr() == slab.array.ctypes.data and slab.tensor.numel() == capacity


# -- CUDA (run where a GPU is lent) -------------------------------------------------------------


@cuda
def test_pinned_slabs_start_on_a_page_and_take_no_more_than_asked() -> None:
    """cudaHostAlloc's pages are kept as they are: asking a page more would take the next
    power of two from torch's pinned allocator (a 1 GiB slab would hold 2 GiB)."""
    slab = staging_pool.Slab(1 << 26, pinned=True)
    assert slab.tensor.is_pinned() and slab.tensor.data_ptr() % 4096 == 0
    assert slab.tensor.untyped_storage().nbytes() == 1 << 26


@cuda
def test_cuda_tensors_go_through_a_reused_pinned_slab() -> None:
    pool = StagingPool()
    t = torch.randn(1 << 16, device="cuda")
    slabs = set()
    for i in range(3):
        t.add_(i)
        expected = t.cpu().numpy().tobytes()
        _values, staged = stage(pool, {"t": t, "cpu": torch.ones(10)})
        assert bytes(staged.views[0]) == expected
        slabs.update(id(s) for s in staged._slabs)
        assert any(s.pinned and s.tensor.is_pinned() for s in staged._slabs)
        staged.release()
    assert len(slabs) == 2 and pool.stats.allocated == 2


@cuda
def test_side_stream_waits_for_work_queued_before_the_save() -> None:
    pool = StagingPool()
    t = torch.zeros(1 << 22, device="cuda")
    x = torch.randn(2048, 2048, device="cuda")
    for _ in range(20):  # keep the current stream busy so an unordered copy would see zeros
        x = x @ x
        x = x / x.norm()
    t.fill_(7.0)  # queued behind the matmuls on the current stream
    _values, staged = stage(pool, {"t": t})
    assert np.all(np.frombuffer(staged.views[0], dtype=np.float32) == 7.0)
    staged.release()


@cuda
def test_source_memory_is_not_reused_while_the_copy_is_in_flight() -> None:
    pool = StagingPool()
    n = 1 << 24
    t = torch.full((n,), 3.0, device="cuda")
    encoded = encode_state({"t": t})
    ready = staging.capture_ready(encoded.tensors)
    staged = stage_state(pool, encoded.tensors, ready)
    del t, encoded  # the caller drops its last references while the copy may still run
    junk = [torch.full((n,), -1.0, device="cuda") for _ in range(4)]  # may reuse freed blocks
    staged.synchronize()
    assert np.all(np.frombuffer(staged.views[0], dtype=np.float32) == 3.0)
    staged.release()
    del junk


def test_slabs_and_every_staged_tensor_are_aligned() -> None:
    pool = StagingPool()
    _values, staged = stage(pool, {"a": torch.ones(3, dtype=torch.int8), "b": torch.ones(5), "c": np.ones(7)})
    assert staged._slabs[0].array.ctypes.data % staging.ALIGN == 0
    for view in staged.views:
        assert np.frombuffer(view, dtype=np.uint8).ctypes.data % staging.ALIGN == 0
    staged.release()


def test_a_copy_run_apart_lands_before_synchronize_returns(monkeypatch: pytest.MonkeyPatch) -> None:
    """``copy_apart``: the host copy runs on its own thread while the caller goes on; the
    bytes are all there once ``synchronize`` returns, and a failed copy raises from it."""
    g = torch.Generator().manual_seed(3)
    state: dict[str, object] = {f"t{i}": torch.randn(64, generator=g) for i in range(50)}
    state["np"] = np.arange(10, dtype=np.int32)
    state["big"] = torch.randn(600, 300, generator=g)
    encoded = encode_state(state)
    pool = StagingPool()
    staged = stage_state(pool, encoded.tensors, staging.Ready(), recheck=False, copy_apart=True)
    staged.synchronize()
    for leaf, view in zip(encoded.tensors, staged.views, strict=True):
        assert bytes(view) == expected_bytes(leaf.value)
    staged.release()

    def broken(*args: object) -> None:
        raise CheckpointError("t3: copying the tensor for the checkpoint failed: boom")

    monkeypatch.setattr(staging, "_copy_host", broken)
    staged = stage_state(pool, encoded.tensors, staging.Ready(), recheck=False, copy_apart=True)
    with pytest.raises(CheckpointError, match="boom"):
        staged.synchronize()
    staged.release()  # after the error was raised: gives the slab back, raises nothing
    assert pool.stats.in_use == 0
    staged = stage_state(pool, encoded.tensors, staging.Ready(), recheck=False, copy_apart=True)
    staged.release()  # a failed copy whose error nobody asked for: the slab comes back too
    assert pool.stats.in_use == 0


@pytest.mark.parametrize("plain", [False, True])
def test_the_thread_that_waits_takes_the_copies_left(monkeypatch: pytest.MonkeyPatch, plain: bool) -> None:
    """The copies of a copy run apart are chunks any thread may take: the thread in
    ``synchronize`` takes those the copier has not, every byte lands once, and a chunk that
    fails on either thread is raised from ``synchronize`` with its tensor's path. ``plain``:
    every value a plain CPU tensor, the small ones copied as address ranges (_copy_ranges);
    else (an array among them) by torch (_copy_small)."""
    import threading
    import time

    monkeypatch.setattr(staging, "COPY_CHUNK", 4)
    monkeypatch.setattr(staging, "RANGES_CHUNK", 4)
    g = torch.Generator().manual_seed(5)
    state: dict[str, object] = {f"t{i}": torch.randn(16, generator=g) for i in range(40)}
    if not plain:
        state["np"] = np.arange(10, dtype=np.int32)
    state["big"] = torch.randn(600, 300, generator=g)  # over MEMCPY_MIN_BYTES: one memcpy
    encoded = encode_state(state)
    takers: list[str] = []
    copier = "_copy_ranges" if plain else "_copy_small"
    real = getattr(staging, copier)

    def slow_on_the_copier(*args: object) -> None:
        takers.append(threading.current_thread().name)
        if threading.current_thread().name == "ckptproto-stage-copy":
            time.sleep(0.01)  # the copier lags: the waiting thread must take chunks
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(staging, copier, slow_on_the_copier)
    pool = StagingPool()
    staged = stage_state(pool, encoded.tensors, staging.Ready(), recheck=False, copy_apart=True)
    staged.synchronize()
    assert len(takers) == 10 and "ckptproto-stage-copy" in takers
    assert threading.current_thread().name in takers
    for leaf, view in zip(encoded.tensors, staged.views, strict=True):
        assert bytes(view) == expected_bytes(leaf.value)
    staged.release()

    def fail_on_t9(*args: Any) -> None:
        taken = range(args[1], args[1] + len(args[2])) if plain else args[2]  # (first, ranges) or indices
        if 9 in taken:  # whichever thread takes it
            time.sleep(0.01)
            raise CheckpointError("t9: copying the tensor for the checkpoint failed: boom")
        real(*args)

    monkeypatch.setattr(staging, copier, fail_on_t9)
    staged = stage_state(pool, encoded.tensors, staging.Ready(), recheck=False, copy_apart=True)
    with pytest.raises(CheckpointError, match=r"t9: .*boom"):
        staged.synchronize()
    staged.release()
    assert pool.stats.in_use == 0
