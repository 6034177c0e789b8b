"""Matching a checkpoint's state against a target tree for ``load_into``: one matcher for
plain tensors, arrays, DTensors and Statefuls inside trees::

    matcher = Matcher(manifest, strict=True, reject_unexpected=True)
    matcher.match(skeleton, target, "")
    matcher.raise_problems(root)        # StateMismatchError lists every path that does not fit
"""

from __future__ import annotations

import inspect
from collections.abc import Container, Mapping
from itertools import repeat
from operator import attrgetter
from typing import Any

import numpy as np

from ckptproto import arrays, dtensor, protocol
from ckptproto.errors import StateMismatchError
from ckptproto.format.manifest import Manifest, dtypes_and_shapes
from ckptproto.location import Location
from ckptproto.protocol import Stateful
from ckptproto.tree import join_path


class Ref:
    """Placeholder for a checkpoint tensor while matching against a target."""

    __slots__ = ("index", "kind")

    def __init__(self, kind: str, index: int) -> None:
        self.kind, self.index = kind, index


def copy_into(dst: Any, src: Any) -> None:
    if isinstance(dst, np.ndarray):
        dst[...] = src
    else:
        torch = arrays.require_torch()
        src = src if not isinstance(src, np.ndarray) else torch.from_numpy(src)
        try:
            dst.copy_(src)
        except RuntimeError:  # no copy kernel for sub-byte dtypes (uint1..7): one byte each
            if dst.element_size() != 1 or src.dtype != dst.dtype:
                raise
            dst.view(torch.uint8).copy_(src.view(torch.uint8))


def call_load_state_dict(
    target: Stateful, state: dict[str, Any], strict: bool, where: str = "<root>"
) -> None:
    try:
        accepts_strict = "strict" in inspect.signature(target.load_state_dict).parameters
    except (TypeError, ValueError):
        accepts_strict = False
    try:
        if accepts_strict:
            target.load_state_dict(state, strict=strict)  # type: ignore[call-arg]
        else:
            target.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        # e.g. torch's "Unexpected key(s) in state_dict": the checkpoint does not fit.
        raise StateMismatchError(
            f"{where}: {type(target).__qualname__}.load_state_dict refused the checkpoint state "
            f"(its tensors may already hold checkpoint bytes): {exc}"
        ) from exc


def assign(
    target: Any,
    loaded: Any,
    strict: bool,
    root: Location | None = None,
    path: str = "",
    *,
    values: Mapping[int, Any] | None = None,
    matched_whole: Container[int] = frozenset(),
) -> None:
    """Copy non-tensor values of ``loaded`` into a plain tree target (tensors already filled);
    Stateful objects in the tree get their part through their own ``load_state_dict``.

    ``loaded`` may be the matcher's skeleton: each :class:`Ref` in a value placed into the
    target (or handed to a Stateful) is then ``values.get(ref.index)``, and the nodes in
    ``matched_whole`` (:attr:`Matcher.matched_whole`: every member the target's own tensor)
    are skipped unread::

        assign(target, skeleton, strict, root, values=values, matched_whole=matcher.matched_whole)
    """
    if id(loaded) in matched_whole:
        return
    items = loaded.items() if isinstance(loaded, Mapping) else enumerate(loaded)
    exact = exact_array_types()
    mapping = isinstance(target, Mapping)  # once: an ABC check costs a Python call
    if mapping and _only_arrays(target, loaded, exact):
        return  # a module's state dict into its tensors: every one filled already
    for key, value in items:
        if mapping:
            if key not in target:
                continue
            current = target[key]
        else:
            if not isinstance(key, int) or key >= len(target):
                continue
            current = target[key]
        if type(current) in exact:
            continue  # a tensor or array: filled already (is_array, without the calls)
        if is_stateful(current):
            at = join_path(path, key)
            where = f"{root}: {at}" if root else at
            call_load_state_dict(current, _resolved(value, values), strict, where)
        elif isinstance(current, (dict, list)) and isinstance(value, type(current)):
            at = join_path(path, key)
            assign(current, value, strict, root, at, values=values, matched_whole=matched_whole)
        elif current is not value and not is_array(current):
            target[key] = _resolved(value, values)


