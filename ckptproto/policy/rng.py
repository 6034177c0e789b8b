"""RNGState: the random generators a training step draws from, as one Stateful."""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

from ckptproto import arrays


def _distributed() -> tuple[Any, int, int] | None:
    """``(torch.distributed, rank, world size)`` when a process group of several ranks is up."""
    dist = getattr(arrays.loaded_torch(), "distributed", None)
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    size = int(dist.get_world_size())
    return (dist, int(dist.get_rank()), size) if size > 1 else None


class RNGState:
    """Python's ``random``, numpy's global RNG, torch's CPU generator and every CUDA device's
    generator (when torch and CUDA are present)::

        state = {"trainer": {"rng": RNGState(), ...}, ...}
        ckptproto.save(state, "ckpt/step_10")     # later: load_into restores all generators

    Under ``torch.distributed`` every rank's generators differ (different dropout masks per
    rank), while plain state is saved once for all ranks. So ``state_dict()`` is then a
    collective: it gathers every rank's generators into ``{"ranks": [rank 0's, rank 1's,
    ...]}`` (the same value on every rank), and ``load_state_dict`` restores this rank's entry.
    Call it on every rank, as a distributed save does.
    """

    def state_dict(self) -> dict[str, Any]:
        local = self._local_state()
        world = _distributed()
        if world is None:
            return local
        dist, _rank, size = world
        gathered: list[Any] = [None] * size
        dist.all_gather_object(gathered, local)  # transport between our own ranks, not storage
        return {"ranks": gathered}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        ranks = state_dict.get("ranks")
        if ranks is None:
            self._load_local(state_dict)
            return
        world = _distributed()
        rank, size = (world[1], world[2]) if world is not None else (0, 1)
        if not isinstance(ranks, list) or not ranks:
            raise ValueError("RNG state: 'ranks' must be a non-empty list of per-rank states")
        if len(ranks) != size:
            warnings.warn(
                f"the checkpoint holds RNG states of {len(ranks)} ranks, this run has {size}: "
                f"rank {rank} takes rank {rank % len(ranks)}'s generators, so random draws will "
                "not continue exactly as in the saved run",
                RuntimeWarning,
                stacklevel=2,
            )
        self._load_local(ranks[rank % len(ranks)])

    def _local_state(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        state: dict[str, Any] = {
            "python": {"version": version, "state": list(internal), "gauss": gauss},
            "numpy": {
                "name": str(name),
                "keys": np.asarray(keys, dtype=np.uint32).copy(),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            },
        }
        torch = arrays.loaded_torch()
        if torch is not None:
            state["torch"] = torch.get_rng_state()
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                state["cuda"] = list(torch.cuda.get_rng_state_all())
        return state

    def _load_local(self, state_dict: Mapping[str, Any]) -> None:
        py = state_dict.get("python")
        if py is not None:
            random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
        npy = state_dict.get("numpy")
        if npy is not None:
            np.random.set_state(
                (
                    npy["name"],
                    np.asarray(npy["keys"], dtype=np.uint32),
                    npy["pos"],
                    npy["has_gauss"],
                    npy["cached_gaussian"],
                )
            )
        torch = arrays.loaded_torch()
        if torch is None:
            return
        if state_dict.get("torch") is not None:
            torch.set_rng_state(_byte_tensor(torch, state_dict["torch"]))
        cuda = state_dict.get("cuda")
        if cuda and torch.cuda.is_available():
            if len(cuda) != torch.cuda.device_count():
                raise ValueError(
                    f"the checkpoint holds RNG states for {len(cuda)} CUDA devices, this process sees "
                    f"{torch.cuda.device_count()}; restore on the same device count"
                )
            torch.cuda.set_rng_state_all([_byte_tensor(torch, s) for s in cuda])


def _byte_tensor(torch: Any, value: Any) -> Any:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(value)
    return value.detach().to("cpu", torch.uint8).contiguous()
