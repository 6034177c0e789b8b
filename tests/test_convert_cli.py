"""The ``ckptproto convert`` command, pickle refusal, refusals of bad input, progress."""

from __future__ import annotations

import decimal
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _interop_helpers import assert_same, trained_state

import ckptproto
from ckptproto.cli import main
from ckptproto.errors import (
    CheckpointExistsError,
    CheckpointFormatError,
    PickleRefusedError,
    UnsupportedValueError,
)
from ckptproto.interop import convert, detect_format
from ckptproto.interop.progress import Progress

RAN = []


class Five:
    """Unpickles to the int 5 via a global weights_only refuses; records that it ran."""

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (int, ("5",))


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (RAN.append, ("code ran",))


def test_cli_converts_torch_save_to_ckptproto_and_back(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = trained_state()
    torch.save(state, tmp_path / "model.pt")
    assert main(["convert", str(tmp_path / "model.pt"), str(tmp_path / "c"), "--to", "ckptproto"]) == 0
    assert "torch -> ckptproto" in capsys.readouterr().out
    assert main(["convert", str(tmp_path / "c"), str(tmp_path / "m.safetensors"), "--to", "safetensors"]) == 0
    assert main(["convert", str(tmp_path / "m.safetensors"), str(tmp_path / "back.pt"), "--to", "torch"]) == 0
    assert_same(state, torch.load(tmp_path / "back.pt", weights_only=True))


def test_file_needing_full_unpickling_is_refused_without_running_it(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2), "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(PickleRefusedError, match="unsafe-allow-pickle"):
        convert(tmp_path / "evil.pt", tmp_path / "c", to="ckptproto")
    assert RAN == [] and not (tmp_path / "c").exists()
    assert main(["convert", str(tmp_path / "evil.pt"), str(tmp_path / "c"), "--to", "ckptproto"]) == 2


def test_unsafe_allow_pickle_reads_a_trusted_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    torch.save({"w": torch.ones(2), "n": Five()}, tmp_path / "trusted.pt")
    with pytest.raises(PickleRefusedError):
        convert(tmp_path / "trusted.pt", tmp_path / "c", to="ckptproto")
    argv = [
        "convert",
        str(tmp_path / "trusted.pt"),
        str(tmp_path / "c"),
        "--to",
        "ckptproto",
        "--unsafe-allow-pickle",
    ]
    assert main(argv) == 0
    assert "fully unpickled" in capsys.readouterr().err
    assert ckptproto.load(tmp_path / "c")["n"] == 5


def test_values_the_format_cannot_hold_are_refused_with_their_path(tmp_path: Path) -> None:
    torch.save({"sizes": {"s": torch.Size([2, 3])}}, tmp_path / "size.pt")
    with pytest.raises(UnsupportedValueError, match=r"sizes\.s"):
        convert(tmp_path / "size.pt", tmp_path / "c", to="ckptproto")
    assert not (tmp_path / "c").exists()


def test_existing_destination_needs_overwrite(tmp_path: Path) -> None:
    ckptproto.save({"a": torch.ones(3)}, tmp_path / "c")
    for fmt, name in [("torch", "o.pt"), ("safetensors", "o.safetensors"), ("dcp", "o_dcp")]:
        convert(tmp_path / "c", tmp_path / name, to=fmt)  # type: ignore[arg-type]
        with pytest.raises(CheckpointExistsError):
            convert(tmp_path / "c", tmp_path / name, to=fmt)  # type: ignore[arg-type]
        convert(tmp_path / "c", tmp_path / name, to=fmt, overwrite=True)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "o.pt", "o.safetensors", "o_dcp"]


def test_unknown_source_is_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.bin").write_bytes(b"hello world, not a checkpoint")
    assert main(["convert", str(tmp_path / "junk.bin"), str(tmp_path / "c"), "--to", "ckptproto"]) == 2
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "c"), "--to", "ckptproto"]) == 2


def test_progress_draws_on_request_and_is_quiet_otherwise(tmp_path: Path) -> None:
    ckptproto.save({"a": torch.ones(1 << 20)}, tmp_path / "c")
    stream = io.StringIO()
    convert(tmp_path / "c", tmp_path / "o.pt", to="torch", progress=True, progress_stream=stream)
    assert "100%" in stream.getvalue() and stream.getvalue().endswith("\n")
    quiet = io.StringIO()
    convert(tmp_path / "c", tmp_path / "o2.pt", to="torch", progress_stream=quiet)  # not a TTY
    assert quiet.getvalue() == ""
    bar = Progress(4 << 20, "x", watch=lambda: [], stream=io.StringIO(), enabled=True)
    assert "50%" in bar.line(2 << 20) and "2.0 MiB / 4.0 MiB" in bar.line(2 << 20)


