"""CheckpointParameters: defaults, validation naming the field, Dream Trainer aliases."""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptproto import CheckpointParameters


def test_defaults_and_seed_fields() -> None:
    p = CheckpointParameters(
        root_dir="/mnt/checkpoints",
        monitor="val_accuracy",
        mode="max",
        keep_top_k=5,
        save_last=True,
        save_every_n_epochs=5,
        save_every_n_steps=1000,
        resume_mode="best",
    )
    assert (p.mode, p.keep_top_k, p.save_every_n_steps, p.resume_mode) == ("max", 5, 1000, "best")
    assert CheckpointParameters().resume_mode == "latest"
    assert CheckpointParameters(resume_mode=None).resume_mode is None


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"mode": "maximum"}, "mode"),
        ({"resume_mode": "newest"}, "resume_mode"),
        ({"keep_top_k": -2}, "keep_top_k"),
        ({"keep_top_k": 1.5}, "keep_top_k"),
        ({"keep_top_k": True}, "keep_top_k"),
        ({"save_every_n_steps": 0}, "save_every_n_steps"),
        ({"save_every_n_steps": -5}, "save_every_n_steps"),
        ({"save_every_n_epochs": 0}, "save_every_n_epochs"),
        ({"keep_top_k": 0, "save_last": False}, "keep_top_k"),
        ({"root_dir": ""}, "root_dir"),
        ({"monitor": ""}, "monitor"),
        ({"save_last": "yes"}, "save_last"),
    ],
)
def test_invalid_values_name_the_field(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CheckpointParameters(**kwargs)  # type: ignore[arg-type]


def test_keep_all_and_keep_none_but_last() -> None:
    assert CheckpointParameters(keep_top_k=-1).keep_top_k == -1
    assert CheckpointParameters(keep_top_k=0, save_last=True).keep_top_k == 0


def test_resume_path_forms(tmp_path: Path) -> None:
    assert CheckpointParameters(resume_mode=tmp_path / "ckpt").resume_path == tmp_path / "ckpt"
    assert CheckpointParameters(resume_mode="runs/checkpoint_step_10").resume_path == Path(
        "runs/checkpoint_step_10"
    )
    assert CheckpointParameters(resume_mode="latest").resume_path is None


def test_dream_trainer_aliases() -> None:
    p = CheckpointParameters(checkpoint_every_n_steps=50, resume_mode="last")
    assert (p.save_every_n_steps, p.resume_mode) == (50, "latest")
    p = CheckpointParameters(monitor="acc", resume_mode="max")
    assert (p.resume_mode, p.mode) == ("best", "max")
    assert CheckpointParameters(checkpoint_every_n_epochs=2).save_every_n_epochs == 2
    with pytest.raises(ValueError, match="checkpoint_every_n_steps"):
        CheckpointParameters(save_every_n_steps=5, checkpoint_every_n_steps=5)
    with pytest.raises(ValueError, match="save_every_n_steps"):
        CheckpointParameters(checkpoint_every_n_steps=0)


@pytest.mark.parametrize("root", ["gs://b/run", "file:///tmp/run", "hf://x"])
def test_a_url_no_backend_serves_is_refused(root: str) -> None:
    # main wrote these to a local folder named "s3:"; now refused when the parameters are made
    with pytest.raises(ValueError, match=rf"root_dir={root!r}: {root}: "):
        CheckpointParameters(root_dir=root)


def test_a_url_with_dot_parts_is_refused() -> None:
    with pytest.raises(ValueError, match=r"root_dir='s3://b/a/\.\./c'"):
        CheckpointParameters(root_dir="s3://b/a/../c")


def test_an_s3_root_dir_and_resume_url(s3_available: None) -> None:
    from ckptproto.location import ObjectLocation

    p = CheckpointParameters(root_dir="s3://bucket/run", resume_mode="s3://bucket/run/checkpoint_step_3")
    assert p.root == ObjectLocation("s3", "bucket", "run")
    assert p.resume_path == ObjectLocation("s3", "bucket", "run/checkpoint_step_3")


@pytest.mark.parametrize(("resume_mode", "mode"), [("min", "max"), ("max", "min")])
def test_resume_mode_min_max_contradicting_mode_raises(resume_mode: str, mode: str) -> None:
    with pytest.raises(ValueError, match=rf"resume_mode='{resume_mode}'.*contradicts mode='{mode}'"):
        CheckpointParameters(resume_mode=resume_mode, mode=mode)  # type: ignore[arg-type]


def test_resume_mode_min_max_agreeing_with_mode() -> None:
    assert CheckpointParameters(resume_mode="max").mode == "max"  # mode left at its default
    assert CheckpointParameters(resume_mode="max", mode="max").mode == "max"
    assert CheckpointParameters(resume_mode="min", mode="min").resume_mode == "best"
