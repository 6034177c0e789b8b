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
    "ckptproto.protocol": 0,
    "ckptproto.dtypes": 0,
    "ckptproto.arrays": 0,
    "ckptproto.dtensor": 0,
    "ckptproto.tree": 0,
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
