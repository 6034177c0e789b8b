"""The architecture: lower layers never import upper ones (DEVELOPERS guide, "Style").

protocol/values -> format -> io -> policy -> adapters (conformance, interop, integrations) -> cli
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "ckptproto"

LAYERS = {
    "ckptproto.errors": 0,
    "ckptproto._gc": 0,
    "ckptproto._recent": 0,
    "ckptproto._child": 0,
    "ckptproto.protocol": 0,
    "ckptproto.dtypes": 0,
    "ckptproto.arrays": 0,
    "ckptproto.dtensor": 0,
    "ckptproto.tree": 0,
    "ckptproto.location": 0,
    "ckptproto.format": 1,
    "ckptproto.io": 2,
    "ckptproto.policy": 3,
    "ckptproto.conformance": 4,
    "ckptproto.interop": 4,
    "ckptproto.integrations": 4,
    "ckptproto.cli": 5,
}


def layer(module: str) -> int | None:
    best = None
    for prefix, level in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            best = level
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
            names.extend(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.extend(a.name for a in node.names)
    return [n for n in names if n.startswith("ckptproto")]


def test_every_module_has_a_layer() -> None:
    for path in ROOT.rglob("*.py"):
        name = module_name(path)
        if name in ("ckptproto", "ckptproto.__main__"):
            continue
        assert layer(name) is not None, f"{name} is not placed in a layer"


def test_lower_layers_never_import_upper_ones() -> None:
    offences = []
    for path in ROOT.rglob("*.py"):
        name = module_name(path)
        if name in ("ckptproto", "ckptproto.__main__"):  # the public facade re-exports every layer
            continue
        own = layer(name)
        assert own is not None
        for target in imported(ast.parse(path.read_text())):
            level = layer(target)
            if level is not None and level > own:
                offences.append(f"{name} (layer {own}) imports {target} (layer {level})")
    assert not offences, "\n".join(sorted(set(offences)))


def test_core_imports_no_torch_at_module_level() -> None:
    """torch is optional: no module of the package imports it at import time."""
    offences = []
    for path in ROOT.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offences += [
                f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in ("torch", "lightning")
            ]
    assert not offences, offences


def _resolve(target: str) -> str | None:
    """The module a ``ckptproto...`` import names: ``ckptproto.io.commit`` for both
    ``import ckptproto.io.commit`` and ``from ckptproto.io import commit``; None for a name
    that is not a module of the package."""
    while target.count(".") >= 1:
        parts = target.split(".")
        if (ROOT.parent.joinpath(*parts).with_suffix(".py")).is_file():
            return target
        if (ROOT.parent.joinpath(*parts) / "__init__.py").is_file():
            return target
        target = ".".join(parts[:-1])
    return None


def _graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at any depth of its code: a lazy import
    inside a function is an edge too)."""
    edges: dict[str, set[str]] = {}
    for path in ROOT.rglob("*.py"):
        name = module_name(path)
        found: set[str | None] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # ``from pkg import mod`` depends on mod (and pkg/__init__ only for its own names)
                found |= {_resolve(f"{node.module}.{a.name}") for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {_resolve(a.name) for a in node.names}
        edges[name] = {t for t in found if t is not None and t != name}
    return edges


def _package(module: str, edges: dict[str, set[str]]) -> str:
    return module if any(m.startswith(module + ".") for m in edges) else module.rsplit(".", 1)[0]


def test_no_import_cycles_inside_a_package() -> None:
    """Modules of one package never import each other in a circle (not even lazily): one of
    them holds what both need, or they are one job split in two."""
    edges = _graph()
    cycles: list[str] = []
    for start in sorted(edges):
        package = _package(start, edges)
        # Depth-first search for a path back to ``start`` through modules of its package.
        stack = [(start, [start])]
        seen: set[str] = set()
        while stack:
            node, trail = stack.pop()
            for nxt in sorted(edges.get(node, ())):
                if nxt.rsplit(".", 1)[0] != package and _package(nxt, edges) != package:
                    continue
                if nxt == start:
                    cycles.append(" -> ".join([*trail, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*trail, nxt]))
    assert not cycles, "\n".join(sorted(set(cycles)))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_module_uses_another_modules_private_names() -> None:
    """``from m import _x`` and ``m._x`` reach into another module's internals: what two
    modules share is public in one of them. (Private *modules* such as ``ckptproto._gc`` are
    the package's own and may be imported.)"""
    offences = []
    for path in ROOT.rglob("*.py"):
        name = module_name(path)
        tree = ast.parse(path.read_text())
        aliases: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ckptproto"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    if _resolve(full) == full:
                        aliases.add(a.asname or a.name)  # a module, used as ``alias.attr``
                    elif _private(a.name):
                        offences.append(f"{name}: from {node.module} import {a.name}")
            elif isinstance(node, ast.Import):
                for a in node.names:
                    if a.name.startswith("ckptproto") and a.asname:
                        aliases.add(a.asname)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
                and _private(node.attr)
            ):
                offences.append(f"{name}: {node.value.id}.{node.attr}")
    assert not offences, "\n".join(sorted(set(offences)))
