"""State trees to JSON and back, losslessly, with tensors replaced by references.

Encoding (normative text: ``spec/FORMAT.md``, "Value encoding"):

* ``None``, ``bool``, ``str`` -> themselves; ``int`` -> a JSON integer when
  ``|x| <= 2**53 - 1``, else ``{"$int": "<decimal>"}`` (at most 10,000 characters);
  ``float`` -> a JSON number with a fraction or exponent, or ``{"$float": "nan" | "inf" | "-inf"}``;
  ``bytes`` -> ``{"$bytes": "<base64>"}``.
* ``list`` -> JSON array; ``tuple`` -> ``{"$tuple": [...]}``.
* ``dict`` whose keys are all ``str`` not starting with ``$`` -> JSON object; any other
  ``dict`` -> ``{"$dict": [[key, value], ...]}``; ``OrderedDict`` -> ``{"$odict": [...]}``.
* torch tensor -> ``{"$torch": i}``, numpy array -> ``{"$numpy": i}``, ``i`` indexing the
  manifest's tensor table. A DTensor is a torch tensor of its global shape (the manifest
  stores it as chunks); its ``TensorLeaf.shard`` holds this rank's local part.
"""

from __future__ import annotations

import base64
import binascii
import decimal
import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import repeat
from operator import attrgetter, itemgetter, methodcaller
from typing import Any, NamedTuple

import numpy as np

from ckptproto import arrays, dtensor
from ckptproto._recent import Recent
from ckptproto.arrays import ArraySpec
from ckptproto.dtensor import LocalShard
from ckptproto.errors import CheckpointFormatError, UnsupportedValueError

MAX_DEPTH = 200
_starts_with_dollar = methodcaller("startswith", "$")
_STR_ONLY = frozenset({str})
_new = tuple.__new__  # a named tuple's own __new__ is a Python call around this
# A dict of at least this many tensors is encoded a column at a time (_Encoder._tensor_dict).
_BATCH_MIN = 8  # exactly str: a subclass of str is refused as a key
MAX_SAFE_INT = 2**53 - 1
# "$int" payloads are at most this many characters (sign included): decimal conversion is
# quadratic, so a reader bounds it; the writer refuses larger ints rather than write them.
MAX_INT_CHARS = 10_000
_INT_TEXT = re.compile(r"-?[0-9]+")
# Python refuses int<->str conversions beyond sys.get_int_max_str_digits() digits (4,300 by
# default, as low as 640 if a program sets it); decimal does not. Below this many characters
# int()/str() are tried first, with decimal as the fallback when the process limit is lower.
_FAST_INT_CHARS = 4000


def decimal_int(text: str) -> int:
    """``int(text)`` for ASCII decimal text of any length, whatever the process's int/str limit."""
    if len(text) < _FAST_INT_CHARS:
        try:
            return int(text)
        except ValueError:  # over a lowered sys.set_int_max_str_digits()
            pass
    return int(decimal.Decimal(text))


def _decimal_text(value: int) -> str:
    """``str(value)`` whatever the process's int/str limit (bounded by the callers)."""
    if value.bit_length() < 3 * _FAST_INT_CHARS:
        try:
            return str(value)
        except ValueError:  # over a lowered sys.set_int_max_str_digits()
            pass
    return str(decimal.Decimal(value))


TAGS = ("$torch", "$numpy", "$int", "$float", "$bytes", "$tuple", "$dict", "$odict")


def join_path(prefix: str, key: object) -> str:
    if type(key) is int:
        key = int_text(key)
    return f"{prefix}.{key}" if prefix else str(key)


def int_text(value: int) -> str:
    """``str(value)``, or ``<int of N bits>`` past what ``str()`` converts (4,300 digits)."""
    if value.bit_length() > 3 * _FAST_INT_CHARS:
        return f"<int of {value.bit_length()} bits>"
    return _decimal_text(value)


class TensorLeaf(NamedTuple):
    """One distinct tensor/array of a state (tied tensors appear once). A named tuple: one is
    built per tensor saved (300,000 in a large state), and ``tuple.__new__`` builds it in a
    fraction of a dataclass's ``__init__``."""

    value: Any
    spec: ArraySpec  # the global spec (for a DTensor, its global dtype and shape)
    path: str  # the first state path it was found at
    shard: LocalShard | None = None  # a DTensor's local part; None for plain tensors/arrays
    # Where the bytes of a contiguous CPU torch tensor without lazy conj/neg bits lie, found
    # while encoding (a writer checks it still is the tensor's address); 0 for any other value.
    host_address: int = 0


