"""CkptprotoCheckpointIO with the real lightning package: ModelCheckpoint, resume from "last",
top-k deletion, async saves, explicit handling of non-leaf values, and the conformance suite."""

from __future__ import annotations

import argparse
import pathlib
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from _lightning_adapter import TinyModule, make_trainer
from _roots import committed, exists, names, visible
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.callbacks import ModelCheckpoint

import ckptproto
from ckptproto.conformance import CHECK_NAMES, render_table, run_conformance
from ckptproto.errors import CheckpointNotFoundError, PickleRefusedError, UnsupportedValueError
from ckptproto.integrations.lightning import CkptprotoCheckpointIO, decode_checkpoint, encode_checkpoint
from ckptproto.location import Location


def _fit(
    root: Path, max_epochs: int, seed: int, *, ckpt_path: str | None = None, **plugin: Any
) -> TinyModule:
    L.seed_everything(seed, verbose=False)
    module = TinyModule()
    callback = ModelCheckpoint(dirpath=root, save_last=True, save_top_k=2, monitor="step", mode="max")
    trainer = make_trainer(
        -1, root, max_epochs=max_epochs, callbacks=[callback], plugin=CkptprotoCheckpointIO(**plugin)
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return module


def _checkpoint_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_resume_from_last_matches_an_uninterrupted_run(tmp_path: Path, async_save: bool) -> None:
    straight = _fit(tmp_path / "straight", 3, seed=7, async_save=async_save)
    _fit(tmp_path / "run", 2, seed=7, async_save=async_save)
    assert _checkpoint_dirs(tmp_path / "run") == ["epoch=0-step=4.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"]
    resumed = _fit(tmp_path / "run", 3, seed=99, ckpt_path="last", async_save=async_save)  # other init
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    # top-k kept the two best (highest step) and deleted the oldest; every one is a verified,
    # pickle-free ckptproto checkpoint, and nothing half-written is left behind
    assert _checkpoint_dirs(tmp_path / "run") == ["epoch=1-step=8.ckpt", "epoch=2-step=12.ckpt", "last.ckpt"]
    for name in _checkpoint_dirs(tmp_path / "run"):
        path = tmp_path / "run" / name
        assert (
            ckptproto.verify(path).step == int(name.split("step=")[1].split(".")[0])
            if "step=" in name
            else True
        )
        assert all(f.name == "manifest.json" or f.suffix == ".safetensors" for f in path.iterdir())
    last = ckptproto.read_info(tmp_path / "run" / "last.ckpt")
    assert (last.step, last.epoch) == (12, 2)
    raw = ckptproto.load(tmp_path / "run" / "last.ckpt")
    assert raw["trainer"]["global_step"] == 12 and raw["hyper_parameters"] == {"lr": 0.05, "hidden": 8}


def test_known_non_leaf_values_round_trip_and_are_stored_as_plain_dicts(tmp_path: Path) -> None:
    checkpoint = {
        "global_step": 3,
        "epoch": 1,
        "state_dict": {"w": torch.ones(2)},
        "hyper_parameters": {
            "args": argparse.Namespace(lr=0.1, layers=[1, 2], out=pathlib.Path("/tmp/x")),
            "nested": AttributeDict(a=1, b=AttributeDict(c=torch.float16)),
            "device": torch.device("cpu"),
            "tags": {"a", "b"},
            "frozen": frozenset({3}),
            "scale": np.float32(0.5),
            "pure": pathlib.PurePosixPath("a/b"),
            "looks_marked": {"__ckptproto_type__": "pickle", "value": b"not really"},
        },
    }
    io = CkptprotoCheckpointIO()
    io.save_checkpoint(checkpoint, tmp_path / "c.ckpt")
    stored = ckptproto.load(tmp_path / "c.ckpt")  # plain ckptproto values, no pickle involved
    assert stored["hyper_parameters"]["args"] == {
        "__ckptproto_type__": "argparse.Namespace",
        "value": {
            "lr": 0.1,
            "layers": [1, 2],
            "out": {"__ckptproto_type__": "pathlib.PosixPath", "value": "/tmp/x"},
        },
    }
    loaded = io.load_checkpoint(tmp_path / "c.ckpt")
    hp = loaded["hyper_parameters"]
    assert hp["args"] == checkpoint["hyper_parameters"]["args"]  # type: ignore[index]
    assert type(hp["nested"]) is AttributeDict and type(hp["nested"]["b"]) is AttributeDict
    assert hp["nested"]["b"]["c"] is torch.float16
    assert hp["device"] == torch.device("cpu") and hp["tags"] == {"a", "b"} and hp["frozen"] == frozenset({3})
    assert type(hp["scale"]) is np.float32 and hp["scale"] == np.float32(0.5)
    assert type(hp["pure"]) is pathlib.PurePosixPath
    assert hp["looks_marked"] == {"__ckptproto_type__": "pickle", "value": b"not really"}
    assert "trainer" not in loaded and loaded["global_step"] == 3
    assert torch.equal(loaded["state_dict"]["w"], torch.ones(2))


class Custom:
    def __init__(self, x: int) -> None:
        self.x = x

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom) and other.x == self.x


