"""What the state tree's text costs per tensor reference in format 1.0, against a column form
a future major version could use: the floor under issue 17's goal 3 that no code change in the
reader or writer can pass.

    python benchmarks/bench_state_text.py                      # 10k, 100k, 300k references
    python benchmarks/bench_state_text.py --counts 100000 --repeat 9

Format 1.0 writes each reference as an object of its own, ``"layers.0.w": {"$torch": 0}``
(FORMAT.md §3): a writer builds one dict per tensor and a reader's JSON parser builds one per
tensor again. A module's state dict could instead be one object, ``{"$column": {"first": 0,
"keys": ["layers.0.w", ...]}}`` (a sketch, not in the spec: an unknown tag, which every 1.0
reader refuses, F-17, so it would take a new major version, F-31 and F-32). Measured on the
same keys, in one process (CPU time of the process, the collector off, best of ``--repeat``):

- write: the text of an encoded tree, 1.0 as ckptproto's manifest writer makes it
  (``json_text.tree``: one format operation for a column's text), the column form by the C JSON
  encoder. Apart ("1.0 tree"): building the encoded tree ckptproto's encoder holds for 1.0 (a
  ``tree.References``, one ``{"$torch": i}`` dict per reference, the JSON-able tree every
  consumer of an encoded state reads), which the column form would not need either.
- read: 1.0 as ckptproto's manifest reader does it (``manifest_text.split_members``: the C JSON
  scanner and its duplicate-key count, then ``tree.torch_column``, which the decode uses to
  take the column's indices); the column form by the same strict parser, with the duplicate-key
  check a reader owes (F-6), until the keys and indices are in hand.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from collections.abc import Callable
from typing import Any

from ckptproto.format import json_text, manifest_text, strict_json
from ckptproto.tree import References, torch_column


def best_us(step: Callable[[], Any], count: int, repeat: int) -> float:
    """The best CPU time of ``repeat`` runs of ``step``, in microseconds per reference."""
    best = float("inf")
    for _ in range(repeat):
        gc.collect()
        gc.disable()
        try:
            start = time.process_time()
            step()
            best = min(best, time.process_time() - start)
        finally:
            gc.enable()
    return best * 1e6 / count


def measure(count: int, repeat: int) -> dict[str, float]:
    keys = [f"layers.{i // 8}.block.p{i % 8}" for i in range(count)]

    def tree_v1() -> dict[str, Any]:
        column = References(zip(keys, [{"$torch": i} for i in range(count)], strict=True))
        column.first = 0
        return {"trainer": {"global_step": 100}, "models": {"m": column}}

    encoded_v1 = tree_v1()

    def write_v1() -> str:
        return json_text.tree(encoded_v1)

    def write_column() -> str:
        column = {"$column": {"first": 0, "keys": keys}}
        tree = {"trainer": {"global_step": 100}, "models": {"m": column}}
        return json.dumps(tree, ensure_ascii=False, allow_nan=False, separators=(",", ":"))

    v1_doc = '{"state":' + write_v1() + "}"
    column_doc = '{"state":' + write_column() + "}"

    def read_v1() -> tuple[list[str], list[int]]:
        split = manifest_text.split_members(v1_doc)
        assert split is not None  # the writer's own text: the quick reader takes it
        node = split[0]["state"]["models"]["m"]
        indices = torch_column(node)
        assert indices is not None
        return list(node), indices

    def read_column() -> tuple[list[str], range]:
        column = strict_json.loads(column_doc)["state"]["models"]["m"]["$column"]
        names, first = column["keys"], column["first"]
        if len(set(names)) != len(names):
            raise ValueError("duplicate key")
        return names, range(first, first + len(names))

    v1_keys, v1_indices = read_v1()
    column_keys, column_indices = read_column()
    assert v1_keys == column_keys == keys and v1_indices == list(column_indices)
    return {
        "1.0 tree": best_us(tree_v1, count, repeat),
        "write 1.0": best_us(write_v1, count, repeat),
        "write column": best_us(write_column, count, repeat),
        "read 1.0": best_us(read_v1, count, repeat),
        "read column": best_us(read_column, count, repeat),
        "bytes 1.0": len(v1_doc) / count,
        "bytes column": len(column_doc) / count,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000, 300_000])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    print(f"state tree text, CPU us per reference (best of {args.repeat}); ratio: 1.0 / column")
    print(
        f"{'references':>10} | {'write 1.0':>9} {'column':>7} {'ratio':>6} | {'read 1.0':>8} {'column':>7} "
        f"{'ratio':>6} | {'1.0 tree':>8} | bytes 1.0 / column"
    )
    for count in args.counts:
        m = measure(count, args.repeat)
        print(
            f"{count:>10,} | {m['write 1.0']:9.3f} {m['write column']:7.3f} "
            f"{m['write 1.0'] / m['write column']:6.1f} | {m['read 1.0']:8.3f} {m['read column']:7.3f} "
            f"{m['read 1.0'] / m['read column']:6.1f} | {m['1.0 tree']:8.3f} | "
            f"{m['bytes 1.0']:.1f} / {m['bytes column']:.1f}"
        )


if __name__ == "__main__":
    main()
