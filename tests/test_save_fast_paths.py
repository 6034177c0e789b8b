"""The save side's per-tensor fast paths (benchmarks/bench_many_tensors.py) give exactly what
the general paths they stand in for give, on a varied state: ties found by address first vs
every tensor's full identity, views sliced from one address range vs one view per tensor,
a world of one's share by columns vs the general per-rank split, small pieces joined vs
written one by one, the tensor table checked and written by runs vs entry by entry."""

from __future__ import annotations

import json
import operator
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import ckptproto
from ckptproto import arrays, dtypes
from ckptproto.errors import CheckpointFormatError
from ckptproto.format import manifest as manifest_module
from ckptproto.format.manifest import Chunk, FileEntry, Manifest, TensorEntry, check_tensor_table
from ckptproto.io import share, threads, writer
from ckptproto.io.plan import WholePieces, plan_file
from ckptproto.tree import EncodedState, TensorLeaf, encode_state, iter_tensor_refs, join_path


def _varied_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, generator=g)
    c = torch.randn(3, dtype=torch.complex64, generator=g)
    return {
        "w": base,
        "tied": base,  # the same object
        "same_view": base.view(6, 4),  # another view object of the same bytes: tied
        "row0": base[0],  # same address as base, another shape: not tied
        "t": base.t(),  # same address, other strides: not tied
        "col": base[:, 1],  # not contiguous
        "as_int": base.view(torch.int32),  # same bytes as another dtype: not tied
        "neg": torch._neg_view(base[1]),  # same values in memory, read negated
        "c": c,
        "conj": c.conj(),  # same address as c, lazy conjugate bit
        "scalar": torch.tensor(3.5),
        "empty": torch.empty(0, 3),
        "empty_view": base[2:2],  # an empty view at base's third row: its own tensor
        "bool": torch.tensor([True, False, True]),
        "bf16": torch.randn(5, generator=g).to(torch.bfloat16),
        "u8": torch.arange(7, dtype=torch.uint8),
        "f64": torch.randn(3, 2, dtype=torch.float64, generator=g),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
        "np": np.arange(6, dtype=np.int16).reshape(2, 3),
        "np_t": np.arange(6, dtype=np.float32).reshape(2, 3).T,
        "int_keys": {1: torch.ones(1), 2: [torch.zeros(2), (base[3],)]},
        "nested": [[base[0], {"x": base, "y": torch.full((2,), 7)}]],
        "odict": OrderedDict(a=torch.ones(3)),
        "step": 3,
        "name": "run",
    }


