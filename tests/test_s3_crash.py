"""A save to S3 killed with SIGKILL mid-upload (a real subprocess, a real S3 server): nothing
becomes visible, nothing committed is lost, and the sweep removes the orphans only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

from ckptproto.errors import CheckpointNotFoundError
from ckptproto.format.manifest import Manifest
from ckptproto.io import s3_storage
from ckptproto.location import ObjectLocation, parse_location

MiB = 1 << 20
SIZE = 200 * MiB
# The child: one save of argv[2] bytes in 5 MiB parts, then it says so. With argv[3] ==
# "mid-upload" its data file's bytes stop coming after 12 MiB (two parts reach the server, the
# rest never: the kill always lands mid-upload, however slow the machine; a kill timed by the
# clock once landed after the upload had completed). With "hang-at-commit" it stops before the
# manifest (every data object uploaded).
CHILD = """
import sys, time, numpy as np, ckptproto
from ckptproto.io import s3_storage
if sys.argv[3] == "hang-at-commit":
    s3_storage.S3Storage.commit = lambda *args, **kwargs: time.sleep(3600)
if sys.argv[3] == "mid-upload":
    upload = s3_storage.S3Storage._upload
    def stalling(self, final, name, size, views):
        def chunks():
            sent = 0
            for view in views:
                for at in range(0, len(view), 1 << 20):
                    if sent >= 12 << 20:
                        time.sleep(3600)
                    yield view[at : at + (1 << 20)]
                    sent += len(view[at : at + (1 << 20)])
        return upload(self, final, name, size, chunks())
    s3_storage.S3Storage._upload = stalling
n = int(sys.argv[2]) // 4
ckptproto.save({"w": np.arange(n, dtype=np.float32), "step": 2}, sys.argv[1], overwrite=True)
print("committed", flush=True)
"""


def _loc(url: str) -> ObjectLocation:
    loc = parse_location(url)
    assert isinstance(loc, ObjectLocation)
    return loc


def _verified(url: str) -> dict[str, object]:
    """The checkpoint at ``url`` read whole through its generation, every file's size and CRC
    checked against the manifest; its state."""
    with s3_storage.S3.open(_loc(url)) as generation:
        manifest = Manifest.parse(generation.read_manifest(), url)
        for name, entry in manifest.files.items():
            data = generation.open_file(name)
            whole = bytearray(data.size)
            assert data.size == entry.size and data.read_into(0, [memoryview(whole)]) == entry.size
            assert f"crc32:{zlib.crc32(whole):08x}" == entry.checksum, name
        return dict(manifest.state)


def _uploading(url: str) -> bool:
    """Some part of a multipart upload under ``url`` has reached the server."""
    import boto3

    client = boto3.client("s3")
    loc = _loc(url)
    uploads = client.list_multipart_uploads(Bucket=loc.bucket, Prefix=loc.key + "/").get("Uploads", [])
    return any(
        client.list_parts(Bucket=loc.bucket, Key=u["Key"], UploadId=u["UploadId"]).get("Parts")
        for u in uploads
    )


def _uploaded(url: str, known: list[str]) -> bool:
    """A data object of the dying save is complete."""
    return any(
        e.name.endswith(".safetensors") and e.name not in known for e in s3_storage.S3.entries(_loc(url))
    )


@pytest.mark.parametrize(
    ("target", "when"),
    [("new", "mid-upload"), ("overwrite", "mid-upload"), ("overwrite", "hang-at-commit")],
)
def test_a_killed_save_commits_nothing_and_loses_nothing(s3_url: str, target: str, when: str) -> None:
    from _s3_server import s3_env

    import ckptproto

    pytest.importorskip("boto3")
    storage = s3_storage.S3
    sibling, url = s3_url + "/step_0", s3_url + "/step_1"
    ckptproto.save({"w": np.ones(1000, dtype=np.float32), "step": 0}, sibling)
    if target == "overwrite":
        ckptproto.save({"w": np.zeros(1000, dtype=np.float32), "step": 1}, url)
    before = {name: sorted(e.name for e in storage.entries(_loc(name))) for name in (sibling, url)}
    env = {
        **os.environ,
        **s3_env(),
        "CKPTPROTO_S3_PART_BYTES": str(5 * MiB),
        "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, url, str(SIZE if when == "mid-upload" else MiB), when],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        caught = _uploading if when == "mid-upload" else (lambda u: _uploaded(u, before[url]))
        while not caught(url):
            assert child.poll() is None, "the save ended before it was caught uploading"
            assert time.monotonic() < deadline, "no upload seen in 120 s"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        output, _ = child.communicate()
    assert "committed" not in output
    # Nothing visible: a new name holds no checkpoint, an overwritten one still the old one.
    loc = _loc(url)
    if target == "new":
        assert not storage.is_committed(loc)
        with pytest.raises(CheckpointNotFoundError):
            ckptproto.load(url)
    else:
        assert storage.is_committed(loc)
        assert _verified(url)["step"] == 1
        assert ckptproto.verify(url).step is None and ckptproto.load(url)["step"] == 1
    assert _verified(sibling)["step"] == 0
    assert ckptproto.load(sibling)["step"] == 0
    # The dead save left its marker (and mid-upload an open multipart upload, invisible; at
    # the commit its data object).
    leftovers = sorted(set(e.name for e in storage.entries(loc)) - set(before[url]))
    kinds = sorted(".safetensors" if n.endswith(".safetensors") else n.split(".")[1] for n in leftovers)
    expected = ["ckptproto-writing"] + ([] if when == "mid-upload" else [".safetensors"])
    assert kinds == sorted(expected), leftovers
    # A sweep with a grace period keeps it (it may be alive), one without removes only it.
    assert storage.remove_leftovers(_loc(s3_url)) == []
    removed = s3_storage.S3Storage(sweep_grace_s=0).remove_leftovers(_loc(s3_url))
    assert sorted(r.name for r in removed) == leftovers
    after = {name: sorted(e.name for e in storage.entries(_loc(name))) for name in (sibling, url)}
    assert after == before
    assert _verified(sibling)["step"] == 0
    if target == "overwrite":
        assert _verified(url)["step"] == 1
    # The name is free for a retry.
    ckptproto.save({"w": np.ones(10, dtype=np.float32), "step": 3}, url, overwrite=True)
    assert _verified(url)["step"] == 3
    assert ckptproto.load(url)["step"] == 3
