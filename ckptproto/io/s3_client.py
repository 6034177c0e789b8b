"""The S3 client of the object-store backend: obstore (the Rust ``object_store`` crate), imported
lazily, configured from the standard AWS environment, and its errors turned into ckptproto's::

    store = s3_client.store("bucket")                  # obstore S3Store, cached per process
    try:
        obstore.head(store, key)
    except Exception as exc:
        raise s3_client.failure(exc, url, "reading") from exc

Why obstore: against a local S3 server it downloaded a 256 MiB object 3.4x faster than boto3
with ranged GETs on 8 threads, moved 2,000 small objects 1.4-1.7x faster, uploaded at the same
speed, and is one 5.6 MB wheel without Python dependencies (boto3 + botocore: 16 MB wheels,
31 MB installed, plus s3transfer, jmespath, dateutil, urllib3).
"""

from __future__ import annotations

import os
import threading
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from ckptproto.errors import CheckpointError, CheckpointNotFoundError, CheckpointWriteError

if TYPE_CHECKING:
    from obstore.store import ClientConfig, S3Store

INSTALL_HINT = "pip install 'ckptproto[s3]'"
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION (or AWS_DEFAULT_REGION) "
    "and AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL)"
)
# What configures a store: a change in any of them (tests switch endpoints) makes a new one.
_ENVIRONMENT = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL_S3",
    "AWS_ENDPOINT_URL",
)

_lock = threading.Lock()
_stores: dict[tuple[object, ...], S3Store] = {}


def obstore_module() -> Any:
    """The obstore module, or a CheckpointError saying how to install it."""
    try:
        import obstore
    except ImportError as exc:
        raise CheckpointError(f"s3:// checkpoints need the obstore library: {INSTALL_HINT} ({exc})") from exc
    return obstore


def store(bucket: str) -> S3Store:
    """The store for ``bucket`` as the environment configures it now (one per process and
    configuration: the Rust runtime behind it does not survive a fork)."""
    obstore_module()
    from obstore.store import S3Store

    settings = tuple(os.environ.get(name) for name in _ENVIRONMENT)
    key = (os.getpid(), bucket, settings)
    with _lock:
        found = _stores.get(key)
        if found is None:
            found = _stores[key] = S3Store(
                bucket,
                **_config(),
                client_options=_client_options(),
                # The default retries for 3 minutes: a wrong endpoint should fail sooner.
                retry_config={"max_retries": 5, "retry_timeout": timedelta(seconds=60)},
            )
        return found


def _config() -> dict[str, Any]:
    env = os.environ
    config: dict[str, Any] = {}
    for option, names in (
        ("access_key_id", ("AWS_ACCESS_KEY_ID",)),
        ("secret_access_key", ("AWS_SECRET_ACCESS_KEY",)),
        ("session_token", ("AWS_SESSION_TOKEN",)),
        ("region", ("AWS_REGION", "AWS_DEFAULT_REGION")),
        ("endpoint", ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")),
    ):
        value = next((env[n] for n in names if env.get(n)), None)
        if value is not None:
            config[option] = value
    return config


def _client_options() -> ClientConfig:
    endpoint = str(_config().get("endpoint", ""))
    # A large part to a slow store can take longer than the 30 s request default.
    return {"allow_http": endpoint.startswith("http://"), "timeout": "600s", "connect_timeout": "30s"}


def is_not_found(exc: BaseException) -> bool:
    """The object (or the bucket) is not there."""
    return isinstance(exc, FileNotFoundError)


def is_conflict(exc: BaseException) -> bool:
    """A conditional request lost: the object exists (412/409) or changed."""
    module = obstore_module()
    errors = module.exceptions
    return isinstance(exc, (errors.AlreadyExistsError, errors.PreconditionError))


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


def failure(exc: BaseException, url: object, doing: str, *, write: bool = False) -> CheckpointError:
    """The ckptproto error for a client error while ``doing`` something to ``url``."""
    if isinstance(exc, CheckpointError):
        return exc
    text = str(exc)
    if "NoSuchBucket" in text:
        bucket = str(url).split("/")[2] if str(url).count("/") >= 2 else str(url)
        return CheckpointNotFoundError(
            f"{url}: the bucket {bucket!r} does not exist at this endpoint ({doing}); create it, "
            f"or check AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL"
        )
    module = obstore_module()
    errors = module.exceptions
    if isinstance(exc, (errors.PermissionDeniedError, errors.UnauthenticatedError)) or any(
        code in text
        for code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403 Forbidden")
    ):
        return CheckpointError(
            f"{url}: access denied while {doing} ({_first_line(exc)}); ckptproto reads the "
            f"credentials and endpoint from {CREDENTIAL_VARIABLES}"
        )
    kind = CheckpointWriteError if write else CheckpointError
    return kind(f"{url}: {doing} failed: {_first_line(exc)}")