class References(dict[str, dict[str, int]]):
    """An encoded dict whose values are ``{"$torch": i}`` for ``i`` from ``first`` on, in
    order: what the encoder makes of a dict of many plain tensors (a module's state dict), at
    state path ``path`` (its tensors' paths: :func:`column_paths`). A dict like any other; the
    manifest's writer (``format/json_text.tree``) writes its text from its keys and ``first``
    without a pass over its values::

        column = References({"w": {"$torch": 3}, "b": {"$torch": 4}})
        column.first, column.path = 3, "models.model"
    """

    __slots__ = ("first", "path")
    first: int
    path: str

    @classmethod
    def numbered(cls, keys: list[str], first: int, path: str) -> References:
        """The column of ``keys`` referring to tensors ``first``, ``first + 1``, ... at ``path``::

        References.numbered(["w", "b"], 3, "models.model")   # {"w": {"$torch": 3}, "b": {"$torch": 4}}
        """
        column = cls(zip(keys, [{"$torch": i} for i in range(first, first + len(keys))], strict=True))
        column.first, column.path = first, path
        return column

    def copy(self) -> References:
        """A new column of the same references (one C call), ``first`` and ``path`` kept."""
        column = References(self)
        column.first, column.path = self.first, self.path
        return column


def column_paths(path: str, keys: list[str]) -> list[str]:
    """The state paths of the tensors of a References column at ``path`` with ``keys``
    (``join_path`` of each str key, in C)::

        column_paths("models.model", ["w", "b"])   # ["models.model.w", "models.model.b"]
    """
    return list(map((path + ".").__add__, keys)) if path else keys


@dataclass
class EncodedState:
    """A state split into a JSON-able tree and its tensors."""

    tree: Any
    tensors: list[TensorLeaf] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(t.spec.nbytes for t in self.tensors)


def encode_state(state: Mapping[str, Any]) -> EncodedState:
    """Check every leaf of ``state`` and encode it; raises UnsupportedValueError naming the path
    of the first illegal value, before anything is written.

    >>> encode_state({"step": 3, "betas": (0.9, 0.99)}).tree
    {'step': 3, 'betas': {'$tuple': [0.9, 0.99]}}
    """
    if not isinstance(state, Mapping):
        raise UnsupportedValueError(f"a state must be a dict (or a Stateful), got {type(state).__qualname__}")
    encoder = _Encoder()
    tree = encoder.encode(state if type(state) in (dict, OrderedDict) else dict(state), "", 0)
    return EncodedState(tree, encoder.tensors)


