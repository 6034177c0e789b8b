"""RNGState: the random generators a training step draws from, as one Stateful."""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np

from ckptproto import arrays


class RNGState:
    """Python's ``random``, numpy's global RNG, torch's CPU generator and every CUDA device's
    generator (when torch and CUDA are present)::

        state = {"trainer": {"rng": RNGState(), ...}, ...}
        ckptproto.save(state, "ckpt/step_10")     # later: load_into restores all generators
    """

    def state_dict(self) -> dict[str, Any]:
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

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
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