def test_cli_is_quiet_without_a_terminal(tmp_path: Path) -> None:
    ckptproto.save({"a": torch.ones(1000)}, tmp_path / "c")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptproto",
            "convert",
            str(tmp_path / "c"),
            str(tmp_path / "o.safetensors"),
            "--to",
            "safetensors",
        ],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
        check=True,
    )
    assert proc.stderr == "" and "ckptproto -> safetensors" in proc.stdout


def test_dcp_values_needing_full_unpickling_are_refused(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp_api

    dcp_api.save({"w": torch.ones(2), "n": Five()}, checkpoint_id=str(tmp_path / "d"), no_dist=True)
    with pytest.raises(PickleRefusedError, match="'n'"):
        convert(tmp_path / "d", tmp_path / "c", to="ckptproto")
    assert not (tmp_path / "c").exists()
    convert(tmp_path / "d", tmp_path / "c", to="ckptproto", allow_pickle=True)
    assert ckptproto.load(tmp_path / "c")["n"] == 5


class _Touch:
    """Unpickling this runs ``pathlib.Path(target).touch()``: a hostile pickle's payload."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self) -> Any:
        return (Path.touch, (self.target,))


def test_hostile_dcp_metadata_is_not_unpickled_without_the_flag(tmp_path: Path) -> None:
    """A .metadata that runs code when unpickled: the default convert refuses it without
    running it, from the API and the CLI; only the explicit opt-in unpickles it."""
    import pickle

    import torch.distributed.checkpoint as dcp_api

    src = tmp_path / "d"
    dcp_api.save({"w": torch.ones(2)}, checkpoint_id=str(src), no_dist=True)
    marker = tmp_path / "pwned"
    metadata = pickle.loads((src / ".metadata").read_bytes())
    metadata.planner_data = {"w": ("w",), "x": _Touch(marker)}
    (src / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(PickleRefusedError, match="allow_pickle"):
        convert(src, tmp_path / "c", to="ckptproto")
    assert not marker.exists() and not (tmp_path / "c").exists()
    proc = subprocess.run(
        [sys.executable, "-m", "ckptproto", "convert", str(src), str(tmp_path / "c2"), "--to", "ckptproto"],
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert not marker.exists() and not (tmp_path / "c2").exists()
    # A genuine DCP directory still converts without the flag (the restricted reader builds
    # DCP's own metadata), and the opt-in is what lets the hostile one run.
    dcp_api.save({"w": torch.ones(2)}, checkpoint_id=str(tmp_path / "good"), no_dist=True)
    convert(tmp_path / "good", tmp_path / "c3", to="ckptproto")
    assert torch.equal(ckptproto.load(tmp_path / "c3")["w"], torch.ones(2))
    convert(src, tmp_path / "c4", to="ckptproto", allow_pickle=True)
    assert marker.exists()


def _flat_file(path: Path, state_json: str, table: Any) -> Path:
    """A flat safetensors file of one F32[2] tensor whose ckptproto metadata is given raw."""
    import json
    import struct

    meta = {"ckptproto.state": state_json, "ckptproto.tensors": json.dumps(table)}
    header = json.dumps({"__metadata__": meta, "t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})
    raw = header.encode() + b" " * (-(8 + len(header.encode())) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    return path


def test_hostile_flat_safetensors_metadata_is_a_checkpoint_error(tmp_path: Path) -> None:
    """__metadata__ nesting 100k deep, ints past Python's 4,300 digits, strided nested
    tensors, zero-size shapes that overflow: CheckpointErrors naming the cause, no traceback."""
    table = [["t", "float32", [2]]]
    big = "7" * 5000
    exact = _flat_file(tmp_path / "big.safetensors", '{"w":{"$torch":0},"n":' + big + "}", table)
    convert(exact, tmp_path / "big", to="ckptproto")
    assert ckptproto.load(tmp_path / "big")["n"] == int(decimal.Decimal(big))
    hostile = {
        "deep": ('{"w":' + "[" * 100_000 + "]" * 100_000 + "}", table, "nests"),
        "wide_int": ('{"w":' + "9" * 10_001 + "}", table, "10001 characters"),
        "inf": ('{"w":1e400}', table, "overflows"),
        "zero_huge": ('{"w":{"$torch":0}}', [["t", "float32", [0, 2**62, 2**62]]], "2\\*\\*63"),
        "bad_ref": ('{"w":{"$torch":' + "9" * 5000 + "}}", table, "bad tensor reference"),
    }
    for name, (state_json, tab, match) in hostile.items():
        src = _flat_file(tmp_path / f"{name}.safetensors", state_json, tab)
        with pytest.raises(CheckpointFormatError, match=match):
            convert(src, tmp_path / name, to="ckptproto")
        assert not (tmp_path / name).exists()
    for name in ("deep", "wide_int"):  # and the CLI says so without a traceback
        cli = [sys.executable, "-m", "ckptproto", "convert", str(tmp_path / f"{name}.safetensors")]
        proc = subprocess.run(
            [*cli, str(tmp_path / name), "--to", "ckptproto"],
            capture_output=True,
            text=True,
            env=os.environ.copy(),
        )
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.strided)
    for save in (ckptproto.save, lambda s, p: convert_state_to_flat(s, p)):
        with pytest.raises(UnsupportedValueError, match="nested") as info:
            save({"n": nested}, tmp_path / "nested")
        assert info.value.path == "n"


def convert_state_to_flat(state: dict[str, Any], path: Path) -> None:
    from ckptproto.interop import flat_safetensors

    flat_safetensors.write(state, path.with_suffix(".safetensors"))


def test_dcp_refuses_a_tensor_it_would_pickle_inside_a_tuple(tmp_path: Path) -> None:
    ckptproto.save({"pair": (torch.ones(2), 1)}, tmp_path / "c")
    with pytest.raises(UnsupportedValueError, match=r"pair\.0.*tuple"):
        convert(tmp_path / "c", tmp_path / "d", to="dcp")
    assert not (tmp_path / "d").exists() and [p.name for p in tmp_path.iterdir()] == ["c"]


def test_safetensors_header_starting_with_0x80_is_not_taken_for_a_pickle(tmp_path: Path) -> None:
    import safetensors.torch

    for n in range(1, 200):  # vary the header length until its first byte is 0x80
        tensors = {"k" * n: torch.zeros(1)}
        raw = safetensors.torch.save(tensors)
        if raw[0] == 0x80:
            break
    else:
        pytest.skip("no header length with a 0x80 low byte in range")
    (tmp_path / "x.safetensors").write_bytes(raw)
    assert detect_format(tmp_path / "x.safetensors") == "safetensors"


def test_damaged_ckptproto_metadata_in_a_safetensors_file_is_refused(tmp_path: Path) -> None:
    import json
    import struct

    ckptproto.save({"w": torch.ones(2)}, tmp_path / "c")
    convert(tmp_path / "c", tmp_path / "f.safetensors", to="safetensors")
    raw = (tmp_path / "f.safetensors").read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    for bad in ('[["w", "float32", "x"]]', '[["nope", "float32", [2]]]', '[["w", "float99", [2]]]', "{"):
        header["__metadata__"]["ckptproto.tensors"] = bad
        text = json.dumps(header).encode()
        text += b" " * (-(8 + len(text)) % 8)
        (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
        with pytest.raises(CheckpointFormatError):
            convert(tmp_path / "bad.safetensors", tmp_path / "out", to="ckptproto")
        assert not (tmp_path / "out").exists()


def test_a_fifo_source_is_refused_not_waited_on(tmp_path: Path) -> None:
    import threading

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    raised: list[BaseException] = []

    def run() -> None:
        try:
            convert(fifo, tmp_path / "out", to="ckptproto")
        except BaseException as exc:  # handed to the test thread
            raised.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(60)  # a hang guard, not a timing check
    if worker.is_alive():  # blocked in open(): hand it an EOF, then fail
        os.close(os.open(fifo, os.O_WRONLY))
        worker.join()
        pytest.fail("convert blocked on a FIFO")
    assert len(raised) == 1 and isinstance(raised[0], CheckpointFormatError), raised
    assert "FIFO" in str(raised[0])
