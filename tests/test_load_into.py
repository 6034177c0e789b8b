"""load_into: bytes land in the target's own tensors; mismatches are reported with paths."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_same

import ckptproto
from ckptproto import StateMismatchError


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def _ptrs(tensors: Any) -> list[int]:
    return [t.data_ptr() for t in tensors]


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.ones(2, 4)).sum().backward()
    opt.step()


def test_into_module_in_place(tmp_ckpt: Path) -> None:
    src = _mlp(0)
    ckptproto.save(src, tmp_ckpt)
    dst = _mlp(1)
    before = _ptrs(dst.state_dict().values())
    ckptproto.load_into(tmp_ckpt, dst)
    assert _ptrs(dst.state_dict().values()) == before
    assert_same(src.state_dict(), dst.state_dict())


def test_into_optimizer_and_scheduler(tmp_ckpt: Path) -> None:
    model = _mlp(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        _step(model, opt)
        sched.step()
    ckptproto.save(opt, tmp_ckpt / "opt")
    ckptproto.save(sched, tmp_ckpt / "sched")

    model2 = _mlp(0)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.01)
    _step(model2, opt2)  # state tensors exist: they must receive the bytes in place
    exp_avg = [opt2.state[p]["exp_avg"] for p in model2.parameters()]
    before = _ptrs(exp_avg)
    ckptproto.load_into(tmp_ckpt / "opt", opt2)
    assert _ptrs(opt2.state[p]["exp_avg"] for p in model2.parameters()) == before
    assert_same(opt.state_dict(), opt2.state_dict())

    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=1, gamma=0.5)
    ckptproto.load_into(tmp_ckpt / "sched", sched2)
    assert sched2.state_dict() == sched.state_dict()
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_into_tree_of_tensors_and_arrays(tmp_ckpt: Path) -> None:
    state = {
        "w": torch.randn(3, 4),
        "nested": {"a": np.arange(5, dtype=np.int16), "b": [torch.ones(2, dtype=torch.bfloat16), 7]},
        "step": 11,
    }
    ckptproto.save(state, tmp_ckpt)
    target = {
        "w": torch.zeros(3, 4),
        "nested": {"a": np.zeros(5, dtype=np.int16), "b": [torch.zeros(2, dtype=torch.bfloat16), 0]},
        "step": 0,
    }
    w, a, b = target["w"], target["nested"]["a"], target["nested"]["b"][0]  # type: ignore[index]
    ptrs = (w.data_ptr(), a.ctypes.data, b.data_ptr())
    ckptproto.load_into(tmp_ckpt, target)
    assert target["w"] is w and target["nested"]["a"] is a and target["nested"]["b"][0] is b  # type: ignore[index]
    assert (w.data_ptr(), a.ctypes.data, b.data_ptr()) == ptrs
    assert_same(state, target)


def test_into_non_contiguous_target(tmp_ckpt: Path) -> None:
    ckptproto.save({"t": torch.arange(12.0).reshape(4, 3), "a": np.arange(6.0).reshape(3, 2)}, tmp_ckpt)
    base, abase = torch.zeros(3, 4), np.zeros((2, 3))
    target = {"t": base.t(), "a": abase.T}
    ckptproto.load_into(tmp_ckpt, target)
    assert target["t"]._base is base and torch.equal(base.t(), torch.arange(12.0).reshape(4, 3))
    assert np.array_equal(abase.T, np.arange(6.0).reshape(3, 2))


def test_into_dict_of_statefuls(tmp_ckpt: Path) -> None:
    model = _mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _step(model, opt)
    ckptproto.save(
        {"trainer": {"global_step": 1}, "models": {"model": model}, "optimizers": {"optimizer": opt}},
        tmp_ckpt,
    )
    model2 = _mlp(5)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.5, momentum=0.1)
    before = _ptrs(model2.parameters())
    target: dict[str, Any] = {
        "trainer": {"global_step": 0},
        "models": {"model": model2},
        "optimizers": {"optimizer": opt2},
    }
    info = ckptproto.load_into(tmp_ckpt, target)
    assert info.step == 1 and target["trainer"]["global_step"] == 1
    assert _ptrs(model2.parameters()) == before
    assert_same(model.state_dict(), model2.state_dict())
    assert_same(opt.state_dict(), opt2.state_dict())


def _mismatch(path: Path, target: Any, *needles: str) -> str:
    with pytest.raises(StateMismatchError) as info:
        ckptproto.load_into(path, target)
    text = str(info.value)
    for needle in needles:
        assert needle in text, (needle, text)
    return text


def test_strict_reports_paths(tmp_ckpt: Path) -> None:
    ckptproto.save(
        {"models": {"m": {"w": torch.ones(2, 2), "b": torch.ones(2)}}, "extra": {"x": np.ones(3)}}, tmp_ckpt
    )
    good = {"models": {"m": {"w": torch.zeros(2, 2), "b": torch.zeros(2)}}, "extra": {"x": np.zeros(3)}}
    missing = {**good, "models": {"m": {**good["models"]["m"], "gamma": torch.zeros(1)}}}  # type: ignore[dict-item]
    _mismatch(tmp_ckpt, missing, "models.m.gamma", "missing")
    _mismatch(tmp_ckpt, {"models": good["models"]}, "extra", "not in the target")
    shape = {**good, "models": {"m": {"w": torch.zeros(3, 2), "b": torch.zeros(2)}}}
    _mismatch(tmp_ckpt, shape, "models.m.w", "[2, 2]", "[3, 2]")
    dtype = {**good, "models": {"m": {"w": torch.zeros(2, 2, dtype=torch.float64), "b": torch.zeros(2)}}}
    _mismatch(tmp_ckpt, dtype, "models.m.w", "float32", "float64")
    kind = {**good, "extra": {"x": torch.zeros(3, dtype=torch.float64)}}
    _mismatch(tmp_ckpt, kind, "extra.x", "numpy", "torch")
    # Nothing was written into a target that was refused.
    assert not shape["models"]["m"]["b"].any() and not missing["models"]["m"]["w"].any()  # type: ignore[index]


def test_strict_module_target(tmp_ckpt: Path) -> None:
    ckptproto.save(_mlp(0), tmp_ckpt)
    wider = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.ReLU(), torch.nn.Linear(9, 3))
    _mismatch(tmp_ckpt, wider, "0.weight", "[8, 4]", "[9, 4]")
    deeper = torch.nn.Sequential(
        torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3), torch.nn.Linear(3, 3)
    )
    _mismatch(tmp_ckpt, deeper, "3.weight", "missing")
    ckptproto.save({"models": {"model": _mlp(0)}}, tmp_ckpt, overwrite=True)
    _mismatch(tmp_ckpt, {"models": {"model": deeper}}, "models.model.3.weight", "missing")
    _mismatch(tmp_ckpt, {"models": {"model": wider}}, "models.model.2.weight", "[3, 8]", "[3, 9]")


def test_strict_false_loads_what_matches(tmp_ckpt: Path) -> None:
    ckptproto.save({"a": torch.ones(2), "b": torch.ones(3), "c": 5}, tmp_ckpt)
    target = {"a": torch.zeros(2), "z": torch.zeros(1)}
    ckptproto.load_into(tmp_ckpt, target, strict=False)  # "b", "c" unexpected, "z" missing
    assert target["a"].tolist() == [1, 1]
    assert target["z"].tolist() == [0]
    # As torch's load_state_dict(strict=False): a tensor whose shape differs is still an error.
    with pytest.raises(StateMismatchError, match="b: checkpoint has torch float32"):
        ckptproto.load_into(tmp_ckpt, {"a": torch.zeros(2), "b": torch.zeros(4)}, strict=False)
    shorter = torch.nn.Sequential(torch.nn.Linear(4, 8))
    ckptproto.save(_mlp(0), tmp_ckpt, overwrite=True)
    ckptproto.load_into(tmp_ckpt, shorter, strict=False)
    assert torch.equal(shorter[0].weight, _mlp(0)[0].weight)


def test_bad_target(tmp_ckpt: Path) -> None:
    ckptproto.save({"a": 1}, tmp_ckpt)
    for bad in (42, [torch.zeros(1)], torch.zeros(1)):
        with pytest.raises(StateMismatchError):
            ckptproto.load_into(tmp_ckpt, bad)  # type: ignore[arg-type]


# The issue asks for < 10% peak extra memory while loading a 1 GiB state. The ratio is what is
# measured, and it does not depend on the size; 256 MiB keeps the test inside its time budget
# (one save + two loads) on a shared 2-core machine.
# The peak is the kernel's VmHWM, reset just before the load (/proc/self/clear_refs): ru_maxrss
# would do in a fresh interpreter, but Linux carries it over fork+exec from the (large) pytest
# process, which hides the growth.
_MEMORY_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch, ckptproto
    path, how = sys.argv[1], sys.argv[2]
    def peak():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    if how == "load_into":
        target = {"models": {"m": {f"w{i}": torch.zeros(2 << 20) for i in range(32)}}}  # 256 MiB
    from ckptproto.io import threads
    threads.pool().submit(ckptproto.read_manifest, path).result()  # start the I/O threads
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = peak()
    if how == "load_into":
        ckptproto.load_into(path, target)
    else:
        target = ckptproto.load(path)
    ok = all(bool((t == 1).all()) for t in target["models"]["m"].values())
    print(json.dumps({"extra": peak() - before, "ok": ok}))
    """
)