class _Encoder:
    def __init__(self) -> None:
        self.tensors: list[TensorLeaf] = []
        self._ids: dict[tuple[Any, ...], int] = {}
        # Plain torch tensors by address first (P-8): only tensors that share an address, few in
        # a state, are compared by their full identity (arrays.torch_identity) in ``_ids``.
        self._by_address: dict[int, int] = {}
        # The addresses of the tensors of dicts encoded a column at a time (_tensor_dict), in a
        # set (a column's check and record are set operations, not a dict insertion each) until
        # a tensor encoded on its own needs one's index: then they join _by_address.
        self._column_addresses: set[int] = set()
        self._columns: list[tuple[int, list[int]]] = []  # (first index, addresses) not joined yet
        self._compared: set[int] = set()  # indices whose full identity is in ``_ids``
        self._specs: dict[tuple[Any, Any], ArraySpec] = {}  # (torch dtype, shape) -> spec
        # The same specs by dtype, then shape: a column of one dtype (the usual one) looks up
        # its shapes alone, with no (dtype, shape) pair built and hashed per tensor.
        self._by_shape: dict[Any, dict[Any, ArraySpec]] = {}
        self._active: set[int] = set()  # containers on the current path, to catch cycles
        torch = arrays.loaded_torch()
        # The exact types of plain tensors, tested first: most leaves of a large state are tensors.
        self._plain_tensor_types = (torch.Tensor, torch.nn.Parameter) if torch is not None else ()
        self._strided = torch.strided if torch is not None else None
        self._tensor_type_set = frozenset(self._plain_tensor_types)
        # torch.Tensor's own methods, mapped over a dict's tensors (a methodcaller costs more)
        self._tensor_methods = (
            (torch.Tensor.data_ptr, torch.Tensor.is_contiguous, torch.Tensor.is_neg, torch.Tensor.is_conj)
            if torch is not None
            else None
        )

    def encode(self, value: Any, path: str, depth: int) -> Any:
        kind = type(value)
        if kind in self._plain_tensor_types:
            return self._plain_torch(value, path)
        if kind is str:
            return value if value.isascii() else _utf8_text(value, path)
        if value is None or kind is bool:
            return value
        if kind is int:
            return value if -MAX_SAFE_INT <= value <= MAX_SAFE_INT else {"$int": _int_text(value, path)}
        if kind is float:
            return value if math.isfinite(value) else {"$float": repr(value)}
        if kind is bytes:
            return {"$bytes": base64.b64encode(value).decode("ascii")}
        if kind is np.ndarray or arrays.is_torch_tensor(value):
            return self._tensor(value, path)
        if kind in (dict, OrderedDict, list, tuple):
            if depth >= MAX_DEPTH:
                raise UnsupportedValueError(
                    f"state nests deeper than {MAX_DEPTH} levels at {path or '<root>'}", path=path
                )
            if id(value) in self._active:
                raise UnsupportedValueError(
                    f"state contains a reference cycle at {path or '<root>'}", path=path
                )
            self._active.add(id(value))
            try:
                return self._container(value, path, depth + 1)
            finally:
                self._active.discard(id(value))
        raise UnsupportedValueError(_unsupported_message(value, path), path=path)

    def _container(self, value: Any, path: str, depth: int) -> Any:
        if isinstance(value, (list, tuple)):
            items = [self.encode(v, join_path(path, i), depth) for i, v in enumerate(value)]
            return items if type(value) is list else {"$tuple": items}
        if type(value) is dict and _plain_keys(value):
            return self._plain_dict(value, path, depth)
        for key in value:
            if type(key) not in (str, int):
                raise UnsupportedValueError(
                    f"dict key {key!r} of type {type(key).__qualname__} at {path or '<root>'}: "
                    "keys must be str or int",
                    path=path,
                )
        pairs = [
            [self.encode(k, path, depth), self.encode(v, join_path(path, k), depth)] for k, v in value.items()
        ]
        return {"$odict" if type(value) is OrderedDict else "$dict": pairs}

    def _plain_dict(self, value: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
        """A dict of str keys none of which starts with ``$``: a JSON object of the same keys."""
        if len(value) >= _BATCH_MIN:
            batch = self._tensor_dict(value, path)
            if batch is not None:
                return batch
        prefix = path + "." if path else ""  # join_path(path, key) of a str key
        tensor_types, plain_torch, encode = self._plain_tensor_types, self._plain_torch, self.encode
        out = {}
        for k, v in value.items():
            at = prefix + k
            # Most values of a large state are tensors: no encode() call for them.
            out[k if k.isascii() else _utf8_text(k, at)] = (
                plain_torch(v, at) if type(v) in tensor_types else encode(v, at, depth)
            )
        return out

    def _tensor_dict(self, value: dict[str, Any], path: str) -> dict[str, Any] | None:
        """:meth:`_plain_dict` of a dict of ASCII keys whose values are all the usual tensor
        (what :meth:`_plain_torch` takes inline: a stored dtype and shape seen before, strided,
        on the CPU, not empty) at addresses no other tensor of the state starts at (so none is
        tied), a module's ``state_dict()`` say: every step a column for the whole dict. None
        (nothing recorded) when any value is not: then the dict goes item by item."""
        values = list(value.values())
        if not self._tensor_type_set.issuperset(map(type, values)):
            return None
        keys, start = list(value), len(self.tensors)
        # The same dict saved again (a training run's every save): its keys at the same path
        # and index as a column encoded lately, whose ASCII test, specs, paths and references
        # are taken from it if its dtype and shapes are the same too.
        memo = _recent_columns.get((path, start, keys))
        if memo is None and not all(map(str.isascii, keys)):
            return None
        try:
            dtypes = list(map(_DTYPE, values))
            shapes = list(map(_SHAPE, values))
        except RuntimeError:  # a nested tensor has no single shape
            return None
        one_dtype = dtypes.count(dtypes[0]) == len(dtypes)  # (dtypes are singletons: identity)
        if memo is not None and not (one_dtype and dtypes[0] is memo.dtype and shapes == memo.shapes):
            memo = None
        if memo is not None:
            specs = memo.specs
        else:
            found = list(map(self._by_shape.get(dtypes[0], {}).get, shapes)) if one_dtype else None
            # A dtype and shape not seen yet (a None; all() tests truth in C, where `None in
            # found` would call each spec's Python __eq__): described once, cached if stored.
            if found is None or not all(found):
                pairs = list(zip(dtypes, shapes, strict=True))
                for v, pair in zip(values, pairs, strict=True):
                    if pair not in self._specs:
                        described = arrays.describe_torch(v)
                        if not isinstance(described, ArraySpec):
                            return None
                        self._remember_spec(pair, described)
                found = list(map(self._specs.get, pairs))
            specs = [s for s in found if s is not None]
            if len(specs) != len(values) or not all(map(_NUMEL, specs)):
                return None
        methods = self._tensor_methods
        assert methods is not None  # values are torch tensors: torch is loaded
        data_ptr, is_contiguous, is_neg, is_conj = methods
        if not all(map(_IS_CPU, values)):
            return None
        try:
            # Every tensor of another layout than strided (sparse, mkldnn: no storage) raises
            # here, which spares a pass reading each one's layout (~0.2 us a tensor).
            addresses = list(map(data_ptr, values))
        except RuntimeError:
            return None  # item by item: _plain_torch names the tensor and why it cannot be stored
        fresh = set(addresses)
        if (
            len(fresh) != len(addresses)
            or not self._column_addresses.isdisjoint(fresh)
            or not self._by_address.keys().isdisjoint(fresh)
        ):
            return None  # a tie, or another view of some tensor's memory: item by item
        self._column_addresses |= fresh
        self._columns.append((start, addresses))
        # Viewed in place where written (host_address): contiguous, no lazy conjugate or
        # negative bit (only a complex tensor has the conjugate bit; a real one may have the
        # negative bit). Found in passes: in the usual dict, every tensor is.
        in_place = all(map(is_contiguous, values)) and not any(map(is_neg, values))
        if in_place and any(dtype.is_complex for dtype in set(dtypes)):
            in_place = not any(map(is_conj, values))
        host = (
            addresses
            if in_place
            else [
                a if v.is_contiguous() and not v.is_conj() and not v.is_neg() else 0
                for a, v in zip(addresses, values, strict=True)
            ]
        )
        paths = memo.paths if memo is not None else column_paths(path, keys)
        self.tensors += map(_new, repeat(TensorLeaf), zip(values, specs, paths, repeat(None), host))
        if memo is not None:
            # (its path and first index are this one's) A copy: a consumer that changes its tree
            # changes no later save's.
            return memo.column.copy()
        column = References.numbered(keys, start, path)
        if one_dtype:
            _recent_columns.put((path, start, keys), _Column(dtypes[0], shapes, specs, paths, column))
        return column

    def _plain_torch(self, value: Any, path: str) -> dict[str, int]:
        """:meth:`_tensor` for a torch.Tensor or Parameter (never a DTensor: a subclass). The
        usual tensor (a stored dtype, strided, not meta, not empty) is described inline; any
        other goes through arrays.describe_torch, which says why it cannot be stored."""
        try:
            spec = self._specs.get((value.dtype, value.shape))
        except RuntimeError:  # a nested tensor has no single shape: describe_torch says so
            spec = None
        cpu = value.is_cpu  # (a CPU tensor is not a meta tensor)
        if spec is None or value.layout is not self._strided or (not cpu and value.is_meta):
            described = arrays.describe_torch(value)
            if not isinstance(described, ArraySpec):
                raise UnsupportedValueError(f"{path or '<root>'}: {described}", path=path)
            spec = self._remember_spec((value.dtype, described.shape), described)
        if not spec.numel:  # empty tensors all may share one address: only the same object ties
            return self._tied_or_new(("empty", id(value)), value, spec, path)
        address = value.data_ptr()
        if address in self._column_addresses:
            self._join_columns()
        count = len(self.tensors)
        index = self._by_address.setdefault(address, count)
        if index == count:
            as_is = cpu and value.is_contiguous() and not value.is_conj() and not value.is_neg()
            self.tensors.append(_new(TensorLeaf, (value, spec, path, None, address if as_is else 0)))
            return {"$torch": index}
        # Another tensor starts at this address: tied, or another view of that memory.
        if index not in self._compared:
            first = self.tensors[index]
            self._ids[arrays.torch_identity(first.value, first.spec.shape)] = index
            self._compared.add(index)
        return self._tied_or_new(arrays.torch_identity(value, spec.shape), value, spec, path)

    def _remember_spec(self, pair: tuple[Any, Any], spec: ArraySpec) -> ArraySpec:
        """The spec cached for ``pair`` (torch dtype, shape), ``spec`` if none was yet."""
        spec = self._specs.setdefault(pair, spec)
        self._by_shape.setdefault(pair[0], {}).setdefault(pair[1], spec)
        return spec

    def _join_columns(self) -> None:
        """Move the columns' addresses into ``_by_address`` (once per column)."""
        for start, addresses in self._columns:
            self._by_address.update(zip(addresses, range(start, start + len(addresses)), strict=True))
        self._columns.clear()
        self._column_addresses.clear()

    def _tied_or_new(self, key: tuple[Any, ...], value: Any, spec: ArraySpec, path: str) -> dict[str, int]:
        index = self._ids.get(key)
        if index is None:
            index = self._ids[key] = len(self.tensors)
            self._compared.add(index)
            self.tensors.append(TensorLeaf(value, spec, path))
        return {"$torch": index}

    def _tensor(self, value: Any, path: str) -> dict[str, int]:
        shard = None
        if dtensor.is_dtensor(value):
            described = dtensor.describe(value)
            if isinstance(described, str):
                raise UnsupportedValueError(f"{path or '<root>'}: {described}", path=path)
            spec, shard = described
            key = ("dtensor", *arrays.identity(shard.local), shard.offsets)
        else:
            plain = arrays.describe(value)
            if not isinstance(plain, ArraySpec):
                raise UnsupportedValueError(f"{path or '<root>'}: {plain}", path=path)
            spec, key = plain, arrays.identity(value)
        index = self._ids.get(key)
        if index is None:
            index = self._ids[key] = len(self.tensors)
            self.tensors.append(TensorLeaf(value, spec, path, shard))
        return {"$torch" if spec.kind == "torch" else "$numpy": index}


class _Column(NamedTuple):
    """A column _Encoder._tensor_dict encoded lately: what an encoding of the same dict again
    (the same keys at the same path and index, one dtype, the same shapes) takes from it. It
    holds no tensor: its keys, shapes, specs, paths and references only."""

    dtype: Any
    shapes: list[Any]
    specs: list[ArraySpec]
    paths: list[str]
    column: References  # copied into each save that takes it


# The last few columns encoded (a state's modules), by path, first index and keys: ~340
# bytes a tensor held (97 MB for a state of 300,000 tensors).
_recent_columns: Recent[tuple[str, int, list[str]], _Column] = Recent(8)


# Per-tensor reads for the C-level passes of _Encoder._tensor_dict.
_DTYPE, _SHAPE, _IS_CPU = attrgetter("dtype"), attrgetter("shape"), attrgetter("is_cpu")
_NUMEL = attrgetter("numel")


def _plain_keys(value: dict[Any, Any]) -> bool:
    """Whether every key of ``value`` is a str not starting with ``$`` (then it encodes as a
    JSON object of the same keys), checked without a Python step per key."""
    return _STR_ONLY.issuperset(map(type, value)) and not any(map(_starts_with_dollar, value))


def _utf8_text(text: str, path: str) -> str:
    """``text`` if UTF-8 can encode it; a lone surrogate (``"\\ud800"``, e.g. from
    ``os.fsdecode`` of undecodable bytes) cannot be written to a UTF-8 manifest."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        at = printable(path) or "<root>"
        raise UnsupportedValueError(
            f"{at}: string holds a lone UTF-16 surrogate {text[exc.start]!r} at character "
            f"{exc.start}, which UTF-8 cannot store; store the raw bytes (bytes) or fix the text",
            path=path,
        ) from None
    return text


def printable(text: str) -> str:
    """``text`` with anything UTF-8 cannot encode escaped, safe to print in a message."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _int_text(value: int, path: str) -> str:
    text = _decimal_text(value) if value.bit_length() <= 3.33 * MAX_INT_CHARS else None
    if text is None or len(text) > MAX_INT_CHARS:
        raise UnsupportedValueError(
            f"{path or '<root>'}: int with more than {MAX_INT_CHARS} characters in decimal cannot be "
            "saved; store it as bytes (int.to_bytes) instead",
            path=path,
        )
    return text


def _unsupported_message(value: object, path: str) -> str:
    kind = type(value)
    name = f"{kind.__module__}.{kind.__qualname__}"
    hint = ""
    if isinstance(value, np.generic):
        hint = " (a numpy scalar: use .item() for a plain value or np.asarray() for an array)"
    elif isinstance(value, (int, float, str, bytes, dict, list, tuple)):
        hint = f" (a subclass of {kind.__mro__[1].__qualname__}: convert it to the plain type)"
    return (
        f"{path or '<root>'}: values of type {name} cannot be saved{hint}; legal leaves are "
        "tensors, numpy arrays, None, bool, int, float, str and bytes, in dict/list/tuple"
    )


def decode_tree(
    node: Any,
    resolve: Callable[[str, int, str], Any],
    *,
    where: str = "manifest",
    in_place: bool = False,
    paths: bool = True,
    resolve_many: Callable[[list[int]], list[Any]] | None = None,
    columns: ColumnMemo | None = None,
) -> Any:
    """Rebuild a state tree; ``resolve(kind, index, path)`` supplies each tensor.
    Raises CheckpointFormatError naming ``where`` and the state path of a malformed node.

    ``in_place=True`` reuses the parsed JSON's lists and dicts (the encoded tree is consumed):
    memory stays that of one tree instead of two, for a reader's last use of a manifest.
    ``paths=False``: ``resolve`` gets ``""`` for the path of a plain ``{"$torch": i}`` leaf
    (a resolver that ignores paths saves building one per tensor; messages still name it).
    ``resolve_many(indices)``, with ``paths=False``: what ``resolve`` gives for each of many
    ``$torch`` indices at once, in one call (an object of many tensor references, a module's
    state dict, then costs no Python call per tensor)::

        decode_tree(state, lambda kind, i, p: values[i], paths=False,
                    resolve_many=lambda indices: list(map(values.__getitem__, indices)))

    ``columns``: the memo the tree's parse filled (``Manifest.columns``), for a tree unchanged
    since (an object decoded in place leaves it)."""
    decoder = _Decoder(resolve, where, build=True, in_place=in_place)
    decoder.leaf_paths = paths
    decoder.resolve_many = resolve_many
    decoder.columns = columns
    return decoder.decode(node, None, 0)


def check_tree(node: Any, resolve: Callable[[str, int, str], Any], *, where: str = "manifest") -> bool:
    """Validate an encoded tree as :func:`decode_tree` does, building nothing (memory stays
    that of the parsed JSON); ``resolve`` sees every tensor reference. Returns whether the
    root decodes to a dict: ``check_tree({"a": {"$tuple": []}}, refs)`` is True."""
    _Decoder(resolve, where, build=False).decode(node, None, 0)
    if not isinstance(node, dict) or not node:
        return isinstance(node, dict)
    tag = next(iter(node))
    return not tag.startswith("$") or tag in ("$dict", "$odict")


def quick_refs(
    node: Any, *, where: str = "manifest", columns: ColumnMemo | None = None
) -> tuple[list[int], list[int]] | None:
    """The tensor references of an encoded tree whose root is a plain object, as two lists of
    indices (``$torch``, ``$numpy``), when the tree passes every check of :func:`check_tree`;
    None when it does not, or when this quick walk cannot vouch for it (then check_tree, which
    builds the paths and messages, tells what is wrong)::

        quick_refs({"w": {"$torch": 0}, "step": 3})  # ([0], [])

    The common nodes (plain objects, lists, scalars, ``{"$torch": i}``) are checked inline
    without a path per node; any other tagged value is checked by the decoder itself."""
    if type(node) is not dict or (node and next(iter(node)).startswith("$")):
        return None
    torch_refs: list[int] = []
    numpy_refs: list[int] = []

    def collect(kind: str, index: int, path: str) -> None:
        (torch_refs if kind == "torch" else numpy_refs).append(index)

    decoder = _Decoder(collect, where, build=False)
    try:
        if not _vouch(node.values(), torch_refs, decoder, 1, columns):
            return None
    except CheckpointFormatError:
        return None
    return torch_refs, numpy_refs


_SCALARS = frozenset({str, int, float, bool, type(None)})
# Conservative: a node this deep is left to the decoder, which applies MAX_DEPTH exactly.
_QUICK_DEPTH = MAX_DEPTH - 4


def _vouch(
    children: Any, torch_refs: list[int], decoder: _Decoder, depth: int, columns: ColumnMemo | None
) -> bool:
    """Whether every node of ``children`` (at ``depth``) decodes; appends $torch references."""
    if depth >= _QUICK_DEPTH:
        return False
    append = torch_refs.append
    scalars = _SCALARS
    for v in children:
        kind = type(v)
        if kind is dict:
            if len(v) == 1 and "$torch" in v:
                index = v["$torch"]
                if type(index) is not int or index < 0:
                    return False
                append(index)
                continue
            if v and next(iter(v)).startswith("$"):
                decoder.decode(v, None, depth)  # other tags: the decoder itself (raises if bad)
                continue
            if any(map(str.startswith, v, _DOLLAR)):
                return False  # plain keys mixed with "$" keys
            if len(v) >= _BATCH_MIN and depth + 1 < _QUICK_DEPTH:
                indices = torch_column(v, columns)
                if indices is not None:
                    torch_refs += indices
                    continue
            if not _vouch(v.values(), torch_refs, decoder, depth + 1, columns):
                return False
        elif kind is list:
            if not _vouch(v, torch_refs, decoder, depth + 1, columns):
                return False
        elif kind not in scalars:
            return False
    return True


_DOLLAR = repeat("$")  # map(str.startswith, keys, _DOLLAR): each key starts with "$"
_TORCH_INDEX = itemgetter("$torch")


# What torch_column found for the objects of one parsed tree, by id: ``(the object, its
# indices or None)`` (the entry keeps the object alive, so its id is not reused). The parse,
# the validation and the decode of one manifest each ask about the same objects; a reader
# that holds the tree unchanged between them passes one memo to all three.
ColumnMemo = dict[int, tuple[Any, list[int] | None]]


def torch_column(node: dict[str, Any], memo: ColumnMemo | None = None) -> list[int] | None:
    """The indices of ``node``'s values when every one is a valid ``{"$torch": i}`` reference
    (a module's state dict, an optimizer's state of one parameter), found in C-level passes;
    else None (then the node goes value by value)::

        torch_column({"w": {"$torch": 0}, "b": {"$torch": 1}})  # [0, 1]

    ``memo``: answers for objects asked about before, reused while the object is unchanged
    (the caller's promise: nothing changes the tree while the memo is in use)."""
    if memo is None:
        return _column_indices(node)
    seen = memo.get(id(node))
    if seen is not None and seen[0] is node:
        return seen[1]
    found = _column_indices(node)
    memo[id(node)] = (node, found)
    return found


def _column_indices(node: dict[str, Any]) -> list[int] | None:
    """:func:`torch_column` worked out."""
    values = list(node.values())
    try:
        # Of the values of a parsed tree, only an object of one member answers ["$torch"] (a
        # one-item list or string raises TypeError): no separate pass over their types.
        if set(map(len, values)) != {1}:
            return None
        indices = list(map(_TORCH_INDEX, values))
    except (KeyError, TypeError):  # another tag, or a value of no length or another kind
        return None
    if set(map(type, indices)) != {int} or min(indices) < 0:
        return None
    return indices


# A state path is built only when a message or a resolve() call needs it: ``(parent, key)``
# links (None at the root), not a string per node (millions of them for a large state).
_Chain = tuple[Any, Any] | None


def _path_text(chain: _Chain) -> str:
    keys: list[Any] = []
    while chain is not None:
        chain, key = chain
        keys.append(key)
    path = ""
    for key in reversed(keys):
        path = join_path(path, key)
    return path


def _show(value: Any) -> str:
    text = int_text(value) if type(value) is int else repr(value)
    return text[:40]


class _Decoder:
    def __init__(
        self, resolve: Callable[[str, int, str], Any], where: str, *, build: bool, in_place: bool = False
    ) -> None:
        self.resolve, self.where, self.build, self.in_place = resolve, where, build, in_place
        # id(chain) -> (chain, its path): siblings share their parent's path text, built once
        # (the entry keeps the chain alive, so its id is not reused while the decoder runs).
        self._texts: dict[int, tuple[_Chain, str]] = {}
        self.leaf_paths = True
        self.resolve_many: Callable[[list[int]], list[Any]] | None = None
        self.columns: ColumnMemo | None = None

    def path_of(self, chain: _Chain) -> str:
        """``_path_text(chain)``, with the parent's part built once for all its children."""
        if chain is None:
            return ""
        parent, key = chain
        if parent is None:
            return join_path("", key)
        hit = self._texts.get(id(parent))
        if hit is None:
            hit = self._texts[id(parent)] = (parent, self.path_of(parent))
        return join_path(hit[1], key)

    def fail(self, message: str, chain: _Chain) -> CheckpointFormatError:
        return CheckpointFormatError(f"{self.where}: {message} at {_path_text(chain) or '<root>'}")

    def decode(self, node: Any, chain: _Chain, depth: int) -> Any:
        if node is None or isinstance(node, (bool, str, float, int)):
            return node
        if depth >= MAX_DEPTH:
            raise self.fail(f"state nests deeper than {MAX_DEPTH}", chain)
        if isinstance(node, list):
            if not self.build or self.in_place:
                for i, v in enumerate(node):
                    decoded = self.decode(v, (chain, i), depth + 1)
                    if self.in_place:
                        node[i] = decoded  # frees the encoded child now, not after the whole tree
                return node if self.in_place else None
            return [self.decode(v, (chain, i), depth + 1) for i, v in enumerate(node)]
        if not isinstance(node, dict):
            raise self.fail("unexpected JSON value", chain)
        tag = next(iter(node), None)
        if tag is None or not tag.startswith("$"):
            if any(map(str.startswith, node, _DOLLAR)):
                raise self.fail("object mixes '$' keys with plain keys", chain)
            leaf_depth = depth + 1 < MAX_DEPTH  # a tensor reference may sit one level down
            if leaf_depth and not self.leaf_paths and len(node) >= _BATCH_MIN:
                indices = torch_column(node, self.columns)
                if indices is not None:  # every value a reference: resolved in one pass
                    if self.resolve_many is not None:
                        resolved = self.resolve_many(indices)
                    else:
                        resolved = list(map(self.resolve, repeat("torch"), indices, repeat("")))
                    if self.in_place:
                        if self.columns is not None:
                            self.columns.pop(id(node), None)  # no longer what it found
                        node.update(zip(list(node), resolved, strict=True))
                        return node
                    return dict(zip(node, resolved, strict=True)) if self.build else None
            out: dict[str, Any] | None = {} if self.build and not self.in_place else None
            for k, v in node.items():
                if leaf_depth and type(v) is dict and len(v) == 1 and "$torch" in v:
                    # {"$torch": i}, most of a large state's nodes: what tagged() does, inline
                    index = v["$torch"]
                    if type(index) is not int or index < 0:
                        raise self.fail(f"bad tensor reference {_show(index)}", (chain, k))
                    decoded = self.resolve(
                        "torch", index, self.path_of((chain, k)) if self.leaf_paths else ""
                    )
                else:
                    decoded = self.decode(v, (chain, k), depth + 1)
                if self.in_place:
                    node[k] = decoded  # an existing key: allowed while iterating
                elif out is not None:
                    out[k] = decoded
            return node if self.in_place else out
        if len(node) != 1:
            raise self.fail("tagged value has extra keys", chain)
        return self.tagged(tag, node[tag], chain, depth)

    def tagged(self, tag: str, payload: Any, chain: _Chain, depth: int) -> Any:
        if tag in ("$torch", "$numpy"):
            if type(payload) is not int or payload < 0:
                raise self.fail(f"bad tensor reference {_show(payload)}", chain)
            return self.resolve(tag[1:], payload, self.path_of(chain))
        if tag == "$int":
            if (
                not isinstance(payload, str)
                or len(payload) > MAX_INT_CHARS
                or not _INT_TEXT.fullmatch(payload)
            ):
                raise self.fail(f"bad $int {_show(payload)}", chain)
            return decimal_int(payload)
        if tag == "$float":
            if payload not in ("nan", "inf", "-inf"):
                raise self.fail(f"bad $float {_show(payload)}", chain)
            return float(payload)
        if tag == "$bytes":
            try:
                return base64.b64decode(payload, validate=True)
            except (binascii.Error, TypeError, ValueError) as exc:
                raise self.fail(f"bad $bytes ({exc})", chain) from None
        if tag == "$tuple":
            if not isinstance(payload, list):
                raise self.fail("$tuple is not a list", chain)
            if not self.build:
                for i, v in enumerate(payload):
                    self.decode(v, (chain, i), depth + 1)
                return None
            return tuple(self.decode(v, (chain, i), depth + 1) for i, v in enumerate(payload))
        if tag in ("$dict", "$odict"):
            out: dict[Any, Any] = OrderedDict() if tag == "$odict" else {}
            if not isinstance(payload, list):
                raise self.fail(f"{tag} is not a list of pairs", chain)
            for pair in payload:
                if not isinstance(pair, list) or len(pair) != 2:
                    raise self.fail(f"{tag} holds a non-pair", chain)
                key = self.decode(pair[0], chain, depth + 1)
                if type(key) not in (str, int):
                    raise self.fail(f"{tag} key is not str or int", chain)
                if key in out:
                    raise self.fail(f"duplicate key {_show(key)}", chain)
                value = self.decode(pair[1], (chain, key), depth + 1)
                out[key] = value if self.build else None
            return out if self.build else None
        raise self.fail(f"unknown tag {tag!r}; the checkpoint may need a newer ckptproto", chain)


def iter_tensor_refs(node: Any, path: str = "", depth: int = 0) -> Any:
    """Yield ``(path, kind, index)`` for every tensor reference in an encoded tree, in tree
    order. Iterative (a stack of the containers being walked): one generator frame, not one
    per level; a child's path is built only for a container or a reference, not a scalar."""
    # (iterator of (key, child), the parent's path, depth of the children, whether a child's
    # path is the parent's own: the root, and the payload of a $tuple)
    stack: list[tuple[Any, str, int, bool]] = [(iter(((None, node),)), path, depth, True)]
    while stack:
        items, parent, depth, same = stack[-1]
        for key, child in items:
            if not isinstance(child, (dict, list)) or depth > MAX_DEPTH:
                continue
            at = parent if same else join_path(parent, key)
            if isinstance(child, list):
                stack.append((enumerate(child), at, depth + 1, False))
                break
            if len(child) == 1:
                tag, payload = next(iter(child.items()))
                if tag in ("$torch", "$numpy"):
                    yield at, tag[1:], payload
                    continue
                if tag == "$tuple":
                    stack.append((iter(((None, payload),)), at, depth, True))
                    break
                if tag in ("$dict", "$odict") and isinstance(payload, list):
                    pairs = ((_key_text(p[0]), p[1]) for p in payload if isinstance(p, list) and len(p) == 2)
                    stack.append((pairs, at, depth + 1, False))
                    break
                if tag in TAGS:
                    continue
            stack.append((iter(child.items()), at, depth + 1, False))
            break
        else:
            stack.pop()


def _key_text(key: Any) -> Any:
    if isinstance(key, dict) and "$int" in key:
        return key["$int"]
    return key
