"""Hostile checkpoints: the manifest and data-file readers get malformed JSON, lying headers,
huge shapes, negative and overlapping offsets, deep nesting, unknown dtypes and names that try
to escape the directory. Only CheckpointError subclasses come out, within bounded memory and
time, nothing outside the checkpoint directory is opened, and nothing is ever unpickled.

Hostile manifests are written without ``manifest_checksum`` and with a foreign ``writer``,
so every input reaches the validation behind the checksum. ``CKPTPROTO_STRESS=1`` runs ten
times more examples.
"""

from __future__ import annotations

import ast
import copy
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _reliability import STRESS, report
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptproto
from ckptproto.format import layout
from ckptproto.format.crc import format_checksum
from ckptproto.format.manifest import CHECKSUM_KEY

EXAMPLES = 3000 if STRESS else 200
MEMORY_LIMIT = 64 << 20  # traced bytes one hostile input may make ckptproto allocate
TIME_LIMIT_S = 20  # a hang detector, not a timing assertion
FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=not STRESS,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
DATA = "data-00000-000.safetensors"
COUNTS: dict[str, int] = {}


def base_state() -> dict[str, Any]:
    return {
        "a": np.arange(5),
        "m": {"b": np.ones((2, 3), np.float32), "t": torch.arange(4, dtype=torch.float16)},
        "opt": {"state": {0: {"step": 3}}, "groups": [{"lr": 0.1, "params": [0]}]},
        "trainer": {"global_step": 3},
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], bytes]:
    root = tmp_path_factory.mktemp("base")
    ckptproto.save(base_state(), root / "ckpt")
    doc = json.loads((root / "ckpt" / layout.MANIFEST_NAME).read_text())
    del doc[CHECKSUM_KEY]
    doc["writer"] = "fuzz"
    return doc, (root / "ckpt" / DATA).read_bytes()


@contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"a hostile input kept the reader busy for {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def read_everything(ckpt: Path) -> str:
    """Every reader entry point on ``ckpt``; returns 'accepted' or 'rejected'. Anything but a
    CheckpointError (or success) fails the test; so does a big allocation or a hang."""
    outcome = "accepted"
    target = {"a": np.zeros(5, dtype=np.int64), "m": {"b": np.zeros((2, 3), np.float32)}}
    calls: list[Callable[[], Any]] = [
        lambda: ckptproto.read_manifest(ckpt),
        lambda: ckptproto.read_info(ckpt),
        lambda: ckptproto.verify(ckpt),
        lambda: ckptproto.load(ckpt),
        lambda: ckptproto.load(ckpt, mmap=True, verify=True),
        lambda: ckptproto.load_into(ckpt, target, strict=False),
    ]
    tracemalloc.start()
    try:
        for call in calls:
            tracemalloc.reset_peak()
            try:
                with time_limit(TIME_LIMIT_S):
                    call()
            except ckptproto.CheckpointError:
                outcome = "rejected"
            peak = tracemalloc.get_traced_memory()[1]
            assert peak < MEMORY_LIMIT, f"a hostile input made the reader allocate {peak} bytes"
    finally:
        tracemalloc.stop()
    return outcome


def write_checkpoint(ckpt: Path, manifest: bytes, data: bytes) -> None:
    if ckpt.exists():
        shutil.rmtree(ckpt)
    ckpt.mkdir(parents=True)
    (ckpt / DATA).write_bytes(data)
    (ckpt / layout.MANIFEST_NAME).write_bytes(manifest)


def count(name: str, outcome: str) -> None:
    COUNTS[f"{name} {outcome}"] = COUNTS.get(f"{name} {outcome}", 0) + 1


# -- strategies -----------------------------------------------------------------------------------

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**62, 2**63, 2**64, -(2**63)]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(
        [
            "../x.safetensors",
            "/etc/passwd",
            "../../../../tmp/escape.safetensors",
            "data-00000-000.safetensors/../../x",
            ".hidden.safetensors",
            "float128",
            "complex32",
            "U8",
            "$numpy",
            "$torch",
            "crc32:00000000",
            "2.0",
            "1.99",
        ]
    ),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=8), st.sampled_from(["$numpy", "$torch", "$tuple"])),
            children,
            max_size=4,
        ),
    ),
    max_leaves=12,
)


