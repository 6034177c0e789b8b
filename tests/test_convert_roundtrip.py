"""Every conversion round-trips exactly on a real model + optimizer + scheduler state."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.distributed.checkpoint as dcp_api
from _interop_helpers import assert_same, rich_state, trained_state

import ckptproto
from ckptproto.cli import main
from ckptproto.errors import CheckpointError, CheckpointExistsError, CheckpointNotFoundError
from ckptproto.interop import convert, detect_format
from ckptproto.location import Location, ObjectLocation

TARGETS = [("torch", "out.pt"), ("safetensors", "out.safetensors"), ("dcp", "out_dcp")]


@pytest.mark.parametrize(("fmt", "name"), TARGETS)
def test_ckptproto_to_format_and_back_is_exact(tmp_path: Path, fmt: str, name: str) -> None:
    state = rich_state()
    ckptproto.save(state, tmp_path / "src")
    # keep_numpy: --to torch otherwise writes numpy arrays as tensors (see the test below)
    result = convert(tmp_path / "src", tmp_path / name, to=fmt, keep_numpy=True)  # type: ignore[arg-type]
    assert result.source_format == "ckptproto" and result.target_format == fmt
    assert detect_format(tmp_path / name) == fmt
    back = convert(tmp_path / name, tmp_path / "back", to="ckptproto")
    assert back.source_format == fmt and back.tensors == result.tensors
    ckptproto.verify(tmp_path / "back")
    loaded = ckptproto.load(tmp_path / "back")
    assert_same(state, loaded)
    # tied tensors stay tied
    assert loaded["extra"]["tied_a"] is loaded["extra"]["tied_b"]


@pytest.mark.parametrize(("fmt", "name"), TARGETS)
def test_converted_state_restores_a_real_model_optimizer_scheduler(
    tmp_path: Path, fmt: str, name: str
) -> None:
    state = trained_state()
    ckptproto.save(state, tmp_path / "src")
    convert(tmp_path / "src", tmp_path / name, to=fmt)  # type: ignore[arg-type]
    convert(tmp_path / name, tmp_path / "back", to="ckptproto")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5)
    trainer: dict[str, int] = {"global_step": 0, "current_epoch": 0}
    target = {
        "models": {"model": model},
        "optimizers": {"optimizer": opt},
        "schedulers": {"scheduler": sched},
    }
    ckptproto.load_into(tmp_path / "back", {**target, "trainer": trainer})
    assert trainer == {"global_step": 3, "current_epoch": 0}
    assert_same(state["models"]["model"], model.state_dict())
    assert_same(state["optimizers"]["optimizer"], opt.state_dict())
    assert_same(state["schedulers"]["scheduler"], sched.state_dict())


def test_plain_torch_save_file_round_trips(tmp_path: Path) -> None:
    """A file a torch.save user already has: to ckptproto and back to torch.save, exactly."""
    state = rich_state()
    torch.save(state, tmp_path / "user.pt")
    convert(tmp_path / "user.pt", tmp_path / "c", to="ckptproto")
    assert_same(state, ckptproto.load(tmp_path / "c"))
    convert(tmp_path / "c", tmp_path / "again.pt", to="torch", keep_numpy=True)
    assert_same(state, torch.load(tmp_path / "again.pt", weights_only=False))


def test_legacy_non_zip_torch_save_is_read(tmp_path: Path) -> None:
    state = trained_state()
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    convert(tmp_path / "legacy.pt", tmp_path / "c", to="ckptproto")
    assert_same(state, ckptproto.load(tmp_path / "c"))


def test_hub_safetensors_file_loads_into_a_model(tmp_path: Path) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    safetensors.torch.save_file(model.state_dict(), tmp_path / "model.safetensors")
    convert(tmp_path / "model.safetensors", tmp_path / "c", to="ckptproto")
    fresh = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    ckptproto.load_into(tmp_path / "c", fresh)
    assert_same(dict(model.state_dict()), dict(fresh.state_dict()))


def test_our_flat_safetensors_is_a_plain_file_for_the_safetensors_package(tmp_path: Path) -> None:
    state = trained_state()
    ckptproto.save(state, tmp_path / "c")
    convert(tmp_path / "c", tmp_path / "flat.safetensors", to="safetensors")
    flat = safetensors.torch.load_file(tmp_path / "flat.safetensors")
    for key, value in state["models"]["model"].items():
        assert torch.equal(flat[f"models.model.{key}"], value)
    assert torch.equal(
        flat["optimizers.optimizer.state.0.exp_avg"], state["optimizers"]["optimizer"]["state"][0]["exp_avg"]
    )


def test_native_dcp_checkpoint_converts_like_dcp_loads_it(tmp_path: Path) -> None:
    """A directory written by dcp.save itself (string-keyed optimizer state, as DCP users have)."""
    state = trained_state()
    opt_state = state["optimizers"]["optimizer"]
    native = {
        "model": dict(state["models"]["model"]),
        "optim": {
            "state": {f"p{k}": v for k, v in opt_state["state"].items()},
            "param_groups": opt_state["param_groups"],
        },
        "step": 3,
    }
    dcp_api.save(native, checkpoint_id=str(tmp_path / "native"), no_dist=True)
    convert(tmp_path / "native", tmp_path / "c", to="ckptproto")
    loaded = ckptproto.load(tmp_path / "c")
    assert_same(native, loaded)


def test_dcp_written_by_us_loads_with_dcp_and_a_template(tmp_path: Path) -> None:
    state = trained_state()
    ckptproto.save(state, tmp_path / "c")
    convert(tmp_path / "c", tmp_path / "d", to="dcp")
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    template = {"models": {"model": model.state_dict()}, "trainer": {"global_step": 0, "current_epoch": 0}}
    dcp_api.load(template, checkpoint_id=str(tmp_path / "d"), no_dist=True)
    assert_same(dict(state["models"]["model"]), dict(model.state_dict()))
    assert template["trainer"]["global_step"] == 3


def test_a_ckptproto_checkpoint_converts_on_every_backend(
    checkpoint_root: Location, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = rich_state()
    torch.save(state, tmp_path / "model.pt")
    src, back = checkpoint_root / "model", checkpoint_root / "back"
    # local torch.save file -> a ckptproto checkpoint at the root (a URL on s3), by the CLI
    assert (
        main(["convert", str(tmp_path / "model.pt"), str(src), "--to", "ckptproto", "--unsafe-allow-pickle"])
        == 0
    )
    assert f"torch -> ckptproto: {src}" in capsys.readouterr().out
    assert detect_format(src) == "ckptproto"
    # that checkpoint -> a local safetensors file -> a ckptproto checkpoint at the root again
    result = convert(src, tmp_path / "flat.safetensors", to="safetensors")
    assert result.source_format == "ckptproto" and result.destination == tmp_path / "flat.safetensors"
    again = convert(tmp_path / "flat.safetensors", back, to="ckptproto")
    assert again.destination == back and again.tensors == result.tensors
    assert_same(state, ckptproto.load(str(back)))
    with pytest.raises(CheckpointExistsError):
        convert(tmp_path / "flat.safetensors", back, to="ckptproto")
    # a typo in the source: one line naming the close name
    assert main(["convert", str(checkpoint_root / "mode"), str(tmp_path / "x.pt"), "--to", "torch"]) == 2
    assert f"does not exist; did you mean {src}?" in capsys.readouterr().err


def test_foreign_formats_at_an_s3_url_are_refused_by_name(s3_root: ObjectLocation, tmp_path: Path) -> None:
    ckptproto.save({"w": torch.ones(2)}, str(s3_root / "c"))
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    for to, name in [("torch", "o.pt"), ("safetensors", "o.safetensors"), ("dcp", "o_dcp")]:
        with pytest.raises(
            CheckpointError, match=rf"{s3_root / name}: writing a {to} checkpoint needs a local path"
        ):
            convert(s3_root / "c", s3_root / name, to=to)  # type: ignore[arg-type]
    with pytest.raises(
        CheckpointError, match=rf"{s3_root / 'c'}: a torch checkpoint is converted from a local file"
    ):
        convert(s3_root / "c", tmp_path / "c2", to="ckptproto", source_format="torch")
    with pytest.raises(CheckpointNotFoundError, match=rf"{s3_root / 'missing'} does not exist"):
        convert(s3_root / "missing", tmp_path / "c3", to="ckptproto")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # nothing written, no "s3:" folder
    assert not Path("s3:").exists()
