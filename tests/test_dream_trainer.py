"""ckptproto.integrations.dream_trainer against the real dream-trainer 0.3.0 package.

Each run is a real ``DreamTrainer`` fit in fresh processes (one per gloo rank, see
tests/_dream_trainer_harness.py); a run with the integration must end bitwise equal to the
same run with Dream Trainer's own DCP callbacks, uninterrupted and interrupted (SIGKILL on
every rank) then resumed, and leave checkpoints of the same names holding the same values.

These tests need dream-trainer installed (scripts/test_dream_trainer.sh builds that venv and
runs them; .ci/run calls it). Where it is not installed they are skipped, unless
CKPTPROTO_DREAM_TRAINER=1 says this run is the one that must execute them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

if importlib.util.find_spec("dream_trainer") is None:
    if os.environ.get("CKPTPROTO_DREAM_TRAINER") == "1":
        raise RuntimeError("CKPTPROTO_DREAM_TRAINER=1 but dream-trainer is not installed")
    pytest.skip(
        "dream-trainer is not installed (scripts/test_dream_trainer.sh runs these)", allow_module_level=True
    )

import ckptproto  # noqa: E402
from ckptproto.interop import dcp as dcp_interop  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _dream_trainer_harness as harness  # noqa: E402

CKPT = Path("proj/grp/exp/checkpoints")


def fit(tmp: Path, name: str, world_size: int = 1, *, root: str | None = None, **spec: Any) -> dict[int, Any]:
    """Run a fit; returns each rank's final ``trainer.state_dict()``."""
    spec = {"root": str(tmp / (root or name)), "out": str(tmp / f"{name}-out"), **spec}
    harness.run(spec, world_size, killed=spec.get("kill_at") is not None)
    if spec.get("kill_at") is not None:
        return {}
    return {r: torch.load(tmp / f"{name}-out" / f"rank{r}.pt", weights_only=False) for r in range(world_size)}


def fit_interrupted(
    tmp: Path, name: str, kill_at: int, world_size: int = 1, *, resumes_at: int, **spec: Any
) -> dict[int, Any]:
    """Run until SIGKILL at ``kill_at``, then run the same spec again: it must resume from the
    checkpoint of step ``resumes_at`` (a fresh start would end equal too: say which it did)."""
    fit(tmp, name + "-killed", world_size, root=name, kill_at=kill_at, **spec)
    final = fit(tmp, name, world_size, **spec)
    for rank in range(world_size):
        log = (tmp / f"{name}-out.rank{rank}.log").read_text()
        assert f"Resumed exp from step {resumes_at}" in log, log[-3000:]
    return final


def assert_bitwise_equal(a: Any, b: Any, path: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8)), f"{path} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            assert_bitwise_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise_equal(x, y, f"{path}.{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def names(root: Path) -> list[str]:
    return sorted(p.name for p in (root / CKPT).iterdir())


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(tree, dict):
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(tree, (list, tuple)) and not all(isinstance(v, (int, float, str)) for v in tree):
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}.{i}"))
    else:
        out[prefix] = tree
    return out


def assert_same_checkpoints(dcp_root: Path, ours_root: Path) -> None:
    """Same directory names; every value DCP stored is in ours, bitwise (DCP flattens keys)."""
    assert names(dcp_root) == names(ours_root)
    for name in names(dcp_root):
        theirs = flatten(dcp_interop.read(dcp_root / CKPT / name))
        mine = flatten(ckptproto.load(ours_root / CKPT / name))
        assert set(theirs) <= set(mine), sorted(set(theirs) - set(mine))
        for key, value in theirs.items():
            if isinstance(value, torch.Tensor):
                assert_bitwise_equal(value, mine[key], f"{name}:{key}")
            elif key.endswith(("param_groups.0.params", "last_epoch", "_step_count")) or not isinstance(
                value, float
            ):
                assert value == mine[key] or list(value) == list(mine[key]), f"{name}:{key}"


