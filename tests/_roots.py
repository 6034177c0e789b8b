"""Checkpoint roots on every storage backend (a pytest plugin registered by conftest.py).

``checkpoint_root`` is a fresh, empty location for checkpoints, once per backend::

    def test_retention(checkpoint_root: Location) -> None:
        cb = CheckpointCallback(CheckpointParameters(root_dir=checkpoint_root, keep_top_k=2))
        ...
        assert names(checkpoint_root) == ["checkpoint_step_2", "checkpoint_step_3"]

``local``: ``tmp_path / "ckpts"``; ``s3``: a fresh ``s3://ckptproto-test/<uuid>`` prefix on the
moto server of ``tests/_s3_server.py`` (its ``s3_url`` fixture). Where that fixture or the S3
backend is not there, the s3 variant skips and says why. Assertions look at what is stored
through the storage (``names``, ``committed``), so the same assertion runs on both.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ckptproto.errors import CheckpointError
from ckptproto.io.backends import resolve
from ckptproto.location import Location, ObjectLocation, parse_location

BACKENDS = ["local", "s3"]


def _s3_location(request: pytest.FixtureRequest) -> ObjectLocation:
    try:
        url = request.getfixturevalue("s3_url")
    except pytest.FixtureLookupError as exc:
        pytest.skip(f"s3 backend not available: no s3_url fixture ({exc.argname})")
    location = parse_location(str(url))
    assert isinstance(location, ObjectLocation), url
    try:
        resolve(location)
    except CheckpointError as exc:
        pytest.skip(f"s3 backend not available: {exc}")
    return location


@pytest.fixture(params=BACKENDS)
def checkpoint_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Location:
    """An empty location to put checkpoints under, on the local file system and on S3."""
    if request.param == "local":
        return tmp_path_factory.mktemp("root") / "ckpts"
    return _s3_location(request)


@pytest.fixture
def s3_root(request: pytest.FixtureRequest) -> ObjectLocation:
    """An empty S3 location (skips where the S3 backend or its test server is not there)."""
    return _s3_location(request)


@pytest.fixture
def s3_available(s3_root: ObjectLocation) -> None:
    """Skips unless the S3 backend resolves ``s3://`` URLs here."""


def names(location: Location) -> list[str]:
    """The names directly under ``location`` as its storage lists them (hidden ones too)."""
    storage, where = resolve(location)
    return [entry.name for entry in storage.entries(where)]


def visible(location: Location) -> list[str]:
    """The names directly under ``location`` that are not hidden (leftovers, trash)."""
    return [name for name in names(location) if not name.startswith(".")]


def committed(location: Location) -> bool:
    """Whether a committed checkpoint stands at ``location``."""
    storage, where = resolve(location)
    return storage.is_committed(where)


def exists(location: Location) -> bool:
    """Whether anything stands at ``location``."""
    storage, where = resolve(location)
    return storage.exists(where)


def backend_env(location: Location) -> dict[str, str]:
    """The environment a subprocess (a rank forked from a server started earlier) needs to
    reach ``location``'s storage: the S3 test server's AWS_* variables, or nothing locally."""
    if isinstance(location, Path):
        return {}
    from _s3_server import s3_env

    return s3_env()


def arg(location: Location) -> str:
    """``location`` as the public API and the CLI take it (a path or a URL as text)."""
    return str(location)
