"""A real S3-compatible server for the tests: moto's standalone server in a subprocess on
127.0.0.1 (a pytest plugin, registered in conftest.py).

- ``s3_server`` (session): the endpoint URL; the server is started once and killed at the end.
- ``s3_url`` (function): sets the AWS_* variables (monkeypatch) and returns a fresh, empty
  prefix ``s3://ckptproto-test/<uuid>`` as a string. Tests parametrized over storage roots call
  ``request.getfixturevalue("s3_url")``.
- :func:`s3_env`: the variables a subprocess needs to reach the server.

Skips with the reason where moto or obstore is missing.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator

import pytest

BUCKET = "ckptproto-test"
_endpoint: str | None = None


def start_server(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start a moto server on a free port of 127.0.0.1; (process, endpoint URL)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(extra_env or {})},
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                raise RuntimeError(f"the moto server did not start at {endpoint}") from None
            time.sleep(0.1)
    return process, endpoint


def _environment(endpoint: str) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
    }


def create_bucket(endpoint: str, bucket: str) -> None:
    """Create a bucket with a plain signed-less PUT (moto accepts it; no boto3 needed)."""
    request = urllib.request.Request(f"{endpoint}/{bucket}", method="PUT")
    with urllib.request.urlopen(request, timeout=30):
        pass


def s3_env() -> dict[str, str]:
    """The AWS_* variables for the session's server (for subprocesses); only inside a test that
    uses ``s3_url`` or ``s3_server``."""
    if _endpoint is None:
        raise RuntimeError("s3_env() needs the s3_server fixture")
    return _environment(_endpoint)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    global _endpoint
    for module in ("moto", "obstore"):
        pytest.importorskip(module, reason=f"s3 tests need {module}: pip install -e '.[test]'")
    process, endpoint = start_server()
    try:
        create_bucket(endpoint, BUCKET)
        _endpoint = endpoint
        yield endpoint
    finally:
        _endpoint = None
        process.kill()
        process.wait()


@pytest.fixture
def s3_url(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in _environment(s3_server).items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return f"s3://{BUCKET}/{uuid.uuid4().hex}"
