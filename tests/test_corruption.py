"""Damaged checkpoints are never trusted: random bit flips, truncations, zeroed ranges and
overwritten bytes in data files (tensor bytes and header) and in the manifest are all detected
by ``verify`` and by ``load``/``load_into``, which name the damaged file.

CI runs several hundred trials; ``CKPTPROTO_STRESS=1`` ten times more.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _reliability import STRESS, report

import ckptproto
from ckptproto.format import layout
from ckptproto.format.manifest import CHECKSUM_KEY

TRIALS = 6000 if STRESS else 600


def make_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "models": {
            "model": {
                "w": torch.randn(32, 16, generator=g),
                "b": torch.randn(16, generator=g).to(torch.bfloat16),
                "idx": torch.arange(40, dtype=torch.int64),
            }
        },
        "optimizers": {"optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "lr": 0.01}},
        "extra": {"table": np.linspace(0, 1, 50, dtype=np.float64), "flag": True},
        "trainer": {"global_step": 1234, "current_epoch": 5},
    }


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pristine")
    ckptproto.save(make_state(), root / "ckpt", metadata={"metrics": {"val_loss": 0.125}})
    return root / "ckpt"


def regions(ckpt: Path) -> dict[str, tuple[Path, int, int]]:
    """Byte ranges [begin, end) by kind: a data file's header, its tensor bytes, the manifest."""
    data = next(ckpt.glob("*.safetensors"))
    raw = data.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    manifest = ckpt / layout.MANIFEST_NAME
    return {
        "header": (data, 0, 8 + n),
        "tensor bytes": (data, 8 + n, len(raw)),
        "manifest": (manifest, 0, manifest.stat().st_size),
    }


def damage(path: Path, begin: int, end: int, op: str, rng: random.Random) -> str:
    raw = bytearray(path.read_bytes())
    at = rng.randrange(begin, end)
    if op == "flip":
        raw[at] ^= 1 << rng.randrange(8)
    elif op == "byte":
        raw[at] = (raw[at] + rng.randrange(1, 256)) % 256
    elif op == "zero":
        span = rng.randint(1, 64)
        stop = min(end, at + span)
        while not any(raw[at:stop]):  # zeroing zeros changes nothing: pick another range
            at = rng.randrange(begin, end)
            stop = min(end, at + span)
        raw[at:stop] = bytes(stop - at)
    elif op == "truncate":
        del raw[at:]
    else:
        raise AssertionError(op)
    path.write_bytes(bytes(raw))
    return f"{op}@{at}"


def expect_detected(call: Callable[[], Any], damaged: Path, what: str) -> ckptproto.CheckpointFormatError:
    try:
        call()
    except ckptproto.CheckpointFormatError as exc:
        assert str(damaged) in str(exc), f"{what}: error does not name {damaged}: {exc}"
        return exc
    raise AssertionError(f"{what}: damage went undetected")


def test_random_damage_is_always_detected(pristine: Path, tmp_path: Path) -> None:
    rng = random.Random(7)
    stats: Counter[str] = Counter()
    target = tmp_path / "ckpt"
    start = time.monotonic()
    ops = ["flip", "byte", "zero", "truncate"]
    for i in range(TRIALS):
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(pristine, target)
        region = ("header", "tensor bytes", "manifest")[i % 3]
        op = ops[(i // 3) % len(ops)]
        path, begin, end = regions(target)[region]
        how = damage(path, begin, end, op, rng)
        what = f"trial {i}: {region} {how} of {path.name}"

        # verify reports it (a damaged data file: CheckpointCorruptError with a problem
        # naming the file; a manifest that no longer parses: CheckpointFormatError naming it)
        exc = expect_detected(lambda: ckptproto.verify(target), path, what)
        if region != "manifest" or isinstance(exc, ckptproto.CheckpointCorruptError):
            assert isinstance(exc, ckptproto.CheckpointCorruptError), what
            assert any(str(path) in p for p in exc.problems), (what, exc.problems)
        stats[f"verify detected: {region}"] += 1

        # load and load_into refuse it too, naming the file
        expect_detected(lambda: ckptproto.load(target), path, what)
        target_state = make_state()
        for t in target_state["models"]["model"].values():
            t.zero_()
        expect_detected(lambda s=target_state: ckptproto.load_into(target, s), path, what)
        stats[f"load detected: {region}"] += 1
        stats[f"op {op}"] += 1
    stats["trials"] = TRIALS
    report("corruption", {"seconds": round(time.monotonic() - start, 1), **dict(sorted(stats.items()))})
    for region in ("header", "tensor bytes", "manifest"):
        assert stats[f"verify detected: {region}"] == stats[f"load detected: {region}"] > 0


def test_pristine_copy_still_loads(pristine: Path, tmp_path: Path) -> None:
    # the damage test is meaningful only if the undamaged copy is accepted
    shutil.copytree(pristine, tmp_path / "ckpt")
    ckptproto.verify(tmp_path / "ckpt")
    state = ckptproto.load(tmp_path / "ckpt")
    torch.testing.assert_close(state["models"]["model"]["w"], make_state()["models"]["model"]["w"])


def _edit_manifest(ckpt: Path, edit: Callable[[str], str]) -> None:
    path = ckpt / layout.MANIFEST_NAME
    text = path.read_text()
    new = edit(text)
    assert new != text
    path.write_text(new)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ('"global_step":1234', '"global_step":1235'),  # a state value
        ('"val_loss":0.125', '"val_loss":0.135'),  # a metric in the metadata
        ('"lr":0.01', '"lr":0.02'),  # a hyperparameter
        ('"flag":true', '"flag":false'),
    ],
)
def test_manifest_damage_that_still_parses_is_caught(
    pristine: Path, tmp_path: Path, old: str, new: str
) -> None:
    """The manifest's own checksum catches what parsing and validation cannot."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pristine, ckpt)
    assert old in (ckpt / layout.MANIFEST_NAME).read_text()
    _edit_manifest(ckpt, lambda t: t.replace(old, new))
    manifest = ckpt / layout.MANIFEST_NAME
    for call in (ckptproto.verify, ckptproto.load, ckptproto.read_info, ckptproto.read_manifest):
        with pytest.raises(ckptproto.CheckpointCorruptError, match=CHECKSUM_KEY) as info:
            call(ckpt)
        assert str(manifest) in str(info.value)


def test_every_single_byte_change_of_the_manifest_is_caught(pristine: Path, tmp_path: Path) -> None:
    """Exhaustive over the checksum member's bytes (and a sample of the rest): each position,
    every bit flipped, is refused by read_manifest."""
    path = pristine / layout.MANIFEST_NAME
    raw = path.read_bytes()
    positions = list(range(48)) + random.Random(5).sample(range(48, len(raw)), 40)
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pristine, ckpt)
    tried = 0
    for at in positions:
        for bit in range(8):
            damaged = bytearray(raw)
            damaged[at] ^= 1 << bit
            (ckpt / layout.MANIFEST_NAME).write_bytes(bytes(damaged))
            with pytest.raises(ckptproto.CheckpointFormatError):
                ckptproto.read_manifest(ckpt)
            tried += 1
    report("manifest single-bit flips", {"flips": tried, "detected": tried})


def test_manifest_from_another_writer_without_checksum_loads(pristine: Path, tmp_path: Path) -> None:
    """Format 1.0 keeps the member optional: other writers (and hand-made manifests) work."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pristine, ckpt)
    doc = json.loads((ckpt / layout.MANIFEST_NAME).read_text())
    del doc[CHECKSUM_KEY]
    doc["writer"] = "some-other-tool 1.0"
    (ckpt / layout.MANIFEST_NAME).write_text(json.dumps(doc, separators=(",", ":")))
    ckptproto.verify(ckpt)
    assert ckptproto.load(ckpt)["trainer"]["global_step"] == 1234


