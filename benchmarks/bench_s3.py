"""Save and load to an S3-compatible server: ckptproto (s3://) vs DCP with its fsspec storage
(s3fs), and the client library alone moving the same bytes as one object (the floor)::

    python benchmarks/bench_s3.py                        # 256 MiB in 32 tensors; 5,000 small ones
    python benchmarks/bench_s3.py --rounds 5 --mib 512 --small 20000

The server is moto's, started here on 127.0.0.1 (``pip install -e '.[test]'`` brings moto,
obstore and s3fs). moto is a Python server, on the same cores as the client: expect it to be
the bottleneck (the raw floor shows how fast it can take the bytes at all), so ratios say more
than seconds, and they are of this server, not of AWS.

Rounds are interleaved (the order of methods rotates each round); the table prints medians.
ckptproto's load checks every file's CRC-32 and the manifest; DCP's checks nothing. Loads fill
targets allocated before the clock starts (``load_into`` and ``dcp.load``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import ckptproto

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _s3_server import create_bucket, start_server  # the tests' server: one way to start moto

warnings.filterwarnings("ignore")
BUCKET = "ckptproto-bench"
MiB = 1 << 20


def big_state(mib: int, count: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    numel = mib * MiB // 4 // count
    return {f"layers.{i}.weight": torch.randn(numel, generator=g) for i in range(count)}


def small_state(count: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    data = torch.randn(count, 64, generator=g)
    return {f"layers.{i // 8}.p{i % 8}": data[i].clone() for i in range(count)}


def _zeros_like(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.zeros_like(v) for k, v in state.items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "loaded state differs"


def _delete_prefix(prefix: str) -> None:
    import obstore

    from ckptproto.io import s3_client

    store = s3_client.store(BUCKET)
    paths = [o["path"] for batch in obstore.list(store, prefix) for o in batch]
    if paths:
        obstore.delete(store, paths)


def _reader_on_seam() -> bool:
    """ckptproto's reader reads s3:// (the storage seam's reader refactor is in)."""
    from ckptproto.io import local_storage

    try:
        local_storage.LOCAL.open(Path("."))
    except NotImplementedError:
        return False
    except Exception:
        return True
    return True


READER_ON_SEAM = _reader_on_seam()


def _read_files_verified(url: str) -> float:
    """Where the reader cannot read s3:// yet: every data file read whole through the S3
    generation (concurrent ranged GETs) and its CRC checked, without decoding tensors."""
    import zlib

    from ckptproto.format.manifest import Manifest
    from ckptproto.io import backends

    t = time.perf_counter()
    storage, final = backends.resolve(url)
    with storage.open(final) as generation:
        manifest = Manifest.parse(generation.read_manifest(), url)
        for name, entry in manifest.files.items():
            data = generation.open_file(name)
            whole = bytearray(data.size)
            data.read_into(0, [memoryview(whole)])
            assert f"crc32:{zlib.crc32(whole):08x}" == entry.checksum
    return time.perf_counter() - t


Step = Callable[[str], float]  # runs against a fresh prefix; returns seconds


def methods(state: dict[str, torch.Tensor], endpoint: str) -> dict[str, tuple[Step, Step]]:
    """name -> (save, load) timed on a prefix; load reads what save wrote there."""
    import obstore
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    from ckptproto.io import s3_client

    fs_options = {"endpoint_url": endpoint, "key": "x", "secret": "x"}

    def ck_save(prefix: str) -> float:
        t = time.perf_counter()
        ckptproto.save(state, f"s3://{BUCKET}/{prefix}/ck")
        return time.perf_counter() - t

    def ck_load(prefix: str) -> float:
        url = f"s3://{BUCKET}/{prefix}/ck"
        if not READER_ON_SEAM:
            return _read_files_verified(url)
        target = _zeros_like(state)
        t = time.perf_counter()
        ckptproto.load_into(url, target)
        took = time.perf_counter() - t
        _same(target, state)
        return took

    def dcp_save(prefix: str) -> float:
        t = time.perf_counter()
        dcp.save(state, storage_writer=FsspecWriter(f"s3://{BUCKET}/{prefix}/dcp", **fs_options))
        return time.perf_counter() - t

    def dcp_load(prefix: str) -> float:
        target = _zeros_like(state)
        t = time.perf_counter()
        dcp.load(target, storage_reader=FsspecReader(f"s3://{BUCKET}/{prefix}/dcp", **fs_options))
        took = time.perf_counter() - t
        _same(target, state)
        return took

    blob = bytearray(sum(v.numel() * v.element_size() for v in state.values()))
    at = 0
    for v in state.values():
        raw = v.numpy().view(np.uint8).reshape(-1)
        blob[at : at + raw.size] = raw.tobytes()
        at += raw.size

    def raw_save(prefix: str) -> float:
        t = time.perf_counter()
        obstore.put(s3_client.store(BUCKET), f"{prefix}/raw", memoryview(blob), chunk_size=16 * MiB)
        return time.perf_counter() - t

    def raw_load(prefix: str) -> float:
        out = bytearray(len(blob))
        t = time.perf_counter()
        starts = list(range(0, len(blob), 16 * MiB))
        ends = [min(len(blob), s + 16 * MiB) for s in starts]
        view = memoryview(out)
        for s, e, got in zip(
            starts,
            ends,
            obstore.get_ranges(s3_client.store(BUCKET), f"{prefix}/raw", starts=starts, ends=ends),
            strict=True,
        ):
            view[s:e] = got
        took = time.perf_counter() - t
        assert out == blob
        return took

    return {
        "ckptproto": (ck_save, ck_load),
        "DCP+s3fs": (dcp_save, dcp_load),
        "raw obstore": (raw_save, raw_load),
    }


def run(label: str, state: dict[str, torch.Tensor], endpoint: str, rounds: int) -> None:
    table = methods(state, endpoint)
    names = list(table)
    times: dict[str, dict[str, list[float]]] = {n: {"save": [], "load": []} for n in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            prefix = f"{label}-{uuid.uuid4().hex[:8]}"
            save, load = table[name]
            times[name]["save"].append(save(prefix))
            times[name]["load"].append(load(prefix))
            _delete_prefix(prefix)
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    print(f"\n{label}: {len(state)} tensors, {nbytes / MiB:.1f} MiB, median of {rounds} rounds")
    print(f"{'method':14} {'save s':>8} {'load s':>8} {'save MiB/s':>11} {'load MiB/s':>11}")
    med = {n: {k: statistics.median(v) for k, v in times[n].items()} for n in names}
    for n in names:
        s, lo = med[n]["save"], med[n]["load"]
        print(f"{n:14} {s:8.2f} {lo:8.2f} {nbytes / MiB / s:11.1f} {nbytes / MiB / lo:11.1f}")
    ck, dc = med["ckptproto"], med["DCP+s3fs"]
    print(
        f"ratio ckptproto/DCP: save {ck['save'] / dc['save']:.2f}, load {ck['load'] / dc['load']:.2f} "
        "(<1: ckptproto is faster)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--tensors", type=int, default=32)
    parser.add_argument("--small", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    process, endpoint = start_server()
    try:
        create_bucket(endpoint, BUCKET)
        os.environ.update(
            AWS_ENDPOINT_URL_S3=endpoint,
            AWS_ACCESS_KEY_ID="x",
            AWS_SECRET_ACCESS_KEY="x",
            AWS_REGION="us-east-1",
        )
        print(f"moto server at {endpoint}; torch {torch.__version__}, ckptproto {ckptproto.__version__}")
        if not READER_ON_SEAM:
            print("ckptproto load: the reader does not read s3:// yet; timing the files read whole + CRC")
        run("big", big_state(args.mib, args.tensors), endpoint, args.rounds)
        run("small", small_state(args.small), endpoint, args.rounds)
    finally:
        process.kill()
        process.wait()


if __name__ == "__main__":
    main()