@pytest.mark.slow
def test_load_into_peak_memory_is_small(tmp_path: Path) -> None:
    path = str(tmp_path / "big")
    ckptproto.save({"models": {"m": {f"w{i}": torch.ones(2 << 20) for i in range(32)}}}, path)

    def run(how: str) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-c", _MEMORY_SCRIPT, path, how],
            env=dict(os.environ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    state_bytes = 256 << 20
    into, full = run("load_into"), run("load")
    figures = f"load_into grew {into['extra'] / 2**20:.1f} MiB, load {full['extra'] / 2**20:.1f} MiB"
    assert into["ok"] and full["ok"]
    assert into["extra"] < 0.10 * state_bytes, figures
    assert full["extra"] > 0.90 * state_bytes, figures


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors(tmp_ckpt: Path) -> None:
    w = torch.randn(4, 5, device="cuda")
    ckptproto.save({"w": w, "bf": w.to(torch.bfloat16)}, tmp_ckpt)
    loaded = ckptproto.load(tmp_ckpt, map_location="cuda")
    assert loaded["w"].device.type == "cuda" and torch.equal(loaded["w"], w)
    target = {
        "w": torch.zeros(4, 5, device="cuda"),
        "bf": torch.zeros(4, 5, device="cuda", dtype=torch.bfloat16),
    }
    ptr = target["w"].data_ptr()
    ckptproto.load_into(tmp_ckpt, target)
    assert target["w"].data_ptr() == ptr and torch.equal(target["w"], w)
    assert torch.equal(target["bf"], w.to(torch.bfloat16))


def test_partial_target_reads_only_what_it_needs(tmp_ckpt: Path) -> None:
    """Loading only the weights out of a checkpoint that also holds a large optimizer state
    does not allocate that state (numpy allocations are visible to tracemalloc)."""
    import tracemalloc

    big = 16 << 20
    ckptproto.save(
        {"models": {"w": np.ones(1024)}, "optimizers": {"exp_avg": np.ones(big // 8), "step": 3}}, tmp_ckpt
    )
    target = {"models": {"w": np.zeros(1024)}}
    tracemalloc.start()
    try:
        # verify=False: checking the CRC of a partly read file streams it through a few
        # fixed-size blocks, which is bounded but would blur this measurement.
        ckptproto.load_into(tmp_ckpt, target, strict=False, verify=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert target["models"]["w"].sum() == 1024
    assert peak < big // 4, f"peak {peak} bytes for a {big}-byte state the target does not hold"
    # A placeholder (None) in the target still receives the tensor.
    holder: dict[str, Any] = {"models": {"w": np.zeros(1024)}, "optimizers": {"exp_avg": None}}
    ckptproto.load_into(tmp_ckpt, holder, strict=False)
    assert holder["optimizers"]["exp_avg"].shape == (big // 8,)


@pytest.mark.parametrize("extra", ["none", "scalar", "placeholder", "missing", "nested"])
def test_a_large_dict_of_tensors_takes_its_other_values_too(tmp_ckpt: Path, extra: str) -> None:
    """A dict of many tensors (assign and wanted_refs skip it in one pass when every key holds
    a tensor) still receives a non-tensor value, a tensor into a placeholder, and a subtree."""
    saved: dict[str, Any] = {f"w{i}": torch.full((2,), float(i)) for i in range(40)}
    target: dict[str, Any] = {f"w{i}": torch.zeros(2) for i in range(40)}
    if extra == "scalar":
        saved["step"], target["step"] = 7, 0
    elif extra == "placeholder":
        saved["new"], target["new"] = torch.ones(3), None
    elif extra == "missing":
        saved["new"] = torch.ones(3)  # not in the target: left out (strict=False)
    elif extra == "nested":
        saved["sub"], target["sub"] = {"n": 3, "t": torch.ones(1)}, {"n": 0, "t": torch.zeros(1)}
    ckptproto.save(saved, tmp_ckpt)
    ckptproto.load_into(tmp_ckpt, target, strict=extra != "missing")
    assert all(torch.equal(target[f"w{i}"], saved[f"w{i}"]) for i in range(40))
    if extra == "scalar":
        assert target["step"] == 7
    elif extra == "placeholder":
        assert torch.equal(target["new"], torch.ones(3))
    elif extra == "missing":
        assert "new" not in target
    elif extra == "nested":
        assert target["sub"]["n"] == 3 and torch.equal(target["sub"]["t"], torch.ones(1))


def test_a_value_taken_whole_holds_the_tensors_read_in_every_container(tmp_ckpt: Path) -> None:
    """A tree target takes a checkpoint subtree whole where it holds a placeholder (or a value
    of another type): every tensor inside it, in lists, tuples, int-keyed dicts and
    OrderedDicts, is the tensor read (as ``load`` gives it), and a Stateful inside the tree
    receives its part with tensors, never a placeholder of the matching."""
    from collections import OrderedDict

    columns = {f"c{i}": torch.full((2,), float(i)) for i in range(20)}
    saved: dict[str, Any] = {
        "whole": {
            "list": [torch.ones(2), 3, [torch.zeros(1)]],
            "tuple": (torch.full((3,), 2.0), "s"),
            "ints": {1: torch.full((1,), 5.0)},
            "od": OrderedDict(a=torch.full((2,), 6.0)),
            "columns": columns,
        },
        "replaced": [torch.full((2,), 7.0)],
        "module": {"weight": torch.full((2, 2), 8.0), "bias": torch.full((2,), 9.0)},
    }
    ckptproto.save(saved, tmp_ckpt)
    module = torch.nn.Linear(2, 2)
    target: dict[str, Any] = {"whole": None, "replaced": "not a list", "module": module}
    ckptproto.load_into(tmp_ckpt, target)
    expected = ckptproto.load(tmp_ckpt)
    got = target["whole"]
    assert type(got["tuple"]) is tuple and type(got["od"]) is OrderedDict and list(got["ints"]) == [1]
    flat_got, flat_expected = _leaves(got), _leaves(expected["whole"])
    assert len(flat_got) == len(flat_expected) == 27
    for a, b in zip(flat_got, flat_expected, strict=True):
        assert type(a) is type(b) and (a == b if not isinstance(a, torch.Tensor) else torch.equal(a, b))
    assert len(target["replaced"]) == 1 and torch.equal(target["replaced"][0], torch.full((2,), 7.0))
    assert torch.equal(module.weight.detach(), torch.full((2, 2), 8.0))
    assert torch.equal(module.bias.detach(), torch.full((2,), 9.0))


def _leaves(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [leaf for value in node.values() for leaf in _leaves(value)]
    if isinstance(node, (list, tuple)):
        return [leaf for value in node for leaf in _leaves(value)]
    return [node]


def test_stateful_refusal_is_a_state_mismatch(tmp_ckpt: Path) -> None:
    """A Stateful target's own load_state_dict refusing the state (torch: unexpected keys)
    surfaces as StateMismatchError naming the state path, not a bare RuntimeError."""
    ckptproto.save({"models": {"model": _mlp(0)}}, tmp_ckpt)
    short = torch.nn.Sequential(torch.nn.Linear(4, 8))
    with pytest.raises(StateMismatchError, match=r"models\.model: Sequential\.load_state_dict") as info:
        ckptproto.load_into(tmp_ckpt, {"models": {"model": short}})
    assert "2.weight" in str(info.value) and isinstance(info.value.__cause__, RuntimeError)
    ckptproto.save(_mlp(0), tmp_ckpt, overwrite=True)
    with pytest.raises(StateMismatchError, match="<root>: Sequential"):
        ckptproto.load_into(tmp_ckpt, short)
