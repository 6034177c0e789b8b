"""Why the S3 backend uses obstore: obstore vs boto3 moving the same bytes with the same requests
against a moto server started here on 127.0.0.1::

    python benchmarks/bench_s3_clients.py            # 256 MiB object; 2,000 objects of 1 kB

Per client, interleaved rounds, medians: a multipart upload (16 MiB parts, 8 in flight), one
GET of the whole object, 16 ranged GETs of 16 MiB on 8 threads; then 2,000 small PUTs and GETs
on 8 threads. moto is the bottleneck for the large transfers (it copies the whole object for
every ranged GET), so the small-object figures say most about the clients themselves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _s3_server import create_bucket, start_server

MiB = 1 << 20
PART = 16 * MiB
BUCKET = "clients"


def _boto3(endpoint: str, data: bytes, pool: ThreadPoolExecutor) -> dict[str, Callable[[str], object]]:
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        config=Config(
            max_pool_connections=16,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )
    n = len(data)

    def upload(key: str) -> None:
        up = client.create_multipart_upload(Bucket=BUCKET, Key=key)["UploadId"]

        def part(i: int) -> dict[str, object]:
            body = data[i * PART : (i + 1) * PART]
            etag = client.upload_part(Bucket=BUCKET, Key=key, UploadId=up, PartNumber=i + 1, Body=body)[
                "ETag"
            ]
            return {"PartNumber": i + 1, "ETag": etag}

        parts = list(pool.map(part, range(-(-n // PART))))
        client.complete_multipart_upload(
            Bucket=BUCKET, Key=key, UploadId=up, MultipartUpload={"Parts": parts}
        )

    def get(key: str) -> bytes:
        return bytes(client.get_object(Bucket=BUCKET, Key=key)["Body"].read())

    def ranges(key: str) -> bytes:
        out = bytearray(n)

        def one(i: int) -> None:
            rng = f"bytes={i * PART}-{min(n, (i + 1) * PART) - 1}"
            out[i * PART : (i + 1) * PART] = client.get_object(Bucket=BUCKET, Key=key, Range=rng)[
                "Body"
            ].read()

        list(pool.map(one, range(-(-n // PART))))
        return bytes(out)

    return {
        "upload": upload,
        "get": get,
        "ranges": ranges,
        "put_small": lambda key: client.put_object(Bucket=BUCKET, Key=key, Body=data[:1000]),
        "get_small": lambda key: client.get_object(Bucket=BUCKET, Key=key)["Body"].read(),
        "delete": lambda key: client.delete_object(Bucket=BUCKET, Key=key),
    }


def _obstore(endpoint: str, data: bytes, pool: ThreadPoolExecutor) -> dict[str, Callable[[str], object]]:
    import obstore
    from obstore.store import S3Store

    store = S3Store(BUCKET, endpoint=endpoint, client_options={"allow_http": True})
    n = len(data)

    def ranges(key: str) -> bytes:
        out = bytearray(n)

        def one(i: int) -> None:
            out[i * PART : (i + 1) * PART] = obstore.get_range(
                store, key, start=i * PART, end=min(n, (i + 1) * PART)
            )

        list(pool.map(one, range(-(-n // PART))))
        return bytes(out)

    return {
        "upload": lambda key: obstore.put(store, key, memoryview(data), chunk_size=PART, max_concurrency=8),
        "get": lambda key: bytes(obstore.get(store, key).bytes()),
        "ranges": ranges,
        "put_small": lambda key: obstore.put(store, key, data[:1000]),
        "get_small": lambda key: bytes(obstore.get(store, key).bytes()),
        "delete": lambda key: obstore.delete(store, key),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    process, endpoint = start_server()
    try:
        create_bucket(endpoint, BUCKET)
        os.environ.update(AWS_ACCESS_KEY_ID="x", AWS_SECRET_ACCESS_KEY="x", AWS_REGION="us-east-1")
        data = os.urandom(args.mib * MiB)
        pool = ThreadPoolExecutor(8)
        clients = {"boto3": _boto3(endpoint, data, pool), "obstore": _obstore(endpoint, data, pool)}
        steps = ["upload", "get", "ranges", "small puts", "small gets"]
        times: dict[str, dict[str, list[float]]] = {c: {s: [] for s in steps} for c in clients}
        for r in range(args.rounds):
            for name in list(clients)[r % 2 :] + list(clients)[: r % 2]:
                ops, key, mark = clients[name], f"{name}-{r}", time.perf_counter()
                took = times[name]
                ops["upload"](key)
                took["upload"].append(time.perf_counter() - mark)
                for step in ("get", "ranges"):
                    mark = time.perf_counter()
                    assert ops[step](key) == data
                    took[step].append(time.perf_counter() - mark)
                ops["delete"](key)
                keys = [f"{key}/s{i}" for i in range(args.small)]
                for step, op in (("small puts", "put_small"), ("small gets", "get_small")):
                    mark = time.perf_counter()
                    list(pool.map(ops[op], keys))
                    took[step].append(time.perf_counter() - mark)
        print(
            f"moto at {endpoint}: {args.mib} MiB object, {args.small} x 1 kB, median of {args.rounds} rounds (s)"
        )
        print(f"{'client':8}" + "".join(f"{s:>12}" for s in steps))
        for name in clients:
            print(f"{name:8}" + "".join(f"{statistics.median(times[name][s]):12.2f}" for s in steps))
    finally:
        process.kill()
        process.wait()


if __name__ == "__main__":
    main()