def _leaves(value: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """(state path, tensor or array) in the encoder's order."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaves(v, join_path(path, k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, join_path(path, i))
    elif isinstance(value, (np.ndarray, torch.Tensor)):
        yield path, value


def test_ties_found_by_address_are_those_of_the_full_identity() -> None:
    state = _varied_state()
    encoded = encode_state(state)
    expected: dict[str, int] = {}
    firsts: dict[tuple[Any, ...], int] = {}
    for path, value in _leaves(state):
        expected[path] = firsts.setdefault(arrays.identity(value), len(firsts))
    assert {path: index for path, _kind, index in iter_tensor_refs(encoded.tree)} == expected
    assert len(encoded.tensors) == len(firsts)
    for index, leaf in enumerate(encoded.tensors):
        assert leaf.spec == arrays.describe(leaf.value)
        assert expected[leaf.path] == index  # the first path it was seen at


def test_host_views_hold_the_bytes_to_host_bytes_gives() -> None:
    state = _varied_state()
    encoded = encode_state(state)
    leaves = encoded.tensors
    assert any(leaf.host_address for leaf in leaves) and not all(leaf.host_address for leaf in leaves)
    swapped = next(leaf for leaf in leaves if leaf.path == "bool")
    swapped.value.set_(torch.tensor([False, True, False]))  # another storage since encoding
    views, owners = arrays.host_views(
        [leaf.value for leaf in leaves],
        [leaf.host_address for leaf in leaves],
        [leaf.spec.nbytes for leaf in leaves],
    )
    assert len(owners) == len(leaves)
    for leaf, view in zip(leaves, views, strict=True):
        reference, _owner = arrays.to_host_bytes(leaf.value)
        assert bytes(view) == bytes(reference), leaf.path


@pytest.mark.parametrize("swap", [False, True])
def test_host_views_of_plain_tensors_only(swap: bool) -> None:
    """Every value a plain tensor (the usual state: views made in C-level passes), and the
    same with one storage swapped since encoding (found, and viewed where it now is)."""
    g = torch.Generator().manual_seed(0)
    state = {
        f"t{i}": torch.randn(i % 5 + 1, generator=g).to((torch.float32, torch.int8, torch.float64)[i % 3])
        for i in range(40)
    }
    leaves = encode_state(state).tensors
    assert all(leaf.host_address for leaf in leaves)
    if swap:
        leaves[7].value.set_(torch.arange(leaves[7].value.numel(), dtype=leaves[7].value.dtype))
    views, owners = arrays.host_views(
        [leaf.value for leaf in leaves],
        [leaf.host_address for leaf in leaves],
        [leaf.spec.nbytes for leaf in leaves],
    )
    if not swap:  # nothing copied: each owner is the tensor itself
        assert all(owner is leaf.value for owner, leaf in zip(owners, leaves, strict=True))
    for leaf, view in zip(leaves, views, strict=True):
        assert bytes(view) == leaf.value.numpy().tobytes(), leaf.path


@pytest.mark.parametrize("odd", ["none", "transposed", "negative", "conjugate", "conjugate_only_complex"])
def test_a_dict_of_tensors_encoded_at_once_views_in_place_only_what_it_may(odd: str) -> None:
    """_Encoder._tensor_dict (a dict of many plain tensors, by columns) marks a tensor to be
    viewed where it lies (host_address) exactly when it is contiguous without a lazy negative
    or conjugate bit, as the tensor-by-tensor path does; the bytes saved are the values."""
    g = torch.Generator().manual_seed(1)
    state: dict[str, Any] = {f"t{i}": torch.randn(2, 3, generator=g) for i in range(20)}
    base = torch.randn(3, 2, generator=g)
    c = torch.randn(2, 3, dtype=torch.complex64, generator=g)
    if odd == "transposed":
        state["t5"] = base.t()
    elif odd == "negative":
        state["t5"] = torch._neg_view(state["t5"].clone())
    elif odd == "conjugate":
        state["t5"] = c.conj()
    elif odd == "conjugate_only_complex":  # a complex dtype present, no conjugate bit
        state["t5"] = c
    leaves = encode_state(state).tensors
    assert [leaf.path for leaf in leaves] == list(state)  # encoded as one column, in order
    for leaf in leaves:
        value = leaf.value
        in_place = value.is_contiguous() and not value.is_neg() and not value.is_conj()
        assert bool(leaf.host_address) == in_place, leaf.path
        assert leaf.host_address in (0, value.data_ptr())
    views, _owners = arrays.host_views(
        [leaf.value for leaf in leaves],
        [leaf.host_address for leaf in leaves],
        [leaf.spec.nbytes for leaf in leaves],
    )
    for leaf, view in zip(leaves, views, strict=True):
        expected = leaf.value.resolve_conj().resolve_neg().contiguous()
        assert bytes(view) == expected.view(torch.uint8).numpy().tobytes(), leaf.path


def test_share_of_a_world_of_one_is_the_general_split_of_every_rank() -> None:
    encoded = encode_state(_varied_state())
    fast = share.plan_share(encoded, 0, 1)
    by_tensor: dict[int, tuple[Any, ...]] = {}
    for rank in range(3):  # the general path: the tensors spread over three ranks
        job = share.plan_share(encoded, rank, 3)
        for piece, index in zip(job.pieces, job.tensor_index, strict=True):
            by_tensor[index] = (piece.key, piece.spec, piece.offsets, job.leaves[piece.source].value)
    assert fast.tensor_index == list(range(len(encoded.tensors)))
    for piece, index in zip(fast.pieces, fast.tensor_index, strict=True):
        key, spec, offsets, value = by_tensor[index]
        assert (piece.key, piece.spec, piece.offsets) == (key, spec, offsets)
        assert fast.leaves[piece.source].value is value
    assert [(t.value, t.spec, t.path, t.shard) for t in fast.encoded.tensors] == [
        (None, t.spec, t.path, None) for t in encoded.tensors
    ]
    # A layout without values (what the writer process plans from) is used as it is.
    valueless = EncodedState(encoded.tree, [TensorLeaf(None, t.spec, t.path) for t in encoded.tensors])
    again = share.plan_share(valueless, 0, 1)
    assert again.encoded is valueless and again.pieces == fast.pieces
    # A synchronous save's job (keep_values): the layout is the encoded state itself, the
    # same pieces and leaves; an async save's (the default) never holds a value.
    kept = share.plan_share(encoded, 0, 1, keep_values=True)
    assert kept.encoded is encoded and kept.pieces == fast.pieces and kept.leaves == fast.leaves
    assert all(t.value is None for t in fast.encoded.tensors)


@pytest.mark.parametrize("batch", [threads.BATCH_BYTES, 40, 1])
def test_joined_small_pieces_write_the_bytes_of_pieces_written_one_by_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, batch: int
) -> None:
    """Also with tiny batches (many cuts of the runs, pieces split across batches) and a large
    piece between runs of small ones."""
    state = _varied_state()
    state["large"] = torch.arange(writer.JOIN_BYTES // 4 + 3, dtype=torch.float32)
    state["after"] = torch.ones(3)
    monkeypatch.setattr(threads, "BATCH_BYTES", batch)
    ckptproto.save(state, tmp_path / "joined")
    monkeypatch.setattr(writer, "JOIN_BYTES", 0)  # every piece "large": nothing joined
    ckptproto.save(state, tmp_path / "one_by_one")
    name = "data-00000-000.safetensors"
    assert (tmp_path / "joined" / name).read_bytes() == (tmp_path / "one_by_one" / name).read_bytes()
    manifests = [
        Manifest.parse((tmp_path / d / "manifest.json").read_bytes(), d) for d in ("joined", "one_by_one")
    ]
    assert manifests[0].files == manifests[1].files and manifests[0].tensors == manifests[1].tensors
    stored = load_file(str(tmp_path / "joined" / name))  # the safetensors package reads it
    assert torch.equal(stored["bf16"], state["bf16"]) and torch.equal(stored["large"], state["large"])
    loaded = ckptproto.load(tmp_path / "joined")
    assert torch.equal(loaded["col"], state["col"]) and torch.equal(loaded["conj"], state["conj"])


def _table(shared: bool) -> tuple[list[TensorEntry], dict[str, FileEntry]]:
    """Runs of one-chunk entries (sharing their dtype, shape, file and offsets objects when
    ``shared``; equal but distinct objects otherwise, so no two entries form a run), with a
    chunked entry between them."""
    f32, bf16 = dtypes.by_name("float32"), dtypes.by_name("bfloat16")
    files = {
        "a.safetensors": FileEntry(64, "crc32:0000abcd"),
        "b.safetensors": FileEntry(8, "crc32:00000001", 1),
    }

    zero_offsets: dict[int, tuple[int, ...]] = {}

    def whole(dtype: Any, shape: tuple[int, ...], file: str, key: str) -> TensorEntry:
        if not shared:
            shape, file = tuple(list(shape)), "".join(file)
        zeros = zero_offsets.setdefault(len(shape), (0,) * len(shape)) if shared else tuple([0] * len(shape))
        return TensorEntry(dtype, shape, (Chunk(file, key, zeros, shape),))

    s4, s22 = (4,), (2, 2)
    tensors = [whole(f32, s4, "a.safetensors", f"k{i}") for i in range(4)]
    tensors.append(
        TensorEntry(
            bf16,
            (4, 2),
            (Chunk("b.safetensors", "c0", (0, 0), (2, 2)), Chunk("b.safetensors", "c1", (2, 0), (2, 2))),
        )
    )
    tensors += [whole(bf16, s22, "b.safetensors", f"m{i}") for i in range(3)]
    tensors += [whole(f32, s4, "a.safetensors", f"n{i}") for i in range(2)]
    return tensors, files


def _broken(tensors: list[TensorEntry], how: str) -> list[TensorEntry]:
    """The table with one entry inside a run changed as ``how`` says."""
    out = list(tensors)
    t = out[2]
    c = t.chunks[0]
    if how == "repeated key":
        out[2] = TensorEntry(t.dtype, t.shape, (c._replace(key="k0"),))
    elif how == "repeated key across runs":
        out[8] = TensorEntry(out[8].dtype, out[8].shape, (out[8].chunks[0]._replace(key="k3"),))
    elif how == "offsets":
        out[2] = TensorEntry(t.dtype, t.shape, (c._replace(offsets=(1,)),))
    elif how == "file":
        out[2] = TensorEntry(t.dtype, t.shape, (c._replace(file="c.safetensors"),))
    elif how == "shape":
        out[2] = TensorEntry(t.dtype, (2**62 + 1,), (c._replace(shape=(2**62 + 1,)),))
    return out


@pytest.mark.parametrize(
    "how", ["none", "repeated key", "repeated key across runs", "offsets", "file", "shape"]
)
def test_table_checked_by_runs_as_entry_by_entry(how: str) -> None:
    outcomes = []
    for shared in (True, False):
        tensors, files = _table(shared)
        assert len(manifest_module.table_runs(tensors)) == (4 if shared else len(tensors))
        try:
            check_tensor_table(_broken(tensors, how), files, "m")
            outcomes.append("ok")
        except CheckpointFormatError as exc:
            outcomes.append(str(exc))
    assert outcomes[0] == outcomes[1]
    assert (outcomes[0] == "ok") == (how == "none")


def test_table_written_by_runs_is_what_json_dumps_writes() -> None:
    tensors, files = _table(shared=True)
    tensors = _broken(tensors, "offsets")  # a run broken by an entry of other offsets
    m = Manifest({"w": {"$torch": 0}}, tensors, files, {}, "2026-01-01T00:00:00Z", (1, 0), 2, "ckptproto")
    doc = json.loads(m.to_json())
    assert doc["tensors"] == [
        {
            "dtype": t.dtype.name,
            "shape": list(t.shape),
            "chunks": [
                {"file": c.file, "key": c.key, "offsets": list(c.offsets), "shape": list(c.shape)}
                for c in t.chunks
            ],
        }
        for t in tensors
    ]


def test_file_plan_columns_tile_the_file_widest_first() -> None:
    encoded = encode_state(_varied_state())
    job = share.plan_share(encoded, 0, 1)
    plan = plan_file("d.safetensors", 0, job.pieces)
    widths = [min(p.spec.dtype.itemsize, 8) for p in plan.pieces]
    assert widths == sorted(widths, reverse=True)
    assert plan.order == [p.source for p in plan.pieces] and sorted(plan.order) == list(
        range(len(job.pieces))
    )
    ends = [b + n for b, n in zip(plan.begins, plan.sizes, strict=True)]
    assert plan.begins == [len(plan.header), *ends[:-1]] and plan.size == ends[-1]
    assert [p.begin for p in plan.placements] == plan.begins


def test_table_of_a_world_of_one_by_columns_is_the_general_table(tmp_path: Path) -> None:
    from ckptproto.io import pipeline

    encoded = encode_state(_varied_state())
    job = share.plan_share(encoded, 0, 1)
    chunks = pipeline._chunks(job)
    answer = {"file": ["d.safetensors", 99, "crc32:00000000"], "chunks": chunks}
    files: dict[str, FileEntry] = {}
    fast = pipeline._entries(tmp_path, job.encoded, [answer], files)
    # Out of order, and as JSON sends them (lists): the general path, chunk by chunk.
    shuffled = [[index, key, list(offsets), list(shape)] for index, key, offsets, shape in reversed(chunks)]
    general = pipeline._entries(tmp_path, job.encoded, [{**answer, "chunks": shuffled}], {})
    assert fast == general and len(fast) == len(encoded.tensors)
    assert files == {"d.safetensors": FileEntry(99, "crc32:00000000", 0)}
    with pytest.raises(ckptproto.errors.DistributedCheckpointError, match="shards hold 0 of"):
        pipeline._entries(tmp_path, job.encoded, [{**answer, "chunks": chunks[1:]}], {})
    # What a world of one answers ("every tensor whole, under these keys"): the table by
    # columns, and the same table from the chunks it stands for.
    assert isinstance(job.pieces, WholePieces)
    whole = {"file": answer["file"], "whole": job.pieces.keys}
    assert pipeline._table(tmp_path, job.encoded, [whole], {}) == fast
    assert pipeline._entries(tmp_path, job.encoded, [whole], {}) == fast


def _with_tensor_dicts(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` plus dicts of tensors only (a module's state_dict): one all usual tensors, one
    with a tie, one with a non-contiguous, an empty and a neg-bit tensor, one the first again;
    then a small dict (item by item) holding a tensor of a column again and another view of
    one's memory (a tie and a non-tie found from a column's addresses)."""
    g = torch.Generator().manual_seed(1)
    fresh = {f"p{i}": torch.randn(i % 3 + 1, 2, generator=g) for i in range(12)}
    fresh["half"] = torch.ones(3, dtype=torch.float16)
    fresh["parameter"] = torch.nn.Parameter(torch.zeros(2))
    tied = {**{f"q{i}": torch.randn(2, generator=g) for i in range(9)}, "again": state["w"]}
    odd = {f"r{i}": torch.randn(2, generator=g) for i in range(9)}
    odd.update(t=torch.randn(2, 3, generator=g).t(), empty=torch.empty(0), neg=torch._neg_view(torch.ones(2)))
    late = {"p0": fresh["p0"], "p1_flat": fresh["p1"].view(-1), "q0": tied["q0"]}
    # one dtype (the usual module: its specs found by shape alone), a shape seen in "module"
    one_dtype = {f"s{i}": torch.randn(i % 2 + 1, 2, generator=g) for i in range(10)}
    return {
        **state,
        "one_dtype_module": one_dtype,
        "module": fresh,
        "tied_module": tied,
        "odd_module": odd,
        "after": dict(fresh),
        "late": late,
    }


def test_dicts_of_tensors_encoded_a_column_at_a_time_as_item_by_item(monkeypatch: pytest.MonkeyPatch) -> None:
    from ckptproto import tree

    state = _with_tensor_dicts(_varied_state())
    columns = encode_state(state)
    monkeypatch.setattr(tree, "_BATCH_MIN", 1 << 60)  # every dict item by item
    items = encode_state(state)
    assert columns.tree == items.tree
    assert len(columns.tensors) == len(items.tensors)
    for a, b in zip(columns.tensors, items.tensors, strict=True):
        assert a.value is b.value and (a.spec, a.path, a.shard, a.host_address) == (
            b.spec,
            b.path,
            b.shard,
            b.host_address,
        )
    assert columns.tree["after"] == {
        k: {"$torch": columns.tree["module"][k]["$torch"]} for k in state["after"]
    }
    late = columns.tree["late"]
    assert late["p0"] == columns.tree["module"]["p0"] and late["q0"] == columns.tree["tied_module"]["q0"]
    assert late["p1_flat"] != columns.tree["module"]["p1"]  # the same address, another shape


def test_refusals_in_a_dict_of_tensors_are_those_item_by_item() -> None:
    for bad, message in (
        (torch.ones(2, dtype=torch.float32).to_sparse(), "to_dense"),
        (torch.ones(2, dtype=torch.float32).to_mkldnn(), "mkldnn"),
        (torch.empty(2, device="meta"), "meta tensors"),
        (torch.nested.nested_tensor([torch.ones(2), torch.ones(3)]), "nested tensors"),
    ):
        state = {"m": {**{f"p{i}": torch.ones(2) for i in range(9)}, "bad": bad, "z": torch.ones(1)}}
        with pytest.raises(ckptproto.errors.UnsupportedValueError, match=message) as info:
            encode_state(state)
        assert info.value.path == "m.bad"


def test_a_dict_of_only_tensors_keeps_lazy_bits_out_of_the_byte_path(tmp_path: Path) -> None:
    """The column path (a dict of tensors only, what a module's state_dict is) gives an
    address only to tensors whose memory holds their bytes: not to a real tensor read negated
    (``torch._neg_view``, as ``c.conj().imag`` is), a complex one conjugated lazily, or a
    transposed one."""
    g = torch.Generator().manual_seed(1)
    c = torch.randn(4, dtype=torch.complex64, generator=g)
    reals = {f"r{i}": torch.randn(4, generator=g) for i in range(10)}
    only_real = {
        **reals,
        "neg": torch._neg_view(torch.randn(4, generator=g)),
        "t": torch.randn(3, 2, generator=g).t(),
    }
    with_complex = {**only_real, "c": c, "conj": torch.randn(4, dtype=torch.complex64, generator=g).conj()}
    for n, state in enumerate((only_real, with_complex)):
        encoded = encode_state({"m": state})
        assert set(encoded.tree["m"]) == set(state)  # encoded as one dict of $torch references
        lazy = {"neg", "t", "conj"} & set(state)
        for leaf in encoded.tensors:
            name = leaf.path.split(".")[-1]
            assert bool(leaf.host_address) is (name not in lazy), name
        ckptproto.save({"m": state}, tmp_path / f"ck{n}")
        back = ckptproto.load(tmp_path / f"ck{n}")["m"]
        for name, value in state.items():
            assert torch.equal(back[name], value.resolve_conj().resolve_neg()), name


def test_a_layout_planned_again_takes_the_last_plan_and_nothing_stale() -> None:
    """plan_file keeps the plans of the last files by layout (keys, specs, sources, metadata):
    a save of the same layout gets that plan under its own name, rank and pieces; any change
    to the layout, or to the caller's lists after the call, gets a plan of its own."""
    f32 = arrays.ArraySpec("torch", dtypes.by_name("float32"), (2,))
    f64 = arrays.ArraySpec("torch", dtypes.by_name("float64"), (2,))
    keys, specs = [f"m.p{i}" for i in range(10)], [f32] * 10
    first = plan_file("a.safetensors", 0, WholePieces(keys, specs))
    pieces = WholePieces([str(k) for k in keys], list(specs))  # equal lists, other objects
    again = plan_file("b.safetensors", 3, pieces)
    assert again.header is first.header  # taken, not planned again
    assert (again.name, again.rank, again.given) == ("b.safetensors", 3, pieces)
    assert again.given is pieces

    def fresh(plan: Any, expected_header: bytes) -> None:
        assert plan.header is not first.header and plan.header == expected_header

    def header_of(keys: list[str], specs: list[Any], meta: dict[str, str] | None = None) -> bytes:
        # planned with the cache out of reach: a layout it has never seen
        from ckptproto.io import plan as plan_module

        return plan_module._plan_file(
            "x",
            0,
            WholePieces(keys, specs),
            range(len(keys)),
            keys,
            specs,
            plan_module.FILE_METADATA if meta is None else meta,
        ).header

    fresh(plan_file("c", 0, WholePieces(keys, [f64, *specs[1:]])), header_of(keys, [f64, *specs[1:]]))
    fresh(plan_file("c", 0, WholePieces(keys[::-1], specs)), header_of(keys[::-1], specs))
    fresh(
        plan_file("c", 0, WholePieces(keys, specs), {"format": "pt"}),
        header_of(keys, specs, {"format": "pt"}),
    )
    # The caller's lists changed after planning: the kept layout is a copy.
    mine = list(keys)
    planned = plan_file("d", 0, WholePieces(mine, specs))
    mine[0] = "m.renamed"
    renamed = plan_file("d", 0, WholePieces(mine, specs))
    assert b"m.renamed" in renamed.header and b"m.renamed" not in planned.header


def test_a_dict_encoded_again_takes_the_last_column_and_nothing_stale(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The encoder keeps its last columns (keys, path, first index, dtype, shapes): the same
    module's state encoded again (fresh tensors, as state_dict() gives) takes its references
    and paths; another dtype, shape, key, path or index is encoded anew, each time equal to
    the item-by-item encoding."""
    from ckptproto import tree

    g = torch.Generator().manual_seed(3)

    def module(shapes: list[tuple[int, ...]], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        return {f"layer.{i}": torch.randn(*s, generator=g).to(dtype) for i, s in enumerate(shapes)}

    shapes = [(2,), (3, 2), (4,)] * 4
    first = encode_state({"m": module(shapes)})
    again = encode_state({"m": module(shapes)})
    assert again.tree["m"] == first.tree["m"] and again.tree["m"] is not first.tree["m"]  # a copy
    assert all(map(operator.is_, again.tree["m"].values(), first.tree["m"].values()))  # taken
    del again.tree["m"]["layer.0"]  # a consumer changing its tree changes no later save's
    assert encode_state({"m": module(shapes)}).tree["m"] == first.tree["m"]
    assert [t.path for t in again.tensors] == [t.path for t in first.tensors]

    def items(state: dict[str, Any]) -> Any:
        with monkeypatch.context() as m:
            m.setattr(tree, "_BATCH_MIN", 1 << 60)
            return encode_state(state)

    changed_shape = [*shapes[:-1], (5,)]
    renamed = {**module(shapes[:-1]), "other": torch.randn(4, generator=g)}
    for state in (
        {"m": module(changed_shape)},
        {"m": module(shapes, torch.float64)},
        {"m": renamed},
        {"n": module(shapes)},
        {"before": torch.zeros(1), "m": module(shapes)},  # the same keys from another index
    ):
        columns, by_item = encode_state(state), items(state)
        assert columns.tree == by_item.tree
        assert columns.tree.get("m") is not first.tree["m"]
        assert [(t.spec, t.path) for t in columns.tensors] == [(t.spec, t.path) for t in by_item.tensors]
        assert all(a.value is b.value for a, b in zip(columns.tensors, by_item.tensors, strict=True))
    # a column taken again still checks every tensor: a lazy negative bit or a tie
    lazy = module(shapes)
    lazy["layer.0"] = torch._neg_view(torch.ones(2))
    encode_state({"m": module(shapes)})
    leaves = encode_state({"m": lazy}).tensors
    assert leaves[0].host_address == 0 and all(t.host_address for t in leaves[1:])
    tied = module(shapes)
    tied["layer.3"] = tied["layer.0"]
    assert encode_state({"m": tied}).tree == items({"m": tied}).tree


def _ranges_of(arrays_: list[np.ndarray[Any, Any]]) -> arrays.HostRanges:
    return arrays.HostRanges([a.ctypes.data for a in arrays_], [a.nbytes for a in arrays_])


@pytest.mark.parametrize("sizes", ["one", "few", "many"])
def test_host_ranges_join_the_bytes_a_view_of_each_gives(sizes: str) -> None:
    """HostRanges.joined (numpy copies by size, no view per range) gives the bytes of the
    ranges in order; in another order (take), a part (slice) and past the numpy path's
    number of distinct sizes (views joined) alike."""
    rng = np.random.default_rng(0)
    count = {"one": 50, "few": 60, "many": 200}[sizes]
    lengths = {
        "one": [16] * count,
        "few": [(1, 3, 8, 16)[i % 4] for i in range(count)],
        "many": list(range(1, count + 1)),  # more distinct sizes than _JOIN_SIZES_MAX
    }[sizes]
    pieces = [rng.integers(0, 256, n, dtype=np.uint8) for n in lengths]
    ranges = _ranges_of(pieces)
    assert len(ranges) == count and ranges.nbytes == sum(lengths)
    assert [bytes(v) for v in ranges] == [p.tobytes() for p in pieces]
    assert ranges.joined().tobytes() == b"".join(p.tobytes() for p in pieces)
    order = list(rng.permutation(count))
    assert ranges.take(order).joined().tobytes() == b"".join(pieces[i].tobytes() for i in order)
    assert ranges[5:17].joined().tobytes() == b"".join(p.tobytes() for p in pieces[5:17])
    assert bytes(ranges[-1]) == pieces[-1].tobytes()
    with pytest.raises(IndexError):
        ranges[count]


@pytest.mark.parametrize("sizes", ["one", "few", "many"])
@pytest.mark.parametrize("places", ["back to back", "aligned", "shuffled"])
def test_host_ranges_copy_each_range_to_its_place(sizes: str, places: str) -> None:
    """HostRanges.copy_into puts range i's bytes at offsets[i] of the array (a staging slab:
    back to back, at aligned places with gaps, or in any order) and touches nothing else."""
    rng = np.random.default_rng(1)
    by_kind = {"one": [64] * 40, "few": [(8, 64, 3)[i % 3] for i in range(40)], "many": list(range(1, 101))}
    lengths = by_kind[sizes]
    pieces = [rng.integers(0, 256, n, dtype=np.uint8) for n in lengths]
    slots = [-(-n // 64) * 64 if places != "back to back" else n for n in lengths]
    offsets = list(np.cumsum(slots) - slots)
    if places == "shuffled":
        order = list(rng.permutation(len(lengths)))
        offsets = [offsets[i] for i in order]
    out = np.full(sum(slots) + 32, 0xAB, dtype=np.uint8)
    _ranges_of(pieces).copy_into(out, offsets)
    expected = np.full_like(out, 0xAB)
    for piece, at in zip(pieces, offsets, strict=True):
        expected[at : at + len(piece)] = piece
    assert out.tobytes() == expected.tobytes()
    with pytest.raises(ValueError, match="inside the array"):
        _ranges_of(pieces).copy_into(out[: max(offsets)], offsets)


def test_host_ranges_refuse_empty_ranges() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        arrays.HostRanges([4096, 8192], [8, 0])
    none = arrays.HostRanges([], [])
    assert len(none) == 0 and none.nbytes == 0 and none.joined().tobytes() == b""


@pytest.mark.parametrize("shapes", ["uniform", "varied"])
def test_a_save_of_many_small_tensors_joins_their_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shapes: str
) -> None:
    """The usual state's bytes go out as HostRanges joined per batch (no view per tensor),
    and the file holds every tensor's bytes where its header says (read back by safetensors)."""
    g = torch.Generator().manual_seed(3)
    dtypes_ = (torch.float32, torch.int8, torch.float64, torch.bfloat16)
    state = {
        f"t{i}": torch.randn(4 if shapes == "uniform" else (i % 7 + 1, i % 3 + 1), generator=g).to(
            torch.float32 if shapes == "uniform" else dtypes_[i % 4]
        )
        for i in range(300)
    }
    joined: list[int] = []
    real = arrays.HostRanges.joined

    def counted(self: arrays.HostRanges) -> Any:
        joined.append(len(self))
        return real(self)

    monkeypatch.setattr(arrays.HostRanges, "joined", counted)
    ckptproto.save(state, tmp_path / "c")
    assert sum(joined) == len(state)
    back = ckptproto.load(tmp_path / "c")
    assert all(torch.equal(back[k], v) for k, v in state.items())
    on_disk = load_file(str(tmp_path / "c" / "data-00000-000.safetensors"))
    assert all(torch.equal(on_disk[k], v) for k, v in state.items())


def test_host_ranges_take_addresses_past_two_to_the_63() -> None:
    """An address with its top bit set (a tagged pointer) is a range like any other."""
    memory = bytearray(range(256)) * 4
    base = 2**63 + 0x1000
    ranges = arrays.HostRanges([base + 100, base + 8, base + 40], [4, 4, 2], (base, memoryview(memory)))
    assert ranges.joined().tobytes() == bytes(memory[100:104] + memory[8:12] + memory[40:42])
    assert bytes(ranges[1]) == bytes(memory[8:12])