def test_manifest_rewritten_by_a_json_tool_is_taken_as_edited(pristine: Path, tmp_path: Path) -> None:
    """A manifest re-serialized by a tool (the member no longer leads the compact bytes) was
    edited on purpose: it is not checked against the stale checksum."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pristine, ckpt)
    doc = json.loads((ckpt / layout.MANIFEST_NAME).read_text())
    doc["metadata"]["note"] = "edited"
    (ckpt / layout.MANIFEST_NAME).write_text(json.dumps(doc, indent=1))
    assert ckptproto.read_info(ckpt).metadata["note"] == "edited"


def test_compact_rewrite_with_a_stale_checksum_is_refused(pristine: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    shutil.copytree(pristine, ckpt)
    doc = json.loads((ckpt / layout.MANIFEST_NAME).read_text())
    doc["trainer_note"] = 1
    (ckpt / layout.MANIFEST_NAME).write_text(json.dumps(doc, separators=(",", ":")))
    with pytest.raises(ckptproto.CheckpointCorruptError, match=CHECKSUM_KEY):
        ckptproto.verify(ckpt)


def test_resume_skips_a_damaged_newest_checkpoint(tmp_path: Path) -> None:
    """CheckpointCallback's resume falls back to the previous good checkpoint with a warning,
    whatever the damage to the newest one."""
    from ckptproto import (
        CallbackCollection,
        CheckpointCallback,
        CheckpointParameters,
        ResumeWarning,
        TrainState,
    )

    def trainer(root: Path) -> tuple[TrainState, CheckpointCallback, torch.nn.Linear]:
        model = torch.nn.Linear(3, 3)
        callback = CheckpointCallback(
            CheckpointParameters(root_dir=root, keep_top_k=-1, save_every_n_steps=1)
        )
        state = TrainState(models={"model": model}, callbacks=CallbackCollection([callback]), rng=False)
        state.callbacks.bind(state)
        return state, callback, model

    rng = random.Random(11)
    stats: Counter[str] = Counter()
    trials = 120 if STRESS else 12
    for i in range(trials):
        root = tmp_path / f"run{i}"
        state, _, model = trainer(root)
        state.callbacks.pre_fit()
        for step in (1, 2):
            state.global_step = step
            with torch.no_grad():
                model.weight.fill_(float(step))
            state.callbacks.post_train_step({"loss": 0.0}, step)
        newest = root / "checkpoint_step_2"
        region = ("header", "tensor bytes", "manifest")[i % 3]
        path, begin, end = regions(newest)[region]
        damage(path, begin, end, ("flip", "byte", "zero", "truncate")[(i // 3) % 4], rng)
        resumed, callback, model = trainer(root)
        with pytest.warns(ResumeWarning, match="checkpoint_step_2"):
            resumed.callbacks.pre_fit()
        assert callback.resumed_from is not None and callback.resumed_from.name == "checkpoint_step_1"
        assert resumed.global_step == 1 and bool((model.weight == 1.0).all())
        stats[f"fell back: {region}"] += 1
    report("resume fallback", dict(sorted(stats.items())))
