"""CheckpointParameters with Dream Trainer 0.3.0's field names: the same meaning is accepted,
a different meaning (what is saved, kept or deleted) is refused, saying what to write."""

from __future__ import annotations

from typing import Any

import pytest

from ckptproto import CheckpointParameters


def test_same_meaning_is_accepted() -> None:
    p = CheckpointParameters(
        root_dir="./checkpoints",
        monitor="val/loss",
        resume_mode="min",
        checkpoint_every_n_train_epochs=2,
        keep_top_k=5,
        strict_load=False,
        enable=True,
        resume_data=True,
        async_mode="disabled",
        storage_options=None,
        model_weights_only=True,
    )
    assert (p.save_every_n_epochs, p.resume_mode, p.mode, p.keep_top_k, p.strict_load) == (
        2,
        "best",
        "min",
        5,
        False,
    )
    assert CheckpointParameters(resume_mode="last", keep_top_k=-1).keep_top_k == -1


@pytest.mark.parametrize(
    "kwargs",
    [
        {"keep_top_k": 0, "resume_mode": "last"},
        {"keep_top_k": 0, "resume_mode": "max", "monitor": "acc"},
        {"keep_top_k": 0, "checkpoint_every_n_train_epochs": 1},
        {"keep_top_k": 0, "enable": True},
    ],
)
def test_keep_top_k_0_next_to_dream_trainer_fields_is_refused(kwargs: dict[str, Any]) -> None:
    """Dream Trainer's keep_top_k=0 keeps every checkpoint; ours would delete all but the last."""
    with pytest.raises(ValueError, match=r"keep_top_k=0.*keeps every checkpoint.*keep_top_k=-1"):
        CheckpointParameters(**kwargs)


def test_keep_top_k_0_alone_keeps_its_ckptproto_meaning() -> None:
    assert CheckpointParameters(keep_top_k=0, resume_mode="latest").keep_top_k == 0


@pytest.mark.parametrize(
    ("kwargs", "says"),
    [
        ({"checkpoint_every_n_val_epochs": 1}, "checkpoint_every_n_val_epochs=1 saves after every N-th"),
        ({"enable": False}, "enable=False has no equivalent"),
        ({"resume_data": False}, "resume_data=False has no equivalent"),
        ({"async_mode": "async"}, "async_mode='async': pick the class"),
        ({"storage_options": {"key": "x"}}, "storage_options=.*pass an s3:// URL as root_dir"),
        ({"resume_mode": 1200}, "resume_mode=1200: Dream Trainer's step-number resume"),
        (
            {"checkpoint_every_n_train_epochs": 1, "checkpoint_every_n_epochs": 1},
            "checkpoint_every_n_train_epochs or checkpoint_every_n_epochs",
        ),
        (
            {"checkpoint_every_n_train_epochs": 1, "save_every_n_epochs": 1},
            "save_every_n_epochs or checkpoint_every_n_epochs",
        ),
    ],
)
def test_different_meaning_is_refused_naming_the_field(kwargs: dict[str, Any], says: str) -> None:
    with pytest.raises(ValueError, match=says):
        CheckpointParameters(**kwargs)
