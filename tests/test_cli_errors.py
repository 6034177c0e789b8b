"""Every user mistake on the command line: one line naming it (with what was probably meant),
a non-zero exit status, never a traceback. Each runs the real command in a subprocess."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

import ckptproto
from ckptproto.policy.rng import RNGState

REPO = Path(__file__).resolve().parents[1]


def cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "ckptproto", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
    )
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    return result


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """``tmp/checkpoints`` with checkpoint_step_10 and checkpoint_step_20 (the newest)."""
    model = torch.nn.Linear(3, 2)
    for step in (10, 20):
        ckptproto.save(
            {"trainer": {"global_step": step, "current_epoch": 0}, "models": {"model": model}},
            tmp_path / "checkpoints" / f"checkpoint_step_{step}",
        )
    return tmp_path / "checkpoints"


def test_ls_on_a_file_names_the_checkpoint_it_belongs_to(root: Path) -> None:
    result = cli("ls", root / "checkpoint_step_10" / "manifest.json")
    assert result.returncode == 2 and result.stdout == ""
    line = one_line(result)
    assert "is a file inside the checkpoint" in line
    assert f"`ckptproto inspect {root / 'checkpoint_step_10'}`" in line
    assert f"`ckptproto ls {root}`" in line


def test_ls_on_a_typo_fails_and_suggests_the_close_name(root: Path) -> None:
    result = cli("ls", root.parent / "checkpoint")
    assert result.returncode == 2
    assert (
        one_line(result) == f"ckptproto ls: {root.parent / 'checkpoint'} does not exist; did you mean {root}?"
    )
    far = cli("ls", root.parent / "zzz")
    assert far.returncode == 2 and one_line(far).endswith("zzz does not exist")


def test_ls_on_a_checkpoint_suggests_inspect_or_its_parent(root: Path) -> None:
    result = cli("ls", "checkpoint_step_20", cwd=root)
    assert result.returncode == 2
    line = one_line(result)
    assert "checkpoint_step_20 is a checkpoint, not a directory of checkpoints" in line
    assert "`ckptproto inspect checkpoint_step_20`" in line and "`ckptproto ls .`" in line


def test_verify_on_a_root_directory_names_its_newest_checkpoint(root: Path) -> None:
    result = cli("verify", root)
    assert result.returncode == 2 and "DAMAGED" not in result.stdout
    line = one_line(result)
    assert f"{root} is a directory of 2 checkpoint(s), not a checkpoint" in line
    assert f"`ckptproto verify {root / 'checkpoint_step_20'}` (the newest)" in line


def test_verify_on_a_plain_safetensors_file_says_how_to_convert_it(tmp_path: Path) -> None:
    safetensors.torch.save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    result = cli("verify", tmp_path / "model.safetensors")
    assert result.returncode == 2 and "DAMAGED" not in result.stdout
    line = one_line(result)
    assert "is a plain safetensors file, not a ckptproto checkpoint" in line
    assert f"`ckptproto convert {tmp_path / 'model.safetensors'} {tmp_path / 'model'} --to ckptproto`" in line


def test_verify_on_a_data_file_names_its_checkpoint(root: Path) -> None:
    (data,) = (root / "checkpoint_step_10").glob("*.safetensors")
    result = cli("verify", data)
    assert result.returncode == 2
    assert one_line(result).endswith(f"did you mean `ckptproto verify {root / 'checkpoint_step_10'}`?")


def test_verify_reports_each_path_good_damaged_or_not_a_checkpoint(root: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    good = root / "checkpoint_step_20"
    damaged = root / "checkpoint_step_10"
    (damaged / "manifest.json").unlink()  # data files, no manifest: a damaged checkpoint
    result = cli("verify", good, damaged, tmp_path / "empty")
    assert result.returncode == 2  # a path that is not a checkpoint is a usage error
    assert f"OK      {good}" in result.stdout and f"DAMAGED {damaged}" in result.stdout
    assert "empty is a directory without manifest.json" in one_line(result)
    assert cli("verify", good, damaged).returncode == 1


def test_verify_on_a_fifo_or_a_leftover_does_not_read_it(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe")  # opening it for reading would block
    result = cli("verify", tmp_path / "pipe")
    assert result.returncode == 2 and "is not a regular file" in one_line(result)
    (tmp_path / ".checkpoint_step_5.ckptproto-tmp-abc").mkdir()
    result = cli("inspect", tmp_path / ".checkpoint_step_5.ckptproto-tmp-abc")
    assert result.returncode == 2 and "temporary directory of an unfinished or interrupted save" in one_line(
        result
    )


def test_inspect_on_a_root_or_a_torch_save_file(root: Path, tmp_path: Path) -> None:
    result = cli("inspect", root)
    assert result.returncode == 2
    assert f"`ckptproto inspect {root / 'checkpoint_step_20'}` (the newest)" in one_line(result)
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    result = cli("inspect", tmp_path / "model.pt")
    assert result.returncode == 2
    assert "is a torch.save file, not a ckptproto checkpoint" in one_line(result)


def test_a_dcp_directory_is_named_as_such(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp_api

    with pytest.warns(UserWarning):
        dcp_api.save({"w": torch.ones(2)}, checkpoint_id=tmp_path / "dcp")
    result = cli("verify", tmp_path / "dcp")
    assert result.returncode == 2
    assert "is a torch.distributed.checkpoint (DCP) directory" in one_line(result)


def test_convert_from_a_typo_or_into_an_impossible_destination_is_one_line(
    root: Path, tmp_path: Path
) -> None:
    result = cli("convert", root / "checkpoint_step_2", tmp_path / "out.pt", "--to", "torch")
    assert result.returncode == 2
    assert one_line(result).endswith(f"does not exist; did you mean {root / 'checkpoint_step_20'}?")
    (tmp_path / "afile").write_text("x")
    result = cli("convert", root / "checkpoint_step_10", tmp_path / "afile" / "out.pt", "--to", "torch")
    assert result.returncode == 2
    assert "afile" in one_line(result)


def test_unsafe_allow_pickle_stores_what_torch_save_files_commonly_hold(tmp_path: Path) -> None:
    args = argparse.Namespace(lr=0.1, name="run", dims=torch.Size([2, 3]), out=Path("/tmp/out"))
    torch.save({"w": torch.ones(2), "args": args, "best": np.float64(0.5)}, tmp_path / "trusted.pt")
    result = cli(
        "convert", tmp_path / "trusted.pt", tmp_path / "c", "--to", "ckptproto", "--unsafe-allow-pickle"
    )
    assert result.returncode == 0, result.stderr
    assert "args: argparse.Namespace stored as a dict of its attributes" in result.stderr
    assert "args.dims: torch.Size stored as a tuple of ints" in result.stderr
    state = ckptproto.load(tmp_path / "c")
    assert state["args"] == {"lr": 0.1, "name": "run", "dims": (2, 3), "out": "/tmp/out"}
    assert state["best"].dtype == np.float64 and state["best"] == 0.5


def test_unsafe_allow_pickle_of_user_classes_says_what_to_do(tmp_path: Path) -> None:
    """A file holding an object of the user's own class: where the class is not importable,
    the command says to run where it is; where it is, that the object has no plain form,
    and the lines of Python that convert it by hand."""
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "usercfg.py").write_text(
        "class Config:\n    def __init__(self):\n        self.lr = 0.1\n"
    )
    sys.path.insert(0, str(tmp_path / "code"))
    try:
        import usercfg  # type: ignore[import-not-found]

        torch.save({"w": torch.ones(2), "extra": {"cfg": usercfg.Config()}}, tmp_path / "cfg.pt")
    finally:
        sys.path.remove(str(tmp_path / "code"))
        sys.modules.pop("usercfg", None)
    argv = ("convert", tmp_path / "cfg.pt", tmp_path / "c", "--to", "ckptproto", "--unsafe-allow-pickle")
    result = cli(*argv, cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and lines[0].endswith("the source will be fully unpickled")
    assert "No module named 'usercfg'" in lines[1] and "run from where the training code" in lines[1]
    result = cli(*argv, cwd=tmp_path / "code")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "extra.cfg" in lines[1] and "usercfg.Config" in lines[1]
    assert "torch.load(" in lines[1] and "weights_only=False" in lines[1]
    assert "state['extra']['cfg']" in lines[1] and "ckptproto.save(" in lines[1]
    assert not (tmp_path / "c").exists()


def test_an_unexpected_error_is_one_line_and_its_traceback_is_on_request(root: Path) -> None:
    """A bug (injected here: verify raising ZeroDivisionError) is reported, not hidden."""
    inject = (
        "import sys, ckptproto.cli.verify as v; v.verify = lambda path: 1 / 0; "
        "from ckptproto.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    argv = [sys.executable, "-c", inject, "verify", str(root / "checkpoint_step_10")]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert one_line(result).startswith("ckptproto verify: unexpected ZeroDivisionError: division by zero")
    shown = subprocess.run(
        argv, capture_output=True, text=True, timeout=120, env={**os.environ, "CKPTPROTO_TRACEBACK": "1"}
    )
    assert shown.returncode == 1 and "Traceback" in shown.stderr and "ZeroDivisionError" in shown.stderr


def test_to_torch_with_rng_state_loads_with_torch_defaults(tmp_path: Path) -> None:
    np.random.seed(3)
    rng = RNGState()
    ckptproto.save({"trainer": {"global_step": 1, "rng": rng}}, tmp_path / "c")
    expected = np.random.random(4)
    result = cli("convert", tmp_path / "c", tmp_path / "out.pt", "--to", "torch")
    assert result.returncode == 0, result.stderr
    assert "trainer.rng.numpy.keys: numpy uint32[624] written as a torch tensor" in result.stderr
    state = torch.load(tmp_path / "out.pt")  # torch's defaults: weights_only=True
    np.random.seed(99)
    rng.load_state_dict(state["trainer"]["rng"])  # the tensor restores numpy's generator
    assert np.array_equal(np.random.random(4), expected)
    kept = cli("convert", tmp_path / "c", tmp_path / "np.pt", "--to", "torch", "--keep-numpy")
    assert kept.returncode == 0 and "torch.serialization.safe_globals(" in kept.stderr
    with pytest.raises(Exception, match="numpy"):
        torch.load(tmp_path / "np.pt")


def test_version_matches_the_package_metadata() -> None:
    result = cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"ckptproto {ckptproto.__version__}"
    # the package's metadata takes its version from there, not from a second copy
    assert re.search(r'^dynamic = \["version"\]', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert 'version = { attr = "ckptproto.__version__" }' in (REPO / "pyproject.toml").read_text()


def test_a_url_no_backend_serves_is_one_line_and_creates_nothing(tmp_path: Path) -> None:
    # before the storage seam, these were taken for local paths (a folder named "gs:")
    url = "gs://bucket/run/checkpoint_step_10"
    for args in (
        ("ls", "gs://bucket/run"),
        ("verify", url),
        ("inspect", url),
        ("validate", url),
        ("convert", url, "out.pt", "--to", "torch"),
        ("convert", "nothing.pt", url, "--to", "ckptproto"),
    ):
        result = cli(*args, cwd=tmp_path)
        assert result.returncode == 2, args
        assert "gs://bucket/run" in one_line(result) and "no storage backend for gs://" in one_line(result)
    assert list(tmp_path.iterdir()) == []