def _resolved(node: Any, values: Mapping[int, Any] | None) -> Any:
    """``node`` of a skeleton with each :class:`Ref` replaced by its value (lists and dicts
    in place: the skeleton is the caller's own); ``node`` itself without ``values``."""
    if values is None:
        return node
    kind = type(node)
    if kind is Ref:
        return values.get(node.index)
    if isinstance(node, dict):
        for key, value in node.items():
            node[key] = _resolved(value, values)  # an existing key: allowed while iterating
    elif kind is list:
        node[:] = [_resolved(v, values) for v in node]
    elif kind is tuple:
        return tuple(_resolved(v, values) for v in node)
    return node


def wanted_refs(target: Any, skeleton: Any, matched_whole: Container[int] = frozenset()) -> set[int]:
    """The checkpoint tensors ``assign`` would place into ``target`` (mirrors its walk)."""
    wanted: set[int] = set()
    if id(skeleton) in matched_whole:
        return wanted  # every member the target's own tensor
    items = skeleton.items() if isinstance(skeleton, Mapping) else enumerate(skeleton)
    exact = exact_array_types()
    mapping = isinstance(target, Mapping)  # once: an ABC check costs a Python call
    if mapping and _only_arrays(target, skeleton, exact):
        return wanted  # every key the target's own tensor: none takes a new value
    for key, value in items:
        if mapping:
            if key not in target:
                continue
        elif not isinstance(key, int) or key >= len(target):
            continue
        current = target[key]
        if type(current) in exact:
            continue  # a tensor or array takes no other value (as below, without the calls)
        if isinstance(current, (dict, list)) and isinstance(value, type(current)):
            wanted |= wanted_refs(current, value, matched_whole)
        elif not is_array(current):  # replaced by, or handed (Stateful), the whole value
            wanted |= _all_refs(value)
    return wanted


def _only_arrays(target: Mapping[Any, Any], loaded: Any, exact: frozenset[type]) -> bool:
    """Whether ``loaded`` is a dict of many keys, each holding a plain tensor or array in
    ``target`` (then the walks of :func:`assign` and :func:`wanted_refs` skip every key), found
    in C-level passes; False otherwise, and the walk decides key by key."""
    if type(loaded) is not dict or len(loaded) < _MANY:
        return False
    missing = object()
    return set(map(type, map(target.get, loaded, repeat(missing)))) <= exact


def _holds_every_key(node: Mapping[Any, Any], target: Mapping[Any, Any]) -> bool:
    """Whether ``node`` holds every key of ``target``: one set comparison in C where the
    target's ``keys()`` is a set view (a dict's, a Mapping's), else False (checked key by key)."""
    try:
        return bool(node.keys() >= target.keys())
    except TypeError:  # a mapping whose keys() is not a set view
        return False


def _all_refs(node: Any) -> set[int]:
    if isinstance(node, Ref):
        return {node.index}
    if isinstance(node, Mapping):
        return set().union(*(_all_refs(v) for v in node.values()))
    if isinstance(node, (list, tuple)):
        return set().union(*(_all_refs(v) for v in node))
    return set()


def is_stateful(value: Any) -> bool:
    return not isinstance(value, Mapping) and not is_array(value) and isinstance(value, Stateful)


def is_array(value: Any) -> bool:
    return isinstance(value, np.ndarray) or arrays.is_torch_tensor(value)


_EXACT: tuple[frozenset[type], ...] = ()


def exact_array_types() -> frozenset[type]:
    """The exact types of plain arrays and tensors (np.ndarray, torch.Tensor and Parameter
    once torch is imported; never a subclass such as DTensor): a ``type(x) in`` test for them
    costs less than :func:`is_array`'s calls, paid per tensor of a large target."""
    global _EXACT
    if not _EXACT:
        torch = arrays.loaded_torch()
        if torch is None:
            return frozenset({np.ndarray})
        _EXACT = (frozenset({np.ndarray, torch.Tensor, torch.nn.Parameter}),)
    return _EXACT[0]


