"""``ckptproto ls`` and ``ckptproto inspect`` on real checkpoints (and a damaged one)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ckptproto
from ckptproto.cli import main
from ckptproto.format import layout
from ckptproto.location import Location


def _make(root: Location) -> None:
    model = torch.nn.Linear(3, 2)
    for step, metric in [(10, 0.5), (20, 0.2), (30, 0.4)]:
        ckptproto.save(
            {"trainer": {"global_step": step, "current_epoch": step // 10}, "models": {"model": model}},
            str(root / f"checkpoint_step_{step}"),
            metadata={"metrics": {"val_loss": metric}, "monitor": "val_loss", "mode": "min"},
        )


def test_ls_lists_step_epoch_metric_size_and_marks(checkpoint_root: Location, capsys: Any) -> None:
    _make(checkpoint_root)
    assert main(["ls", str(checkpoint_root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "STEP", "EPOCH", "METRIC", "SIZE"]
    rows = {line.split()[0]: line.split() for line in lines[1:4]}
    assert rows["checkpoint_step_30"][1:4] == ["30", "3", "val_loss=0.4"]
    assert rows["checkpoint_step_30"][-1] == "last"
    assert rows["checkpoint_step_20"][-1] == "best"
    assert rows["checkpoint_step_10"][-1] == "B"  # size unit, no mark
    assert lines[1].startswith("checkpoint_step_30")  # newest first
    assert "3 checkpoint(s)" in lines[4]


def test_ls_reports_unreadable_and_ranks_by_chosen_metric(tmp_path: Path, capsys: Any) -> None:
    _make(tmp_path)
    manifest = tmp_path / "checkpoint_step_30" / layout.MANIFEST_NAME
    manifest.write_bytes(b"{not json")
    (tmp_path / ".checkpoint_step_40.ckptproto-tmp-abc").mkdir()  # leftover: not listed
    assert main(["ls", str(tmp_path), "--mode", "max"]) == 1
    out = capsys.readouterr().out
    assert "skipped:" in out and "checkpoint_step_30" in out.split("skipped:")[1]
    assert ".checkpoint_step_40" not in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith("checkpoint_step_")}
    assert rows["checkpoint_step_10"][-1] == "best"  # 0.5 is best when larger is better
    assert rows["checkpoint_step_20"][-1] == "last"


def test_ls_empty_directory(tmp_path: Path, capsys: Any) -> None:
    assert main(["ls", str(tmp_path)]) == 0
    assert "0 checkpoint(s)" in capsys.readouterr().out  # a missing one: tests/test_cli_errors.py


def test_inspect_shows_tree_dtypes_shapes_sizes_and_metadata(checkpoint_root: Location, capsys: Any) -> None:
    state = {
        "trainer": {"global_step": 7, "current_epoch": 1, "note": "x" * 200},
        "models": {
            "model": {"w": torch.zeros(4, 8, dtype=torch.bfloat16), "b": np.arange(3, dtype=np.int64)}
        },
        "extra": [torch.ones(2), 3, (1, 2)],
    }
    ckptproto.save(state, str(checkpoint_root / "ck"), metadata={"metrics": {"loss": 0.25}})
    assert main(["inspect", str(checkpoint_root / "ck")]) == 0
    out = capsys.readouterr().out
    assert "w: torch bfloat16[4, 8] 64 B" in out
    assert "b: numpy int64[3] 24 B" in out
    assert "0: torch float32[2] 8 B" in out
    assert "global_step: 7" in out
    assert '"loss": 0.25' in out and '"step": 7' in out
    assert "..." in out  # long values are shortened
    assert main(["inspect", str(checkpoint_root / "ck"), "--depth", "1"]) == 0
    assert "models: (1 entries)" in capsys.readouterr().out


def test_verify_and_what_is_not_a_checkpoint_on_every_backend(checkpoint_root: Location, capsys: Any) -> None:
    _make(checkpoint_root)
    newest = checkpoint_root / "checkpoint_step_30"
    assert main(["verify", str(newest), str(checkpoint_root / "checkpoint_step_10")]) == 0
    assert f"OK      {newest}" in capsys.readouterr().out
    # a root where a checkpoint was expected, and a typo: one line each, with what was meant
    assert main(["verify", str(checkpoint_root)]) == 2
    err = capsys.readouterr().err
    assert f"{checkpoint_root} is a directory of 3 checkpoint(s), not a checkpoint" in err
    assert f"`ckptproto verify {newest}` (the newest)" in err
    assert main(["inspect", str(checkpoint_root / "checkpoint_step_3")]) == 2
    err = capsys.readouterr().err
    assert f"does not exist; did you mean {checkpoint_root / 'checkpoint_step_30'}?" in err
    # a checkpoint where a directory of them was expected, and a file inside one
    assert main(["ls", str(newest)]) == 2
    assert f"did you mean `ckptproto inspect {newest}` or `ckptproto ls {checkpoint_root}`?" in (
        capsys.readouterr().err
    )
    assert main(["ls", str(newest / layout.MANIFEST_NAME)]) == 2
    assert f"is a file inside the checkpoint {newest}" in capsys.readouterr().err
    assert main(["ls", str(checkpoint_root / "nothing")]) == 2
    assert "nothing does not exist" in capsys.readouterr().err


def test_inspect_missing_checkpoint_exits_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ckptproto", "inspect", str(tmp_path / "none")], capture_output=True, text=True
    )
    assert result.returncode == 2 and "none does not exist" in result.stderr


def test_inspect_into_a_closed_pipe_is_not_an_error(tmp_path: Path) -> None:
    """`ckptproto inspect PATH | head`: the reader goes away mid-output (the output is far
    larger than a pipe buffer, so the writer really hits EPIPE)."""
    import subprocess
    import sys

    import numpy as np

    ckptproto.save({f"layer{i}": np.zeros(3, np.float32) for i in range(4000)}, tmp_path / "big")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptproto", "inspect", str(tmp_path / "big")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err