def paths_of(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += paths_of(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += paths_of(v, (*prefix, i))
    return out


def replaced(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    doc = copy.deepcopy(doc)
    if not path:
        return value
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return doc


def deep(depth: int, kind: str) -> str:
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


# -- the manifest reader --------------------------------------------------------------------------


@FUZZ_SETTINGS
@given(data=st.data())
def test_hostile_manifests(base: tuple[dict[str, Any], bytes], tmp_path: Path, data: st.DataObject) -> None:
    doc, data_file = base
    ckpt = tmp_path / "ckpt"
    how = data.draw(st.sampled_from(["replace", "replace", "replace", "delete", "bytes", "deep", "dtype"]))
    # Half of them in the writer's compact form, which Manifest.parse reads by its quick path
    # (format/manifest_text.py); spaced JSON always takes the general one.
    compact = data.draw(st.booleans())

    def dumps(value: Any) -> str:
        return json.dumps(value, separators=(",", ":")) if compact else json.dumps(value)

    if how == "replace":
        # any node of a valid manifest replaced by any JSON value (or a hostile one)
        path = data.draw(st.sampled_from(paths_of(doc)))
        manifest = dumps(replaced(doc, path, data.draw(json_values))).encode()
    elif how == "delete":
        path = data.draw(st.sampled_from([p for p in paths_of(doc) if p]))
        new = copy.deepcopy(doc)
        node = new
        for key in path[:-1]:
            node = node[key]
        del node[path[-1]]
        manifest = dumps(new).encode()
    elif how == "bytes":
        raw = dumps(doc).encode()
        at = data.draw(st.integers(0, len(raw)))
        manifest = raw[:at] + data.draw(st.binary(max_size=40)) + raw[at + data.draw(st.integers(0, 40)) :]
    elif how == "deep":
        depth = data.draw(st.sampled_from([50, 500, 990, 5000, 100_000]))
        kind = data.draw(st.sampled_from(["list", "dict"]))
        manifest = dumps(doc).replace('"global_step":3', f'"global_step":{deep(depth, kind)}').encode()
        manifest = manifest.replace(b'"global_step": 3', b'"global_step": ' + deep(depth, kind).encode())
    else:  # a tensor entry with a hostile dtype/shape/box
        t = data.draw(st.integers(0, len(doc["tensors"]) - 1))
        field = data.draw(st.sampled_from(["dtype", "shape", "offsets", "cshape", "file", "key"]))
        value = data.draw(
            st.one_of(
                json_values,
                st.lists(st.integers(-(2**64), 2**64), max_size=5),
                st.lists(st.sampled_from([0, 1, 2**31, 2**62, 2**63]), min_size=1, max_size=70),
            )
        )
        key = {"cshape": "shape"}.get(field, field)
        path = ("tensors", t, key) if field in ("dtype", "shape") else ("tensors", t, "chunks", 0, key)
        manifest = dumps(replaced(doc, path, value)).encode()
    write_checkpoint(ckpt, manifest, data_file)
    count(f"manifest {how}", read_everything(ckpt))


# -- the data-file reader ---------------------------------------------------------------------


codes = st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "F128", "X", ""])
header_entries = st.fixed_dictionaries(
    {
        "dtype": st.one_of(codes, json_values),
        "shape": st.one_of(
            st.lists(st.integers(-3, 8), max_size=4),
            st.lists(st.sampled_from([0, 1, 2**31, 2**62, 2**63, 2**64]), max_size=4),
            json_values,
        ),
        "data_offsets": st.one_of(
            st.lists(st.integers(-(2**63), 2**64), min_size=2, max_size=2),
            st.lists(st.integers(0, 200), min_size=2, max_size=2),
            json_values,
        ),
    }
)


@FUZZ_SETTINGS
@given(data=st.data())
def test_lying_data_files(base: tuple[dict[str, Any], bytes], tmp_path: Path, data: st.DataObject) -> None:
    doc, original = base
    ckpt = tmp_path / "ckpt"
    (n,) = struct.unpack("<Q", original[:8])
    header = json.loads(original[8 : 8 + n])
    how = data.draw(st.sampled_from(["entry", "entry", "header", "prefix", "raw"]))
    body = original[8 + n :]
    if how == "entry":
        # one tensor entry (or a new one) lies about its dtype, shape or offsets
        key = data.draw(st.sampled_from([*header, "__metadata__", "new"]))
        header[key] = data.draw(st.one_of(header_entries, json_values))
        body = body + data.draw(st.binary(max_size=64)) if data.draw(st.booleans()) else body
    elif how == "header":
        header = data.draw(st.dictionaries(st.sampled_from([*header, "x"]), header_entries, max_size=4))
        body = data.draw(st.binary(max_size=300))
    text = json.dumps(header).encode()
    if how == "prefix":  # the length prefix lies
        prefix = struct.pack(
            "<Q", data.draw(st.sampled_from([0, 1, len(text) - 1, len(text) + 1, 2**40, 2**64 - 1]))
        )
    else:
        prefix = struct.pack("<Q", len(text))
    blob = prefix + text + body
    if how == "raw":
        blob = data.draw(st.binary(max_size=400))
    manifest = copy.deepcopy(doc)
    # The manifest agrees with the file's size and CRC, so the reader must rely on parsing.
    manifest["files"][DATA]["size"] = max(len(blob), 8)
    manifest["files"][DATA]["checksum"] = format_checksum(zlib.crc32(blob))
    write_checkpoint(ckpt, json.dumps(manifest).encode(), blob)
    count(f"data file {how}", read_everything(ckpt))


def test_fuzz_figures() -> None:
    """Runs after the fuzz tests in this module: prints how many inputs each one tried."""
    total = sum(COUNTS.values())
    report("fuzz (hypothesis)", {"inputs": total, **dict(sorted(COUNTS.items()))})
    for kind in ("manifest", "data file"):  # each fuzz test that ran tried its examples
        tried = sum(n for k, n in COUNTS.items() if k.startswith(kind))
        assert tried == 0 or tried >= EXAMPLES * 0.9, (kind, tried)
    assert not COUNTS or any(k.endswith("rejected") for k in COUNTS)


# -- escaping the directory; no pickle; bounded address space ---------------------------------

AUDIT_SCRIPT = r"""
import json, os, random, resource, shutil, sys, zlib
from pathlib import Path

import numpy as np
import torch  # imported before the limits: loading may hand out torch tensors

import ckptproto
from ckptproto.format.crc import format_checksum
from ckptproto.format.manifest import CHECKSUM_KEY

root = Path(sys.argv[1])
sentinel = root / "outside" / "sentinel.safetensors"
soft, hard = resource.getrlimit(resource.RLIMIT_AS)
with open("/proc/self/status") as f:
    vm = next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmSize:"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (3 << 30), hard))  # 3 GiB above what is mapped now

base = root / "base"
ckptproto.save({"a": np.arange(5), "t": torch.ones(3), "trainer": {"global_step": 1}}, base)
doc = json.loads((base / "manifest.json").read_text())
del doc[CHECKSUM_KEY]
doc["writer"] = "audit"
data_name = next(iter(doc["files"]))
data = (base / data_name).read_bytes()

def make(name, manifest, files=None, links=None):
    d = root / "cases" / name
    d.mkdir(parents=True)
    for fname, blob in (files if files is not None else {data_name: data}).items():
        (d / fname).write_bytes(blob)
    for fname, target in (links or {}).items():
        os.symlink(target, d / fname)
    if manifest is not None:
        (d / "manifest.json").write_text(json.dumps(manifest))
    return d

def with_file(name):
    m = json.loads(json.dumps(doc))
    m["files"] = {name: m["files"][data_name]}
    for t in m["tensors"]:
        for c in t["chunks"]:
            c["file"] = name
    return m

cases = []
for escape in ["../outside/sentinel.safetensors", str(sentinel), "/etc/passwd",
               "..%2foutside.safetensors", "sub/dir.safetensors", "./data.safetensors"]:
    cases.append(make(f"name{len(cases)}", with_file(escape)))
# a data file that is a symlink to a file outside (same bytes, so only the link is wrong)
cases.append(make("datalink", doc, files={}, links={data_name: str(sentinel)}))
# a manifest that is a symlink to a manifest outside
cases.append(make("manifestlink", None, links={"manifest.json": str(root / "outside" / "manifest.json")}))
# a symlinked subdirectory in the data file's place
cases.append(make("dirlink", doc, files={}, links={data_name: str(root / "outside")}))
# random mutations of the data file with a manifest that agrees with them
rng = random.Random(3)
for i in range(150):
    blob = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        blob[rng.randrange(len(blob))] = rng.randrange(256)
    m = json.loads(json.dumps(doc))
    m["files"][data_name]["size"] = len(blob)
    m["files"][data_name]["checksum"] = format_checksum(zlib.crc32(bytes(blob)))
    cases.append(make(f"mut{i}", m, files={data_name: bytes(blob)}))

(root / "outside").mkdir(exist_ok=True)
sentinel.write_bytes(data)
(root / "outside" / "manifest.json").write_text(json.dumps(doc))
before = {p: p.stat().st_mtime_ns for p in (root / "outside").iterdir()}

events = []
allowed_roots = [os.path.realpath(p) for p in sys.path if p] + [sys.prefix, sys.base_prefix]

def hook(event, args):
    if event == "pickle.find_class":
        raise RuntimeError(f"something unpickled {args}")
    if event in ("open", "os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree",
                 "os.symlink", "os.link", "os.truncate", "os.chmod", "os.utime"):
        events.append((event, args))

import pickle
def no_unpickling(*args, **kwargs):
    raise RuntimeError("pickle was called")
pickle.loads = pickle.load = no_unpickling
pickle.Unpickler = no_unpickling

sys.addaudithook(hook)
outcomes = {}
for case in cases:
    events.clear()
    for call in (ckptproto.read_manifest, ckptproto.verify, ckptproto.load,
                 lambda p: ckptproto.load(p, mmap=True),
                 lambda p: ckptproto.load_into(p, {"a": np.zeros(5, np.int64)}, strict=False)):
        try:
            call(case)
            outcomes["accepted"] = outcomes.get("accepted", 0) + 1
        except ckptproto.CheckpointError:
            outcomes["rejected"] = outcomes.get("rejected", 0) + 1
    for event, args in events:
        if event != "open":
            raise SystemExit(f"{case.name}: a reader called {event}{args}")
        path, mode, flags = args
        if isinstance(path, int):
            continue  # an fd (mmap, fdopen)
        path = os.fsdecode(path)
        if "w" in str(mode) or (isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
            raise SystemExit(f"{case.name}: a reader opened {path} for writing")
        if not os.path.isabs(path):
            # opened relative to the checkpoint's directory fd: a plain name only
            if "/" in path or path in ("..", "."):
                raise SystemExit(f"{case.name}: relative open of {path!r}")
            continue
        if isinstance(flags, int) and flags & getattr(os, "O_NOFOLLOW", 0):
            # the last component is not followed (a symlink there fails with ELOOP)
            real = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        else:
            real = os.path.realpath(path)
        inside = real.startswith(os.path.realpath(case) + os.sep) or real == os.path.realpath(case)
        module_file = any(real.startswith(r) for r in allowed_roots) and real.endswith((".py", ".pyc", ".so"))
        if not inside and not module_file and not real.startswith("/proc/"):
            raise SystemExit(f"{case.name}: a reader opened {real}, outside the checkpoint")
after = {p: p.stat().st_mtime_ns for p in (root / "outside").iterdir()}
assert before == after, "a file outside the checkpoint changed"
assert sentinel.read_bytes() == data
print(json.dumps({"cases": len(cases), **outcomes}))
"""


def test_no_escape_no_pickle_bounded_address_space(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", AUDIT_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    figures = json.loads(proc.stdout.strip().splitlines()[-1])
    report("escape/pickle audit", figures)
    assert figures["rejected"] >= 9 * 5  # every escaping case is refused by every reader


def _imports(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call):
            func = node.func
            text = ast.unparse(func)
            if text in ("__import__", "importlib.import_module") and node.args:
                arg = node.args[0]
                if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                    names.add(arg.value.split(".")[0])
            if text.endswith(("torch.load", "np.load", "numpy.load", "pickle.loads")):
                names.add(f"call:{text}")
    return names


UNPICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def test_ckptproto_never_imports_pickle() -> None:
    """No module on the default path imports an unpickler or calls torch.load/np.load (those
    may unpickle). Only the opt-in adapters (``interop``: reading torch.save files;
    ``integrations``: Lightning's ``unsafe_allow_pickle``) may, and ``import ckptproto`` (with
    a save and a load) never imports them."""
    package = Path(ckptproto.__file__).parent
    opt_in = ("interop", "integrations")
    probe = (
        "import sys, tempfile, numpy as np, ckptproto\n"
        "d = tempfile.mkdtemp() + '/c'\n"
        "ckptproto.save({'a': np.arange(3)}, d); ckptproto.load(d); ckptproto.verify(d)\n"
        "print(' '.join(m for m in sys.modules if m.startswith('ckptproto.')))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert not [m for m in loaded.stdout.split() if m.split(".")[1] in opt_in]
    offenders = []
    checked = 0
    for path in package.rglob("*.py"):
        rel = path.relative_to(package)
        if rel.parts[0] in opt_in:
            continue
        checked += 1
        found = _imports(ast.parse(path.read_text(), str(path)))
        bad = sorted(n for n in found if n in UNPICKLERS or n.startswith("call:"))
        if bad:
            offenders.append(f"{rel}: {bad}")
    assert checked > 10
    assert offenders == []


def test_the_import_scan_sees_pickle() -> None:
    # the scan above can fail: it does find these
    found = _imports(ast.parse("import pickle\nfrom _pickle import loads\nx = torch.load(f)\n"))
    assert {"pickle", "_pickle", "call:torch.load"} <= found


@pytest.mark.parametrize("state", [None, 3, "x", [1, 2], True])
def test_state_that_is_not_an_object(base: tuple[dict[str, Any], bytes], tmp_path: Path, state: Any) -> None:
    """Found by the stress fuzzing: load_into crashed (TypeError) on a non-object state."""
    doc, data_file = base
    write_checkpoint(tmp_path / "ckpt", json.dumps({**doc, "state": state}).encode(), data_file)
    for call in (
        ckptproto.load,
        lambda p: ckptproto.load_into(p, {"a": np.zeros(5, np.int64)}, strict=False),
    ):
        with pytest.raises(
            ckptproto.CheckpointFormatError, match=r"must be an object|object at the top level"
        ):
            call(tmp_path / "ckpt")
