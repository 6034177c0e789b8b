"""The manifest's quick reading (format/manifest_text.py) against the general JSON path: for
every manifest, a writer's or a hostile one written in the writer's compact form (where the
quick path engages), both give the same Manifest or the same error, and the quick path is
taken where it should be."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _reliability import STRESS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptproto
from ckptproto.format import manifest_text
from ckptproto.format.manifest import CHECKSUM_KEY, Manifest

SETTINGS = settings(
    max_examples=3000 if STRESS else 300,  # CKPTPROTO_STRESS=1: ten times more
    deadline=None,
    derandomize=not STRESS,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)


def varied_state() -> dict[str, Any]:
    return {
        "models": {
            "m": {f"layer{i}.w": torch.full((3, 2), float(i)) for i in range(40)}
            | {f"layer{i}.b": torch.zeros(2, dtype=torch.bfloat16) for i in range(5)},
            "scalar": torch.tensor(3.5),
            "empty": torch.zeros((0, 4)),
            "ünïcode ключ": torch.arange(3),
            "percent%s": torch.ones(1, dtype=torch.bool),
        },
        "arrays": {"a": np.arange(6, dtype=np.int16).reshape(2, 3), "c": np.ones(2, np.complex64)},
        "trainer": {"global_step": 7, "lr": 0.5, "name": "x"},
    }


def compact(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def general(data: bytes, monkeypatch: pytest.MonkeyPatch) -> Manifest | Exception:
    with monkeypatch.context() as m:
        m.setattr(manifest_text, "split_members", lambda text, columns=None: None)
        return outcome(data)


def outcome(data: bytes) -> Manifest | Exception:
    try:
        return Manifest.parse(data, "m.json")
    except Exception as exc:  # compared by type and message below
        return exc


def same(a: Manifest | Exception, b: Manifest | Exception) -> None:
    if isinstance(a, Exception) or isinstance(b, Exception):
        assert type(a) is type(b) and str(a) == str(b), (a, b)
        return
    assert a == b
    assert a.refs == b.refs
    assert [type(t) for t in a.tensors] == [type(t) for t in b.tensors]


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    root = tmp_path_factory.mktemp("w")
    ckptproto.save(varied_state(), root / "ckpt")
    return (root / "ckpt" / "manifest.json").read_bytes()


def test_a_writers_manifest_is_read_quickly_and_the_same(
    written: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    split = manifest_text.split_members(written.decode())
    assert split is not None and split[1] is not None, "the writer's table is read by the quick path"
    members, table = split
    assert "tensors" not in members and len(table.keys) == len(json.loads(written)["tensors"])
    same(outcome(written), general(written, monkeypatch))


def test_tables_the_quick_path_declines_parse_the_general_way(
    written: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    doc = json.loads(written)
    del doc[CHECKSUM_KEY]
    escaped = copy.deepcopy(doc)
    escaped["tensors"][0]["chunks"][0]["key"] = 'a"quote'
    spaced = json.dumps(doc).encode()
    reordered = copy.deepcopy(doc)
    reordered["tensors"][1] = dict(reversed(list(reordered["tensors"][1].items())))
    for data in (compact(escaped), spaced, compact(reordered)):
        split = manifest_text.split_members(data.decode())
        assert split is None or split[1] is None
        result = outcome(data)
        assert isinstance(result, Manifest)
        same(result, general(data, monkeypatch))


def tensor_mutations() -> st.SearchStrategy[tuple[str, Any]]:
    ints = st.one_of(
        st.integers(-3, 5),
        st.sampled_from([2**62, 2**62 + 1, 2**63, 10**19, 10**20, True, 1.0]),
    )
    return st.tuples(
        st.sampled_from(["dtype", "shape", "offsets", "cshape", "file", "key", "extra", "chunks"]),
        st.one_of(
            st.lists(ints, max_size=4),
            st.sampled_from(
                ["float32", "int8", "bool", "Float32", "f32", "", "layer0.w", "models.m.layer1.w", None, 3]
            ),
            st.just("data-00000-000.safetensors"),
            st.just("other.safetensors"),
        ),
    )


@SETTINGS
@given(data=st.data())
def test_hostile_tables_get_the_general_verdict(
    written: bytes, monkeypatch: pytest.MonkeyPatch, data: st.DataObject
) -> None:
    doc = json.loads(written)
    del doc[CHECKSUM_KEY]  # an edited manifest (F-36), so every edit reaches the parser
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3))):
        entry = doc["tensors"][data.draw(st.integers(0, len(doc["tensors"]) - 1))]
        field, value = data.draw(tensor_mutations())
        chunk = entry["chunks"][0]
        if field in ("dtype", "shape"):
            entry[field] = value
        elif field == "cshape":
            chunk["shape"] = value
        elif field == "extra":
            entry["extra"] = value
        elif field == "chunks":
            entry["chunks"] = [chunk, dict(chunk)]
        else:
            chunk[field] = value
    same(outcome(compact(doc)), general(compact(doc), monkeypatch))


@pytest.mark.parametrize(
    "edit",
    [
        lambda t: t.replace('"tensors":[', '"tensors":[],"tensors":[', 1),
        lambda t: t.replace('"format":"ckptproto",', '"format":"ckptproto","format":"ckptproto",', 1),
        lambda t: t + " ",
        lambda t: t + "x",
        lambda t: t[:-1],
        lambda t: t.replace('"tensors":[', '"tensors" :[', 1),
        lambda t: t.replace("}]}]", "}]},]", 1),
        lambda t: t.replace("}]}]", "}]}}]", 1),
        lambda t: t.replace("}]},{", "}]}{", 1),
        lambda t: t.replace("}]},{", "}]},,{", 1),
        lambda t: t.replace("}]},{", "}]}],[{", 1),
        lambda t: t.replace('"key":"models.m.layer1.w"', '"key":"models.m.layer0.w"', 1),
        # the table is split at its keys: a key holding the table's end, or a separator's
        # text; one entry spelled otherwise between two keys (still JSON)
        lambda t: t.replace('"key":"models.m.layer1.w"', '"key":"a}]}]b"', 1),
        lambda t: t.replace('"key":"models.m.layer1.w"', '"key":"a,offsets:[0]}]},{dtype:"', 1),
        lambda t: t.replace(
            '"key":"models.m.layer1.w","offsets":[0,0]', '"key":"models.m.layer1.w","offsets":[0, 0]', 1
        ),
        lambda t: t.replace(
            '"key":"models.m.layer1.w","offsets":[0,0]', '"key":"models.m.layer1.w","offsets":[1,0]', 1
        ),
        lambda t: t.replace('"key":"models.m.layer1.w"', '"key":"\\ud800"', 1),
        lambda t: t.replace('"offsets":[0,0]', '"offsets":[00,0]', 1),
        lambda t: t.replace('"shape":[3,2]', '"shape":[03,2]', 1),
        # not JSON in the table and a bad version before it: JSON is refused first, as ever
        lambda t: t.replace('"shape":[3,2]', '"shape":[03,2]', 1).replace('"1.0"', '"x"', 1),
        lambda t: t.replace('"shape":[3,2]', '"shape":[3,,2]', 1).replace('"files":{', '"files":{"x":1,', 1),
        lambda t: t.replace('"shape":[3,2]', '"shape":[' + "9" * 5000 + ",2]", 1),
        lambda t: t.replace('"global_step":7', '"global_step":NaN', 1),
        lambda t: t.replace('"global_step":7', '"global_step":1e400', 1),
        lambda t: t.replace('"global_step":7', '"global_step":' + "9" * 5000, 1),
        lambda t: t.replace('"global_step":7', '"global_step":7,"global_step":8', 1),
        lambda t: t.replace('"lr":0.5', '"lr" :0.5,"lr":0.6', 1),
        lambda t: t.replace('"lr":0.5', '"lr":0.5,"lr" :0.6', 1),
        lambda t: t.replace('"lr":0.5', '"lr"\n:0.5', 1),
        # each whitespace JSON allows before a colon, hiding a repeated key from the count
        lambda t: t.replace('"lr":0.5', '"lr"\t:0.5,"lr":0.6', 1),
        lambda t: t.replace('"lr":0.5', '"lr"\r:0.5,"lr":0.6', 1),
        lambda t: t.replace('"lr":0.5', '"lr"\n:0.5,"lr":0.6', 1),
        lambda t: t.replace('"lr":0.5', '"lr"\r\n\t :0.5,"lr":0.6', 1),
        lambda t: t.replace('"name":"x"', '"name":":x","name":"y"', 1),
        lambda t: t.replace('"name":"x"', '"name":":x"', 1),
        lambda t: t.replace('"name":"x"', '"name":"a\\"b","name":"y"', 1),
        lambda t: t.replace('{"$torch":0}', '{"$torch":{"a":1,"a":2}}', 1),
        lambda t: t.replace('{"$torch":0}', '{"$torch":0,"$torch":0}', 1),
        # in an object of many references (counted a column at a time): a repeated key, with
        # the same or another reference, and references torch_column does not take
        lambda t: t.replace('"layer1.w":{"$torch":1}', '"layer1.w":{"$torch":1},"layer1.w":{"$torch":1}', 1),
        lambda t: t.replace('"layer1.w":{"$torch":1}', '"layer1.w":{"$torch":1},"layer1.w":{"$torch":2}', 1),
        lambda t: t.replace('"layer1.w":{"$torch":1}', '"layer1.w":{"$torch":1,"$torch":1}', 1),
        lambda t: t.replace('"layer1.w":{"$torch":1}', '"layer1.w":{"$torch":-1}', 1),
        lambda t: t.replace('"layer1.w":{"$torch":1}', '"layer1.w":{"$torch":true}', 1),
        lambda t: t.replace('"layer1.w":{"$torch":1}', '"layer1.w":{"$torch":1.0}', 1),
        lambda t: t.replace('"layer1.w":{"$torch":1}', '"layer1.w":{"$numpy":1}', 1),
        lambda t: t.replace('"layer1.w":{"$torch":1}', '"layer1.w":{"$torch":99999}', 1),
        lambda t: t.replace('"layer1.w":{"$torch":1}', '"$layer1.w":{"$torch":1}', 1),
        lambda t: t.replace('"rank":0', '"rank":0,"rank":0', 1),
        lambda t: t.replace('"metadata":{', '"metadata":{"k":[{"a":1,"a":1}],', 1),
        lambda t: t.replace('"metadata":{', '"metadata":{"k":[{"a":1,"b":1}],', 1),
        lambda t: t.replace('"state":{', '"state":{"x":' + "[" * 100_000, 1),
        lambda t: t.replace('"tensors":[', '"tensors":[' + "[" * 100_000, 1),
    ],
)
def test_hostile_documents_get_the_general_verdict(
    written: bytes, monkeypatch: pytest.MonkeyPatch, edit: Any
) -> None:
    doc = json.loads(written)
    del doc[CHECKSUM_KEY]
    text = compact(doc).decode()
    data = edit(text).encode()
    assert data != text.encode(), "the edit applies to this manifest"
    same(outcome(data), general(data, monkeypatch))


def test_the_entry_text_is_the_writers(written: bytes) -> None:
    """The quick path's fixed texts are those the writer puts around an entry's parts."""
    text = written.decode()
    split = manifest_text.split_members(text)
    assert split is not None and split[1] is not None
    table = split[1]
    doc = json.loads(text)["tensors"]
    assert table.keys == [entry["chunks"][0]["key"] for entry in doc]
    for key, form in zip(table.keys, table.form_of, strict=True):
        head, tail = table.forms[form]
        first, before_key, after_key, last = manifest_text.ENTRY_TEXT
        assert "".join((first, head, before_key, key, after_key, tail, last)) in text
    for i, entry in enumerate(doc):
        head, tail = table.forms[table.form_of[i]]
        rebuilt = "".join(
            (
                manifest_text.ENTRY_TEXT[0],
                head,
                *manifest_text.ENTRY_TEXT[1:3],
                tail,
                manifest_text.ENTRY_TEXT[3],
            )
        )
        assert json.loads(rebuilt) == dict(entry, chunks=[dict(entry["chunks"][0], key="")])
        assert table.entries[table.form_of[i]] == json.loads(rebuilt)


@pytest.fixture(scope="module")
def uniform(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A writer's manifest whose table repeats one form (the quick path's usual table)."""
    root = tmp_path_factory.mktemp("u")
    ckptproto.save({"m": {f"p{i}": torch.full((3,), float(i)) for i in range(12)}}, root / "ckpt")
    doc = json.loads((root / "ckpt" / "manifest.json").read_bytes())
    del doc[CHECKSUM_KEY]
    return compact(doc).decode()


