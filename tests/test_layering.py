"""The package is layered as docs/design.md's module map draws it: every module imports only modules of
its own layer or of the layers below (the layer order is read from the map itself, so the document and
the code cannot drift apart), and no two parts of one layer import each other."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "megatron_unix"


def layers_of_the_map() -> dict[str, int]:
    """Part (a subpackage or a top-level module) -> its layer, from the first code block after
    "## Module map": layers are separated by a line of ``|``; a layer's parts are the comma-separated
    names of its left column."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    block = text.split("## Module map", 1)[1].split("```", 2)[1]
    layer, parts = 0, {}
    for line in block.splitlines():
        left = re.split(r"\s{3,}", line.strip(), maxsplit=1)[0]
        if left.startswith("|"):
            layer += 1
        elif left and not line.startswith(" " * 8):
            parts.update({name: layer for name in re.findall(r"\w+", left)})
    return parts


def part_of(module: str) -> str:
    """``megatron_unix.training.trainer`` -> ``training``."""
    return module.split(".")[1]


def imports() -> dict[str, set[str]]:
    """Module -> the ``megatron_unix`` modules it imports anywhere (at the top, lazily in a function, or
    for type checking)."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(ROOT).with_suffix("")
        module = ".".join(relative.parts[:-1] if relative.name == "__init__" else relative.parts)
        found = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module)
        graph[module] = {name for name in found if name.startswith("megatron_unix.")}
    return graph


def test_the_map_names_every_part_of_the_package():
    layers = layers_of_the_map()
    parts = {part_of(module) for module in imports() if module != "megatron_unix"}
    assert parts <= set(layers), f"parts missing from docs/design.md's module map: {sorted(parts - set(layers))}"
    assert len(set(layers.values())) >= 9, layers


def test_every_module_imports_only_its_own_layer_or_below():
    layers = layers_of_the_map()
    upward = [
        f"{module} (layer {layers[part_of(module)]}) imports {name} (layer {layers[part_of(name)]})"
        for module, names in sorted(imports().items())
        if module != "megatron_unix"
        for name in sorted(names)
        if layers[part_of(name)] > layers[part_of(module)]
    ]
    assert not upward, "\n".join(upward)


def test_no_two_parts_of_a_layer_import_each_other():
    parts: dict[str, set[str]] = {}
    for module, names in imports().items():
        if module != "megatron_unix":
            parts.setdefault(part_of(module), set()).update(part_of(name) for name in names)
    both_ways = sorted((a, b) for a, used in parts.items() for b in used if a < b and a in parts.get(b, ()))
    assert not both_ways, both_ways
