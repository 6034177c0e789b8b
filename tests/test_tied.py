"""Tied tensors: written once, restored sharing memory again; load_into keeps a target's tie."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import ckptproto


class TiedLM(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(16, 8)
        self.hidden = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 16, bias=False)
        self.out.weight = self.embed.weight  # tied


def test_tied_weights_saved_once_and_restored_shared(tmp_ckpt: Path) -> None:
    model = TiedLM(0)
    ckptproto.save({"models": {"model": model}}, tmp_ckpt)
    manifest = ckptproto.read_manifest(tmp_ckpt)
    assert len(manifest.tensors) == 3  # embed/out weight once, hidden weight and bias
    assert sum(t.nbytes for t in manifest.tensors) == (16 * 8 + 8 * 8 + 8) * 4
    state = ckptproto.load(tmp_ckpt)["models"]["model"]
    assert state["embed.weight"] is state["out.weight"]
    assert torch.equal(state["embed.weight"], model.embed.weight)
    mapped = ckptproto.load(tmp_ckpt, mmap=True)["models"]["model"]
    assert mapped["embed.weight"].data_ptr() == mapped["out.weight"].data_ptr()


def test_load_into_keeps_the_targets_tie(tmp_ckpt: Path) -> None:
    ckptproto.save(TiedLM(0), tmp_ckpt)
    target = TiedLM(1)
    ptr = target.embed.weight.data_ptr()
    ckptproto.load_into(tmp_ckpt, target)
    assert target.out.weight is target.embed.weight
    assert target.embed.weight.data_ptr() == ptr
    assert torch.equal(target.embed.weight, TiedLM(0).embed.weight)
    with torch.no_grad():
        target.embed.weight[0, 0] = 123.0
    assert target.out.weight[0, 0] == 123.0


def test_untied_target_gets_both_copies(tmp_ckpt: Path) -> None:
    ckptproto.save(TiedLM(0), tmp_ckpt)
    target = TiedLM(1)
    target.out.weight = torch.nn.Parameter(torch.zeros(16, 8))  # untie
    ckptproto.load_into(tmp_ckpt, target)
    assert target.out.weight is not target.embed.weight
    assert torch.equal(target.out.weight, target.embed.weight)
    assert torch.equal(target.out.weight, TiedLM(0).embed.weight)


def test_numpy_same_view_dedupes_other_views_do_not(tmp_ckpt: Path) -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    state = {"a": a, "same": a, "again": a[:], "row": a[1], "t": a.T}
    ckptproto.save(state, tmp_ckpt)
    manifest = ckptproto.read_manifest(tmp_ckpt)
    assert len(manifest.tensors) == 3  # a (= a[:], same view), a[1], a.T
    loaded = ckptproto.load(tmp_ckpt)
    assert loaded["a"] is loaded["same"] is loaded["again"]
    assert np.array_equal(loaded["row"], a[1]) and np.array_equal(loaded["t"], a.T)


def test_torch_views_of_one_storage(tmp_ckpt: Path) -> None:
    base = torch.arange(10.0)
    state = {"base": base, "detached": base.detach(), "tail": base[5:], "flat": base.view(2, 5)}
    ckptproto.save(state, tmp_ckpt)
    loaded = ckptproto.load(tmp_ckpt)
    assert loaded["base"] is loaded["detached"]  # same view of the same memory
    assert torch.equal(loaded["tail"], base[5:]) and torch.equal(loaded["flat"], base.view(2, 5))


def test_distinct_empty_tensors_are_not_tied(tmp_ckpt: Path) -> None:
    a, b = torch.empty(0), torch.empty(0)
    x, y = np.empty((0, 3)), np.empty((0, 3))
    ckptproto.save({"a": a, "b": b, "a2": a, "x": x, "y": y}, tmp_ckpt)
    loaded = ckptproto.load(tmp_ckpt)
    assert loaded["a"] is not loaded["b"] and loaded["a"] is loaded["a2"]
    assert loaded["x"] is not loaded["y"]
    assert len(ckptproto.read_manifest(tmp_ckpt).tensors) == 4