_MANY = 16  # members from which Matcher._plain_all's passes cost less than a call per member
_REF_KIND, _REF_INDEX = attrgetter("kind"), attrgetter("index")


class Matcher:
    """Walks a checkpoint skeleton beside a target tree: finds the target tensor to read each
    checkpoint tensor into, and collects missing, unexpected and mismatched paths."""

    def __init__(self, manifest: Manifest, *, strict: bool, reject_unexpected: bool) -> None:
        self.manifest = manifest
        self.strict = strict
        self.reject_unexpected = reject_unexpected
        # The target tensor each checkpoint tensor is read into, and the further targets of
        # an index two target keys share (rare: a dict of one lone target per index is what
        # a large target's matching and reading pass over, in C).
        self.first: dict[int, Any] = {}
        self.others: dict[int, list[Any]] = {}
        self.statefuls: dict[int, Mapping[str, Any]] = {}
        self.missing: list[str] = []
        self.unexpected: list[str] = []
        self.mismatched: list[str] = []
        # ids of the skeleton's objects whose every member was matched to the target's own
        # plain tensor at once (_plain_all): assign and wanted_refs have nothing to do there.
        self.matched_whole: set[int] = set()
        torch = arrays.loaded_torch()
        self._torch_types = frozenset({torch.Tensor, torch.nn.Parameter} if torch is not None else ())

    def match(self, ckpt_node: Any, target_node: Any, path: str) -> None:
        if isinstance(ckpt_node, Ref):
            if is_array(target_node):
                self._tensor(ckpt_node, target_node, path)
            elif target_node is not None:
                self.mismatched.append(
                    f"{path}: checkpoint has a tensor, target has {type(target_node).__qualname__}"
                )
            return
        if is_array(target_node):
            self.mismatched.append(
                f"{path}: target has a tensor, checkpoint has {type(ckpt_node).__qualname__}"
            )
            return
        if is_stateful(target_node):
            # A module/optimizer inside a tree target: match against its state_dict(); its own
            # load_state_dict decides about keys only the checkpoint has.
            target_node = self.statefuls.setdefault(id(target_node), protocol.state_of(target_node))
            reject, self.reject_unexpected = self.reject_unexpected, False
            try:
                self.match(ckpt_node, target_node, path)
            finally:
                self.reject_unexpected = reject
            return
        if isinstance(ckpt_node, Mapping) and isinstance(target_node, Mapping):
            if not _holds_every_key(ckpt_node, target_node):
                for key in target_node:
                    if key not in ckpt_node:
                        self.missing.append(join_path(path, key))
            if len(ckpt_node) >= _MANY and self._plain_all(ckpt_node, target_node):
                self.matched_whole.add(id(ckpt_node))
                return
            torch_types = self._torch_types
            for key, value in ckpt_node.items():
                if key in target_node:
                    target = target_node[key]
                    # A plain torch tensor for a checkpoint tensor (most of a large target):
                    # matched here without its path, which only a mismatch message needs.
                    if type(value) is Ref and type(target) in torch_types and self._plain(value, target):
                        continue
                    self.match(value, target, join_path(path, key))
                elif self.reject_unexpected:
                    self.unexpected.append(join_path(path, key))
        elif isinstance(ckpt_node, (list, tuple)) and isinstance(target_node, (list, tuple)):
            if len(ckpt_node) != len(target_node) and any(is_array(t) for t in target_node):
                self.mismatched.append(
                    f"{path}: {len(ckpt_node)} items in the checkpoint, {len(target_node)} in the target"
                )
            for i, (c, t) in enumerate(zip(ckpt_node, target_node, strict=False)):
                self.match(c, t, join_path(path, i))

    def _plain_all(self, ckpt_node: Mapping[str, Any], target_node: Mapping[str, Any]) -> bool:
        """:meth:`_plain` for every member at once, in C-level passes (a module's state_dict:
        thousands of tensors against as many references), when every member of ``ckpt_node``
        is a torch reference that ``target_node`` holds as a plain torch tensor of the same
        dtype and shape, each index taken once; else nothing is recorded and False returned
        (the member-by-member walk then matches, or explains, each one)."""
        refs = list(ckpt_node.values())
        try:
            targets = list(map(target_node.__getitem__, ckpt_node))
        except KeyError:
            return False
        if set(map(type, refs)) != {Ref} or not set(map(type, targets)) <= self._torch_types:
            return False
        if set(map(_REF_KIND, refs)) != {"torch"}:
            return False
        indices = list(map(_REF_INDEX, refs))
        if len(set(indices)) != len(indices) or not self.first.keys().isdisjoint(indices):
            return False  # ties: recorded one by one
        dtype_column, shapes = dtypes_and_shapes(self.manifest.tensors, indices)
        if not arrays.all_match_torch(targets, dtype_column, shapes):
            return False
        self.first.update(zip(indices, targets, strict=True))
        return True

    def destinations(self, index: int) -> list[Any]:
        """Every target tensor checkpoint tensor ``index`` is read into (none: ``[]``)."""
        first = self.first.get(index)
        if first is None:
            return []
        return [first, *self.others.get(index, ())]

    def _record(self, index: int, target: Any) -> None:
        if index in self.first:
            self.others.setdefault(index, []).append(target)
        else:
            self.first[index] = target

    def _plain(self, ref: Ref, target: Any) -> bool:
        """Whether ``target``, a plain torch tensor, takes checkpoint tensor ``ref`` (then it
        is recorded as its destination); False leaves the message to :meth:`_tensor`."""
        entry = self.manifest.tensors[ref.index]
        if ref.kind != "torch" or not arrays.matches_torch(target, entry.dtype, entry.shape):
            return False
        self._record(ref.index, target)
        return True

    def _tensor(self, ref: Ref, target: Any, path: str) -> None:
        if dtensor.is_dtensor(target):
            self._dtensor(ref, target, path)
            return
        entry = self.manifest.tensors[ref.index]
        spec = arrays.try_spec(target)
        if spec is None or spec.dtype != entry.dtype or spec.shape != entry.shape or spec.kind != ref.kind:
            have = f"{spec.kind} {spec.dtype.name}{list(spec.shape)}" if spec else type(target).__qualname__
            self.mismatched.append(
                f"{path}: checkpoint has {ref.kind} {entry.dtype.name}{list(entry.shape)}, target has {have}"
            )
            return
        self._record(ref.index, target)

    def _dtensor(self, ref: Ref, target: Any, path: str) -> None:
        """A DTensor target (an FSDP2 parameter) matches by its global dtype and shape."""
        entry = self.manifest.tensors[ref.index]
        described = dtensor.describe(target)
        if isinstance(described, str):
            self.mismatched.append(f"{path}: {described}")
            return
        spec = described[0]
        if spec.dtype != entry.dtype or spec.shape != entry.shape or ref.kind != "torch":
            self.mismatched.append(
                f"{path}: checkpoint has {ref.kind} {entry.dtype.name}{list(entry.shape)}, "
                f"target has DTensor {spec.dtype.name}{list(spec.shape)}"
            )
            return
        self._record(ref.index, target)

    def raise_problems(self, root: Location) -> None:
        problems = list(self.mismatched)
        if self.strict:
            problems += [f"{p}: missing from the checkpoint" for p in self.missing]
        problems += [f"{p}: in the checkpoint but not in the target" for p in self.unexpected]
        if problems:
            shown = "\n  ".join(problems[:20])
            more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise StateMismatchError(
                f"{root}: checkpoint does not fit the target:\n  {shown}{more}\n"
                "Pass strict=False to load what matches."
            )
