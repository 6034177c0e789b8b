"""ckptproto._recent: the last few results of a costly step, by an equal key."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

import ckptproto
from ckptproto import _recent
from ckptproto._recent import Recent


def test_the_newest_keys_are_kept_and_found_by_equality() -> None:
    recent: Recent[tuple[int, list[str]], str] = Recent(2)
    recent.put((0, ["a", "b"]), "ab")
    assert recent.get((0, ["a", "b"])) == "ab"  # an equal key, another list
    assert recent.get((1, ["a", "b"])) is None and recent.get((0, ["a"])) is None
    recent.put((1, ["c"]), "c")
    recent.put((2, ["d"]), "d")  # the oldest goes
    assert recent.get((0, ["a", "b"])) is None
    assert (recent.get((1, ["c"])), recent.get((2, ["d"]))) == ("c", "d")
    recent.clear()
    assert recent.get((2, ["d"])) is None


def test_a_key_found_again_is_kept_over_keys_put_before_it() -> None:
    """Least recently used goes first: a key found again (the layout a training run saves at
    every checkpoint) outlives keys put once since (a save of another layout now and then)."""
    recent: Recent[str, int] = Recent(2)
    recent.put("main", 0)
    for other in ("eval", "ema", "final"):
        recent.put(other, 1)
        assert recent.get("main") == 0, other  # found: the newest again
    assert recent.get("eval") is None and recent.get("ema") is None and recent.get("final") == 1


def test_a_layout_saved_between_others_keeps_its_plan(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A training run's layout saved at every checkpoint, with one other layout saved between
    each two (an evaluation state, a new layout each time): its data file's plan is made
    once, not again after other layouts filled the cache (io/plan.py keeps two)."""
    import torch

    from ckptproto.io import plan

    made: list[int] = []
    real = plan._plan_file

    def counted(*args: object, **kwargs: object) -> object:
        made.append(len(args[3]))  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(plan, "_plan_file", counted)
    ckptproto.clear_caches()
    main = {"models": {"m": {f"w{i}": torch.full((2,), float(i)) for i in range(40)}}}
    for n in range(4):
        ckptproto.save(main, tmp_path / f"main{n}")
        ckptproto.save({"eval": {f"e{n}.{i}": torch.zeros(3) for i in range(n + 5)}}, tmp_path / f"eval{n}")
    assert made.count(40) == 1 and len(made) == 5  # main once, each other layout once


def test_get_or_make_makes_once_and_an_error_puts_nothing() -> None:
    recent: Recent[tuple[int, list[str]], int] = Recent(2)
    made: list[int] = []

    def make() -> int:
        made.append(0)
        return 0  # a falsy value is found again too

    assert recent.get_or_make((0, ["a"]), make) == 0
    assert recent.get_or_make((0, ["a"]), make) == 0 and len(made) == 1

    def fail() -> int:
        raise ValueError("malformed")

    with pytest.raises(ValueError, match="malformed"):
        recent.get_or_make((1, ["b"]), fail)
    assert recent.get((1, ["b"])) is None


def test_threads_put_and_get_at_once() -> None:
    recent: Recent[int, int] = Recent(4)
    errors: list[BaseException] = []

    def work(base: int) -> None:
        try:
            for i in range(2000):
                recent.put(base + i, base + i)
                found = recent.get(base + i)
                assert found is None or found == base + i
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k * 10_000,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_clear_caches_empties_every_save_paths_memory_and_saves_go_on(tmp_path: Path) -> None:
    import torch

    from ckptproto import tree
    from ckptproto.format import json_text
    from ckptproto.io import plan

    state = {"models": {"m": {f"w{i}": torch.full((2,), float(i)) for i in range(40)}}}
    ckptproto.save(state, tmp_path / "a")
    kept = (tree._recent_columns, json_text._recent, plan._recent)
    assert all(r._items for r in kept)  # (what a save of this layout left for the next one)
    ckptproto.clear_caches()
    assert not any(r._items for r in _recent._every)
    ckptproto.save(state, tmp_path / "b")  # built again
    loaded = ckptproto.load(tmp_path / "b")
    assert all(torch.equal(loaded["models"]["m"][k], v) for k, v in state["models"]["m"].items())
    assert all(r._items for r in kept)
    assert {*kept} <= set(_recent._every)
