"""The storage seam: the save pipeline reaches its backend only through ``Storage``; a URL no
backend serves is refused by every entry point before anything is written."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptproto
from ckptproto.errors import CheckpointError
from ckptproto.format.manifest import FileEntry
from ckptproto.io import backends, local_storage, pipeline
from ckptproto.io.coordinate import Solo
from ckptproto.io.plan import FilePlan
from ckptproto.io.prepare import prepare

URLS = ["gs://bucket/step_1", "file://tmp/x"]  # s3:// is served: tests/test_s3_storage.py

ENTRY_POINTS: dict[str, Any] = {
    "save": lambda url: ckptproto.save({"w": np.ones(2)}, url),
    "load": lambda url: ckptproto.load(url),
    "load_into": lambda url: ckptproto.load_into(url, {"w": np.ones(2)}),
    "verify": lambda url: ckptproto.verify(url),
    "read_info": lambda url: ckptproto.read_info(url),
    "save_async": lambda url: ckptproto.AsyncSaver().save({"w": np.ones(2)}, url),
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("url", URLS)
def test_a_url_without_a_backend_is_refused_and_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, entry: str, url: str
) -> None:
    # Was: "s3://bucket/..." became a local folder named "s3:" (or a not-found error naming it).
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError, match=r"no storage backend for \w+:// URLs.*mount") as caught:
        ENTRY_POINTS[entry](url)
    assert url in str(caught.value)
    assert list(tmp_path.iterdir()) == []


class _Recording:
    """A real backend (the local one) that records the calls the pipeline makes."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.inner = local_storage.LocalStorage()

    def begin(self, final: Path, *, overwrite: bool) -> str:
        self.calls.append("begin")
        return self.inner.begin(final, overwrite=overwrite)

    def data_file_name(self, staging: str, rank: int) -> str:
        return self.inner.data_file_name(staging, rank)

    def write_file(self, staging: str, plan: FilePlan, sources: Sequence[memoryview]) -> FileEntry:
        self.calls.append(f"write_file {plan.name}")
        return self.inner.write_file(staging, plan, sources)

    def write_small_file(self, staging: str, name: str, data: bytes) -> None:
        self.calls.append(f"write_small_file {name}")
        self.inner.write_small_file(staging, name, data)

    def commit(self, staging: str, final: Path, *, overwrite: bool) -> None:
        self.calls.append("commit")
        self.inner.commit(staging, final, overwrite=overwrite)

    def abort(self, staging: str) -> None:
        self.calls.append("abort")
        self.inner.abort(staging)


def test_the_pipeline_writes_only_through_its_storage(tmp_path: Path) -> None:
    backend = _Recording()
    prepared = prepare({"w": np.arange(3.0), "step": 1}, None, Solo())
    sources = [memoryview(np.ascontiguousarray(leaf.value)).cast("B") for leaf in prepared.share.leaves]
    pipeline.run(
        tmp_path / "c",
        prepared.share,
        prepared.metadata_tree,
        sources,
        Solo(),
        overwrite=False,
        storage=backend,
    )
    assert backend.calls == [
        "begin",
        "write_file data-00000-000.safetensors",
        "write_small_file manifest.json",
        "commit",
    ]
    assert np.array_equal(ckptproto.load(tmp_path / "c")["w"], np.arange(3.0))
    # A failed save aborts through the same backend and leaves nothing.
    backend.calls.clear()
    with pytest.raises(ckptproto.CheckpointExistsError):
        pipeline.run(
            tmp_path / "c",
            prepared.share,
            prepared.metadata_tree,
            sources,
            Solo(),
            overwrite=False,
            storage=backend,
        )
    assert backend.calls == ["begin"]
    bad = [memoryview(b"short")]
    with pytest.raises(CheckpointError, match="planned"):
        pipeline.run(
            tmp_path / "d",
            prepared.share,
            prepared.metadata_tree,
            bad,
            Solo(),
            overwrite=False,
            storage=backend,
        )
    assert backend.calls[-1] == "abort"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]


def test_resolve_gives_the_local_backend_for_paths(tmp_path: Path) -> None:
    backend, final = backends.resolve(tmp_path / "c")
    assert backend is local_storage.LOCAL and final == tmp_path / "c"
    assert backends.resolve("relative/dir")[1] == Path("relative/dir")