def test_unknown_types_are_refused_naming_the_path_unless_pickle_is_allowed(tmp_path: Path) -> None:
    checkpoint = {"global_step": 1, "epoch": 0, "hyper_parameters": {"model": {"cls": Custom(3)}}}
    with pytest.raises(UnsupportedValueError, match=r"hyper_parameters\.model\.cls.*Custom") as info:
        CkptprotoCheckpointIO().save_checkpoint(checkpoint, tmp_path / "c.ckpt")
    assert info.value.path == "hyper_parameters.model.cls" and not (tmp_path / "c.ckpt").exists()
    CkptprotoCheckpointIO(unsafe_allow_pickle=True).save_checkpoint(checkpoint, tmp_path / "c.ckpt")
    with pytest.raises(PickleRefusedError, match="unsafe_allow_pickle"):
        CkptprotoCheckpointIO().load_checkpoint(tmp_path / "c.ckpt")
    loaded = CkptprotoCheckpointIO(unsafe_allow_pickle=True).load_checkpoint(tmp_path / "c.ckpt")
    assert loaded["hyper_parameters"]["model"]["cls"] == Custom(3)


def test_encoding_is_lossless_for_plain_lightning_values() -> None:
    checkpoint = {
        "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_k_models": {"/a.ckpt": torch.tensor(1.0)}}}
    }
    assert decode_checkpoint(encode_checkpoint(checkpoint)) == checkpoint


def test_remove_checkpoint_and_storage_options(tmp_path: Path) -> None:
    io = CkptprotoCheckpointIO()
    io.save_checkpoint({"global_step": 1, "epoch": 0, "w": torch.zeros(3)}, tmp_path / "a.ckpt")
    io.remove_checkpoint(tmp_path / "a.ckpt")
    io.remove_checkpoint(tmp_path / "missing.ckpt")  # like Lightning's: removing nothing is fine
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="storage_options"):
        io.save_checkpoint({"w": torch.zeros(1)}, tmp_path / "b.ckpt", storage_options={"x": 1})


def test_lightning_module_through_the_plugin_passes_the_conformance_suite() -> None:
    # The reference adapter (examples/adapters/lightning_trainer.py: what a Lightning user must
    # add to pass). resume_across_processes starts two Python processes that import lightning
    # (~20 s); it passes too (CKPTPROTO_CORPUS=1 tests/test_conformance_corpus.py).
    from examples.adapters.lightning_trainer import LightningAdapter

    class Quick(LightningAdapter):
        check_budget_s = 4.0  # strict_loading probes a sample of its ~270 states

    checks = [name for name in CHECK_NAMES if name != "resume_across_processes"]
    report = run_conformance(Quick(), only=checks)
    assert report.statuses() == dict.fromkeys(checks, "pass"), render_table(report)


def test_existing_lightning_ckpt_converts_and_resumes_through_the_plugin(tmp_path: Path) -> None:
    from ckptproto.interop import convert

    straight = _fit(tmp_path / "straight", 2, seed=3)
    L.seed_everything(3, verbose=False)
    module = TinyModule()
    native = ModelCheckpoint(dirpath=tmp_path / "native", save_last=True)
    trainer = L.Trainer(
        max_epochs=1, enable_progress_bar=False, enable_model_summary=False, logger=False, callbacks=[native]
    )  # Lightning's own torch.save format
    trainer.fit(module)
    result = convert(tmp_path / "native" / "last.ckpt", tmp_path / "converted.ckpt", to="ckptproto")
    assert result.source_format == "torch"
    for source in (tmp_path / "converted.ckpt", tmp_path / "native" / "last.ckpt"):  # or resume as it is
        resumed = _fit(tmp_path / f"resumed-{source.parent.name}", 2, seed=42, ckpt_path=str(source))
        for (name, a), (_, b) in zip(
            straight.state_dict().items(), resumed.state_dict().items(), strict=True
        ):
            assert torch.equal(a, b), f"{source}: {name}"


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
def test_save_resume_and_remove_through_the_plugin_on_every_backend(
    checkpoint_root: Location, tmp_path: Path, async_save: bool
) -> None:
    # Lightning hands the plugin the path as given: a URL reaches it as a str
    L.seed_everything(7, verbose=False)
    straight = TinyModule()
    make_trainer(-1, tmp_path / "straight", max_epochs=2, enable_checkpointing=False).fit(straight)
    L.seed_everything(7, verbose=False)
    plugin = CkptprotoCheckpointIO(async_save=async_save)
    first = make_trainer(-1, tmp_path / "first", max_epochs=1, enable_checkpointing=False, plugin=plugin)
    first.fit(TinyModule())
    url = str(checkpoint_root / "epoch=0.ckpt")
    first.save_checkpoint(url)
    plugin.teardown()  # an async save is committed (or raised) here
    assert names(checkpoint_root) == ["epoch=0.ckpt"] and committed(checkpoint_root / "epoch=0.ckpt")
    assert ckptproto.read_info(url).step == 4
    L.seed_everything(99, verbose=False)
    resumed = TinyModule()  # another init: the checkpoint restores it
    again = make_trainer(-1, tmp_path / "again", max_epochs=2, enable_checkpointing=False)
    again.fit(resumed, ckpt_path=url)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    plugin.remove_checkpoint(url)
    plugin.remove_checkpoint(str(checkpoint_root / "missing.ckpt"))  # removing nothing is fine
    assert not exists(checkpoint_root / "epoch=0.ckpt") and visible(checkpoint_root) == []
    with pytest.raises(CheckpointNotFoundError, match="not found"):
        plugin.load_checkpoint(url)