# The DCP baselines are shared by several tests: compute each once per session.
_BASELINES: dict[tuple[Any, ...], tuple[Path, dict[int, Any]]] = {}


def baseline(tmp_factory: Any, world_size: int = 1, **spec: Any) -> tuple[Path, dict[int, Any]]:
    key = (world_size, *sorted(spec.items()))
    if key not in _BASELINES:
        tmp = tmp_factory.mktemp("dcp")
        _BASELINES[key] = (tmp / "dcp", fit(tmp, "dcp", world_size, storage="dcp", **spec))
    return _BASELINES[key]


TRAIN_EPOCHS = {"every_train_epochs": 1}
MODES = ["disabled", "async", "async_with_pinned_mem"]


@pytest.mark.parametrize("async_mode", MODES)
def test_one_rank_run_equals_dream_trainers_own(
    tmp_path: Path, tmp_path_factory: Any, async_mode: str
) -> None:
    dcp_root, theirs = baseline(tmp_path_factory, async_mode=async_mode, **TRAIN_EPOCHS)
    mine = fit(tmp_path, "ours", storage="ckptproto", async_mode=async_mode, **TRAIN_EPOCHS)
    assert_bitwise_equal(theirs, mine)
    assert_same_checkpoints(dcp_root, tmp_path / "ours")
    # keep_top_k=3 with resume_mode "last": the 3 newest of steps 3, 6, 9, 12
    assert [n.split("__")[0] for n in names(tmp_path / "ours")] == [
        "step=000006",
        "step=000009",
        "step=000012",
    ]


@pytest.mark.parametrize("async_mode", MODES)
def test_one_rank_interrupted_run_equals_uninterrupted(
    tmp_path: Path, tmp_path_factory: Any, async_mode: str
) -> None:
    """Train-epoch cadence saves at the start of an epoch (current_epoch already advanced):
    killed at step 8, resumed from step 6, the run ends as if never interrupted."""
    _dcp_root, theirs = baseline(tmp_path_factory, async_mode=async_mode, **TRAIN_EPOCHS)
    mine = fit_interrupted(
        tmp_path, "ours", 8, resumes_at=6, storage="ckptproto", async_mode=async_mode, **TRAIN_EPOCHS
    )
    assert_bitwise_equal(theirs, mine)
    assert mine[0]["trainer"]["global_step"] == 12


def test_validation_cadence_replays_the_epoch_like_dream_trainer(tmp_path: Path) -> None:
    """Dream Trainer saves at a validation before current_epoch advances, so resuming replays
    that epoch; the integration keeps that: interrupted runs of both end bitwise equal, with
    one epoch (3 steps) more than the uninterrupted run."""
    spec = {"every_val_epochs": 1}
    theirs = fit_interrupted(tmp_path, "dcp", 8, resumes_at=6, storage="dcp", **spec)
    mine = fit_interrupted(tmp_path, "ours", 8, resumes_at=6, storage="ckptproto", **spec)
    assert_bitwise_equal(theirs, mine)
    assert mine[0]["trainer"]["global_step"] == 12 + 3
    assert_same_checkpoints(tmp_path / "dcp", tmp_path / "ours")


TWO_RANKS = {"rank_rngs": False, **TRAIN_EPOCHS}


@pytest.mark.parametrize("async_mode", ["disabled", "async"])
def test_two_ranks_equal_dream_trainers_own(tmp_path: Path, tmp_path_factory: Any, async_mode: str) -> None:
    """DDP (Dream Trainer's replicate) on 2 gloo ranks, each with its own data stream. The RNG
    used in training_step is seeded alike on both ranks: a per-rank ``named_rngs`` generator
    is a plain tensor that differs between ranks, which neither DCP nor ckptproto stores per
    rank (see docs/coming-from.md)."""
    dcp_root, theirs = baseline(tmp_path_factory, 2, async_mode=async_mode, **TWO_RANKS)
    mine = fit(tmp_path, "ours", 2, storage="ckptproto", async_mode=async_mode, **TWO_RANKS)
    assert_bitwise_equal(theirs, mine)
    assert mine[0]["dataloaders"]["train"] == mine[1]["dataloaders"]["train"]
    assert_same_checkpoints(dcp_root, tmp_path / "ours")
    resumed = fit_interrupted(
        tmp_path, "resumed", 8, 2, resumes_at=6, storage="ckptproto", async_mode=async_mode, **TWO_RANKS
    )
    assert_bitwise_equal(theirs, resumed)