@pytest.mark.parametrize("entry", [0, 1, 6, 10, 11])
@pytest.mark.parametrize(
    "edit",
    [
        lambda e: e,  # unchanged
        lambda e: e.replace('"offsets":[0]', '"offsets":[1]'),
        lambda e: e.replace('"shape":[3]', '"shape":[4]', 1),
        lambda e: e.replace('"shape":[3]}', '"shape":[4]}'),
        lambda e: e.replace('"float32"', '"int32"'),
        lambda e: e.replace('"float32"', '"float64"'),
        lambda e: e.replace("}]}", "},{}]}"),
        lambda e: e.replace('"offsets":[0]', '"offsets": [0]'),
    ],
)
def test_a_uniform_tables_entries_edited_one_at_a_time_get_the_general_verdict(
    uniform: str, monkeypatch: pytest.MonkeyPatch, entry: int, edit: Any
) -> None:
    """One entry of a one-form table (first, second, middle, second to last, last) spelled
    otherwise: the quick path (every middle piece compared with the first, no hashing) gives
    the general path's manifest or error."""
    start = uniform.index('"tensors":[') + len('"tensors":[')
    end = uniform.index("}]}]", start) + 3
    entries = uniform[start:end].split("},{")
    entries = [
        ("" if i == 0 else "{") + e + ("" if i == len(entries) - 1 else "}") for i, e in enumerate(entries)
    ]
    entries[entry] = edit(entries[entry])
    data = (uniform[:start] + ",".join(entries) + uniform[end:]).encode()
    if data == uniform.encode():  # unchanged: read by the quick path
        split = manifest_text.split_members(uniform)
        assert split is not None and split[1] is not None and len(set(split[1].form_of)) == 1
    same(outcome(data), general(data, monkeypatch))


