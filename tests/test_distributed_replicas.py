"""A plain tensor is saved once, as replicated: when its value differs between ranks (an
unreduced metric, BatchNorm statistics under DDP) the save says so, naming the tensor, the
ranks and whose value the checkpoint holds — never silently (real gloo ranks)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _dist_helpers import run_ranks

import ckptproto
from ckptproto.io import share


def scenario_replicas(rank: int, world: int, tmp: Path) -> dict[str, Any]:
    big = share.REPLICA_CHECK_BYTES // 4 + 1  # float32 elements just past the checked size
    state = {
        "same": torch.arange(6.0),
        "bn": {"running_mean": torch.full((4,), float(rank))},  # differs per rank
        "arr": np.full(3, rank),  # differs per rank
        "big_same": torch.ones(big),
        "trainer": {"global_step": 3},
    }
    messages: dict[str, list[str]] = {}
    for how in ("sync", "async"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if how == "sync":
                ckptproto.save(state, tmp / how)
            else:
                with ckptproto.AsyncSaver() as saver:
                    saver.save(state, tmp / how).result(timeout=120)
        messages[how] = [str(w.message) for w in caught if "differ between ranks" in str(w.message)]
    return {"messages": messages}


def test_plain_tensors_that_differ_between_ranks_are_named(tmp_path: Path) -> None:
    results = run_ranks(scenario_replicas, 2, tmp_path)
    for how in ("sync", "async"):
        (message,) = results[0]["messages"][how]
        assert "bn.running_mean (rank 1 differ from rank 0; the checkpoint holds rank" in message, message
        assert "arr (rank 1 differ" in message and "same" not in message, message
        assert results[1]["messages"][how] == []  # said once, by rank 0
        ckptproto.verify(tmp_path / how)