def test_two_ranks_per_rank_generators_resume_exactly(tmp_path: Path, tmp_path_factory: Any) -> None:
    """A ``named_rngs`` generator seeded per rank: DCP stores one rank's copy, so Dream
    Trainer's own resumed run continues one stream on both ranks and ends elsewhere; the
    integration stores each rank's (``rngs_by_rank``) and ends as if never interrupted."""
    _dcp_root, straight = baseline(tmp_path_factory, 2, **TRAIN_EPOCHS)
    assert not torch.equal(straight[0]["rngs"]["noise_rng"], straight[1]["rngs"]["noise_rng"])
    mine = fit_interrupted(tmp_path, "ours", 8, 2, resumes_at=6, storage="ckptproto", **TRAIN_EPOCHS)
    assert_bitwise_equal(straight, mine)
    theirs = fit_interrupted(tmp_path, "dcp", 8, 2, resumes_at=6, storage="dcp", **TRAIN_EPOCHS)
    assert theirs[0]["rngs"]["noise_rng"].equal(theirs[1]["rngs"]["noise_rng"])  # one stream left
    assert not theirs[0]["models"]["model"]["0.weight"].equal(straight[0]["models"]["model"]["0.weight"])


def test_switching_mid_project_resumes_from_dream_trainers_dcp_checkpoint(
    tmp_path: Path, tmp_path_factory: Any
) -> None:
    """A run killed under Dream Trainer's DCP callback, resumed with the integration: it reads
    the DCP checkpoint (saying so), ends bitwise equal, and retention spans both kinds."""
    _dcp_root, theirs = baseline(tmp_path_factory, **TRAIN_EPOCHS)
    fit(tmp_path, "dcp-killed", root="mixed", kill_at=8, storage="dcp", **TRAIN_EPOCHS)
    mine = fit(tmp_path, "mixed", storage="ckptproto", **TRAIN_EPOCHS)
    assert_bitwise_equal(theirs, mine)
    log = (tmp_path / "mixed-out.rank0.log").read_text()
    assert "Resumed exp from step 6" in log
    assert "a DCP checkpoint written by Dream Trainer's own callback" in log
    assert "LegacyCheckpointWarning" in log
    kept = tmp_path / "mixed" / CKPT
    # DCP wrote steps 3 and 6; the integration 9 and 12; keep_top_k=3 removed step 3
    assert [(p.name.split("__")[0], (p / ".metadata").exists()) for p in sorted(kept.iterdir())] == [
        ("step=000006", True),
        ("step=000009", False),
        ("step=000012", False),
    ]


@pytest.mark.parametrize("storage", ["dcp", "ckptproto"])
def test_strict_load_refuses_a_checkpoint_lacking_part_of_the_state(tmp_path: Path, storage: str) -> None:
    """strict_load=True (DCP without allow_partial_load): a generator the checkpoint lacks is
    refused, naming it; strict_load=False resumes. Same for both storages."""
    fit(tmp_path, "killed", root="run", kill_at=8, storage=storage, **TRAIN_EPOCHS)
    with pytest.raises(AssertionError, match=r"rngs\.extra_rng"):
        fit(tmp_path, "strict", root="run", storage=storage, strict_load=True, extra_rng=True, **TRAIN_EPOCHS)
    fit(tmp_path, "lenient", root="run", storage=storage, extra_rng=True, **TRAIN_EPOCHS)
    assert "Resumed exp from step 6" in (tmp_path / "lenient-out.rank0.log").read_text()