def test_the_manifest_checksum_uses_the_data_files_crc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written and checked by format.crc.crc32 (ISA-L where installed), as the data files
    are: the same value as zlib's, at several times its speed on a large manifest."""
    from ckptproto.format import manifest as manifest_module

    calls: list[int] = []
    real = manifest_module.crc32

    def counted(data: Any, value: int = 0) -> int:
        calls.append(len(data))
        return real(data, value)

    monkeypatch.setattr(manifest_module, "crc32", counted)
    ckptproto.save({"w": torch.ones(3)}, tmp_path / "c")
    written = len(calls)
    assert written >= 1
    ckptproto.read_manifest(tmp_path / "c")
    assert len(calls) > written


@pytest.mark.parametrize("space", [" ", "\t", "\n", "\r", "\r\n \t"])
def test_a_repeated_key_hidden_by_whitespace_before_its_colon_is_refused(space: str) -> None:
    """An object whose repeated key (one fewer member) is spaced from its colon (one fewer
    '":' counted) balances the count that lets the quick path skip the duplicate-key hook:
    whichever whitespace JSON allows there, in a text with no other whitespace, the value is
    parsed again with the hook, which names the key."""
    from ckptproto.errors import CheckpointFormatError

    text = '{"a"' + space + ':1,"a":2,"b":{"$torch":0}}'
    with pytest.raises(CheckpointFormatError, match="duplicate JSON key 'a'"):
        manifest_text._value(text, 0, None)
    assert manifest_text._value('{"a":1,"b":{"$torch":0}}', 0, None)[0] == {"a": 1, "b": {"$torch": 0}}


def test_a_surrogate_escape_is_found_wherever_it_is() -> None:
    """strict_json.has_surrogate_escape: a text without a backslash has none; with one,
    each escape of a surrogate is found, an escaped backslash before "ud800" is not one
    (the general path's own check decides then)."""
    from ckptproto.format import strict_json

    assert not strict_json.has_surrogate_escape('{"a":"ud800 plain"}')
    assert strict_json.has_surrogate_escape('{"a":"x\\ud800"}')
    assert strict_json.has_surrogate_escape('{"a":"\\uDFFF"}')
    assert not strict_json.has_surrogate_escape('{"a":"\\u0041"}')