def test_cli_and_seed_examples_work_on_the_checkpoints(tmp_path: Path) -> None:
    fit(tmp_path, "ours", storage="ckptproto", resume_mode="min", **TRAIN_EPOCHS)
    root = tmp_path / "ours" / CKPT
    cli = [sys.executable, "-m", "ckptproto"]
    listing = subprocess.run([*cli, "ls", str(root)], capture_output=True, text=True, check=True).stdout
    for name in names(tmp_path / "ours"):
        assert name in listing
        subprocess.run([*cli, "verify", str(root / name)], capture_output=True, text=True, check=True)
        shown = subprocess.run(
            [*cli, "inspect", str(root / name)], capture_output=True, text=True, check=True
        )
        assert "global_step" in shown.stdout and "noise_rng: torch uint8" in shown.stdout
    # The seed document's "Finding Checkpoints" and "Checkpoint Inspection", with ckptproto.
    checkpoints = ckptproto.find_checkpoints(checkpoint_dir=root, mode="best")
    metrics = [c.metric for c in checkpoints]
    assert metrics == sorted(metrics) and len(metrics) == 3  # resume_mode "min": the 3 lowest kept
    assert all(c.name == f"step={c.step:06d}__metric={c.metric:.6f}".replace(".", "_") for c in checkpoints)
    state_dict = ckptproto.load(checkpoints[0].path)
    assert state_dict["trainer"]["global_step"] == checkpoints[0].step
    assert set(state_dict) == {"trainer", "models", "optimizers", "schedulers", "dataloaders", "rngs"}
    assert set(state_dict["models"]["model"]) == {"0.weight", "0.bias", "3.weight", "3.bias"}


def test_integration_module_needs_no_workaround() -> None:
    """The shims live in the harness only: the module's source mentions none of them."""
    source = (Path(ckptproto.__file__).parent / "integrations" / "dream_trainer.py").read_text()
    for shim in ("typing.override", "typing_extensions", "registry", "get_device_info", "cpu:gloo"):
        assert shim not in source


def test_conformance_suite_on_a_dream_trainer(tmp_path: Path) -> None:
    """tests/_dream_trainer_adapter.py through `ckptproto conformance`, in its own process (the
    adapter launches Dream Trainer's torch.distributed world)."""
    report = tmp_path / "report.json"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
    }
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "ckptproto",
            "conformance",
            "_dream_trainer_adapter:DreamTrainerAdapter",
            "--json",
            str(report),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    results = {r["name"]: r for r in json.loads(report.read_text())["checks"]}
    # strict_loading: Dream Trainer's load_state_dict logs unknown or missing keys, never
    # refuses (declared). repeated_load: Dream Trainer's load_state_dict empties the dict it is
    # given; harmless to a resumed run, so at most a warning that says so.
    expected = {name: "pass" for name in results} | {"strict_loading": "skip"}
    del expected["repeated_load"]
    got = {name: results[name]["status"] for name in expected}
    assert got == expected, {n: results[n]["summary"] for n in expected if got[n] != expected[n]}
    assert results["repeated_load"]["status"] in ("pass", "warn"), results["repeated_load"]["summary"]


def test_s3_root_is_refused() -> None:
    harness.install_workarounds()
    from dream_trainer.configs import CheckpointParameters

    from ckptproto.integrations.dream_trainer import AsyncCheckpointCallback, CheckpointCallback

    config = CheckpointParameters(root_dir="s3://bucket/run", checkpoint_every_n_train_epochs=1)
    with pytest.raises(ValueError, match="filesystem path"):
        CheckpointCallback(config)
    config.async_mode = "async"
    with pytest.raises(ValueError, match="filesystem path"):
        AsyncCheckpointCallback(config)
